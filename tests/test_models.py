"""ThinResNet models: width rule, exact counts vs the reference table, torchvision parity."""
import csv
from pathlib import Path

import pytest
import torch
import torchvision

from fasttrain.measure import count_macs, count_params
from fasttrain.models import (NORM_ACT_LAYERS, BatchNormReLU2d, CifarResNet,
                              SyncBatchNormReLU2d, base_channels, convert_sync_batchnorm,
                              create_model, list_models)
from fasttrain.models.resnet import ShortcutA

# Copy of ../shared/reference/thinresnet_counts.csv (exact counts, sources in its README).
COUNTS = list(csv.DictReader(open(Path(__file__).parent / "data" / "thinresnet_counts.csv")))
IMAGENET = ["thin_resnet18", "thin_resnet34", "thin_resnet50", "thin_resnet101", "thin_resnet152"]
CIFAR = ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110"]


def test_registry_lists_every_variant():
    assert list_models() == sorted(IMAGENET + CIFAR)
    with pytest.raises(KeyError, match="unknown model 'resnet50'"):
        create_model("resnet50")


@pytest.mark.parametrize("base,width,divisor,expected", [
    (64, 1.0, 1, 64), (64, 0.5, 1, 32), (64, 0.25, 1, 16), (64, 0.75, 1, 48),
    (16, 0.25, 1, 4), (16, 0.75, 1, 12), (64, 0.3, 1, 19), (64, 0.3, 8, 24),
    (16, 0.25, 8, 8), (64, 0.5, 8, 32), (16, 0.5 / 16 * 1, 1, 1), (16, 0.15625, 1, 3),
])
def test_width_rule(base, width, divisor, expected):
    # 0.15625 * 16 = 2.5 rounds half up to 3 (not Python's round-half-to-even 2).
    assert base_channels(base, width, divisor) == expected


@pytest.mark.parametrize("width,divisor", [(0.0, 1), (-1.0, 1), (0.01, 1), (0.5, 0),
                                           (float("inf"), 1), (float("nan"), 1)])
def test_width_rule_rejects_degenerate_widths(width, divisor):
    with pytest.raises(ValueError):
        base_channels(16, width, divisor)


@pytest.mark.parametrize("name", ["cifar_resnet20", "thin_resnet18"])
@pytest.mark.parametrize("kwargs, message", [
    ({"width": "0.5"}, "width must be a number, got '0.5'"),
    ({"width": True}, "width must be a number, got True"),
    ({"channel_divisor": 1.5}, "channel_divisor must be an integer >= 1, got 1.5"),
    ({"channel_divisor": True}, "channel_divisor must be an integer >= 1, got True"),
    ({"num_classes": -1}, "num_classes must be an integer >= 1, got -1"),
    ({"num_classes": 2.5}, "num_classes must be an integer >= 1, got 2.5"),
    ({"in_chans": 0}, "in_chans must be an integer >= 1, got 0"),
    ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\), got 1.0"),
    ({"drop_path_rate": -0.5}, r"drop_path_rate must be in \[0, 1\), got -0.5"),
    ({"drop_path_rate": float("nan")}, r"drop_path_rate must be in \[0, 1\), got nan"),
])
def test_constructor_arguments_are_checked_by_name(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **kwargs)


@pytest.mark.parametrize("row", COUNTS, ids=lambda r: f"{r['model']}-w{r['width']}")
def test_counts_match_reference(row):
    model = create_model(row["model"], width=float(row["width"]),
                         num_classes=int(row["num_classes"]))
    assert model.conv1.out_channels == int(row["base_width"])
    assert count_params(model) == int(row["params"])
    macs = count_macs(model, int(row["resolution"]))
    assert macs.conv_fc == int(row["macs"])
    assert macs.total > macs.conv_fc  # fvcore's total adds BatchNorm and pooling
    assert macs.by_operator["batch_norm"] > 0


def test_fused_norm_act_counts_like_native():
    # fvcore does not know the fused op: uncounted, the total fell with model.norm_act=fused
    counts = {kind: count_macs(create_model("cifar_resnet20", width=0.25, norm_act_layer=layer),
                               16) for kind, layer in NORM_ACT_LAYERS.items()}
    assert counts["fused"].total == counts["native"].total
    fused = counts["fused"].by_operator
    assert fused["bn_relu_forward"] > 0  # the norms before a residual add stay batch_norm
    assert fused["bn_relu_forward"] + fused["batch_norm"] == \
        counts["native"].by_operator["batch_norm"]


def test_blurpool_filters_count_as_convolutions():
    """The README's figure: BlurPool's fixed depthwise 3x3 blur before each strided conv
    adds 0.46 % to thin_resnet50 w1.0's conv+fc MACs at 224 px (it runs on every image)."""
    plain = count_macs(create_model("thin_resnet50", width=1.0), 224).conv_fc
    blurred = count_macs(create_model("thin_resnet50", width=1.0, blurpool=True), 224).conv_fc
    assert round((blurred / plain - 1) * 100, 2) == 0.46


def test_channel_divisor_keeps_doubling_structure():
    model = create_model("thin_resnet50", width=0.3, channel_divisor=8)
    assert model.conv1.out_channels == 24
    assert [model.get_submodule(f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3, 4)] == \
        [24, 48, 96, 192]
    assert model.fc.in_features == 192 * 4


@pytest.mark.parametrize("name", IMAGENET)
def test_torchvision_state_dict_loads_and_matches(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name.replace("thin_", ""))().eval()
    # Non-trivial running stats, so eval-mode BN really is exercised.
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    ours = create_model(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("width", [0.25, 0.5])
@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_forward_shape_and_every_parameter_gets_a_gradient(name, width):
    torch.manual_seed(0)
    model = create_model(name, width=width, num_classes=7, zero_init_residual=False)
    res = 32 if name.startswith("cifar") else 64
    out = model(torch.randn(2, 3, res, res))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_zero_init_residual_zeroes_last_norm_of_each_block():
    model = create_model("thin_resnet18", width=0.25)
    assert model.layer1[0].bn2.weight.abs().sum() == 0
    assert model.layer1[0].bn1.weight.abs().sum() > 0
    model = create_model("thin_resnet50", width=0.25, zero_init_residual=False)
    assert model.layer1[0].bn3.weight.abs().sum() > 0


@pytest.mark.parametrize("name,last", [("thin_resnet18", "bn2"), ("thin_resnet50", "bn3"),
                                       ("cifar_resnet20", "bn2")])
def test_zero_init_residual_reaches_every_block_of_every_stage(name, last):
    # Bottlenecks too: a block left out would not start as the identity.
    model = create_model(name, width=0.25)
    blocks = [b for stage in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, stage)
              for b in model.get_submodule(stage)]
    assert len(blocks) == {"thin_resnet18": 8, "thin_resnet50": 16, "cifar_resnet20": 9}[name]
    assert all(getattr(b, last).weight.abs().sum() == 0 for b in blocks)
    assert all(b.bn1.weight.abs().sum() > 0 for b in blocks)


def test_shortcut_a_subsamples_from_the_first_pixel_and_pads_channels_evenly():
    x = torch.randn(1, 4, 8, 8)
    expected = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
    assert torch.equal(ShortcutA(4, 8, 2)(x), expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("norm_act", ["native", "fused"])
def test_sync_batchnorm_conversion_keeps_the_relu(device, norm_act, monkeypatch):
    """torch's convert_sync_batchnorm turns a BatchNormReLU2d into a plain SyncBatchNorm (no
    ReLU). Here it becomes SyncBatchNormReLU2d with the same tensors; in one process (no group
    to synchronise with) it computes exactly what the layers did, in training and eval."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if device == "cuda":
        # TF32 convolutions (cuDNN's default) would grow the fused kernel's last-bit difference
        # from SyncBatchNorm's over 19 layers: full fp32 makes it about the layers alone
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", width=0.25, zero_init_residual=False,
                         norm_act_layer=NORM_ACT_LAYERS[norm_act]).to(device)
    twin = create_model("cifar_resnet20", width=0.25, norm_act_layer=NORM_ACT_LAYERS[norm_act])
    twin = twin.to(device)
    twin.load_state_dict(model.state_dict())
    tensors = {k: v.data_ptr() for k, v in twin.state_dict().items()}
    synced = convert_sync_batchnorm(twin)
    assert type(synced.bn1) is SyncBatchNormReLU2d
    assert type(synced.layer1[0].bn2) is torch.nn.SyncBatchNorm  # before the residual add
    assert {k: v.data_ptr() for k, v in synced.state_dict().items()} == tensors
    x = torch.randn(8, 3, 16, 16, device=device)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(synced, mode)()
        torch.testing.assert_close(synced(x), model(x), msg=mode)
    torch.testing.assert_close(synced.state_dict(), model.state_dict())
    plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
        create_model("cifar_resnet20", width=0.25, norm_act_layer=NORM_ACT_LAYERS[norm_act]))
    assert plain.bn1(torch.randn(2, plain.bn1.num_features, 8, 8)).min() < 0  # ReLU gone


def test_cifar_shortcuts():
    a = create_model("cifar_resnet20", width=0.75)
    b = create_model("cifar_resnet20", width=0.75, shortcut="B")
    assert count_params(b) > count_params(a)
    assert isinstance(b.layer2[0].downsample[0], torch.nn.Conv2d)
    x = torch.randn(1, 3, 32, 32)
    assert a(x).shape == b(x).shape == (1, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


def test_norm_act_is_a_batchnorm_with_relu():
    bn = BatchNormReLU2d(4).train()
    ref = torch.nn.BatchNorm2d(4).train()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(bn(x), torch.relu(ref(x)))
    assert bn.state_dict().keys() == ref.state_dict().keys()
    torch.testing.assert_close(bn.running_var, ref.running_var)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_global_pooling_trains_under_deterministic_algorithms(device, monkeypatch):
    """torch has no deterministic CUDA backward for adaptive average pooling: a deterministic
    eager run on a GPU raised at its first backward pass. There the classifier's pooling takes
    the mean over H and W; on the CPU that path is forced to check it is the same average."""
    from fasttrain.models import resnet

    if device == "cpu":  # the CUDA path's CPU twin
        monkeypatch.setattr(resnet, "_deterministic_cuda", lambda x: True)
    torch.manual_seed(0)
    model = create_model("thin_resnet18", width=0.25, num_classes=10).to(device)
    x = torch.randn(4, 3, 32, 32, device=device)
    reference = torch.nn.AdaptiveAvgPool2d(1)
    features = torch.randn(4, 8, 5, 5, device=device, requires_grad=True)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        pooled = model.avgpool(features)
        torch.testing.assert_close(pooled, reference(features.detach()))
        model(x).square().sum().backward()  # raised on CUDA before
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).square().sum().backward()
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    torch.testing.assert_close(model.avgpool(features), reference(features))  # off: as before
