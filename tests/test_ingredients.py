"""Training-recipe ingredients: each one's math or invariant, on small inputs."""
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fasttrain.config import AugConfig, DataConfig, OptimConfig, ScheduleConfig, load
from fasttrain.data import EpochSampler
from fasttrain.data.transforms import (AutoAugment, TrainAugment, ValTransform,
                                       progressive_resolution)
from fasttrain.engine.ema import ModelEma, adjusted_decay
from fasttrain.engine.mix import BatchMixer, classification_loss, cutmix_box, one_hot_smoothed
from fasttrain.engine.optim import Lamb, effective_lr
from fasttrain.engine.schedule import lr_factor
from fasttrain.errors import ConfigError
from fasttrain.models import create_model
from fasttrain.models.regularize import BlurPoolConv2d, DropPath, apply_blurpool

ROOT = Path(__file__).resolve().parents[1]


def mixer(mixup=0.0, cutmix=0.0, smoothing=0.0, classes=10):
    return BatchMixer(AugConfig(mixup_alpha=mixup, cutmix_alpha=cutmix), classes, smoothing)


@pytest.mark.parametrize("kind", ["mixup", "cutmix", "both"])
def test_mixed_targets_sum_to_one_and_mix_two_labels(kind):
    m = mixer(mixup=0.2 if kind != "cutmix" else 0, cutmix=1.0 if kind != "mixup" else 0,
              smoothing=0.1)
    labels = torch.tensor([0, 1, 2, 3])
    for seed in range(20):
        images = torch.rand(4, 3, 16, 16)
        _, targets, lam = m(images.clone(), labels, random.Random(seed))
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        # Sample i mixes its own label with the label of sample i-1 (roll by one).
        expected = (lam * one_hot_smoothed(labels, 10, 0.1)
                    + (1 - lam) * one_hot_smoothed(labels.roll(1), 10, 0.1))
        torch.testing.assert_close(targets, expected)


def test_cutmix_lambda_is_the_pasted_area():
    m = mixer(cutmix=1.0)
    for seed in range(50):
        a, b = torch.zeros(2, 1, 20, 30), torch.ones(2, 1, 20, 30)
        images = torch.cat([a[:1], b[:1]])  # image 0 all zeros, image 1 all ones
        out, _, lam = m(images.clone(), torch.tensor([0, 1]), random.Random(seed))
        # Image 1 received a box of image 0 (zeros): the fraction of ones left is lambda.
        assert out[1].mean().item() == pytest.approx(lam, abs=1e-6)
    box = cutmix_box(20, 30, 1.0, random.Random(0))
    assert (box[1] - box[0]) * (box[3] - box[2]) == 0


class _CentreRng(random.Random):
    """randrange(n) gives the centre n // 2, so the cutmix box is not clipped."""

    def randrange(self, n):
        return n // 2


def test_cutmix_box_sides_scale_by_the_square_root_of_the_area():
    # timm / torchvision: cut = sqrt(1 - lam), cut_h = int(H * cut), cut_w = int(W * cut), the
    # box spanning centre +- cut // 2 on each axis: 20 x 30 at lam 0.75 → half sides 5 and 7.
    y0, y1, x0, x1 = cutmix_box(20, 30, 0.75, _CentreRng())
    assert (y0, y1, x0, x1) == (10 - 5, 10 + 5, 15 - 7, 15 + 7)


def test_mixup_pixels_are_the_lambda_mixture():
    m = mixer(mixup=0.5)
    images = torch.rand(3, 3, 8, 8)
    out, _, lam = m(images.clone(), torch.tensor([0, 1, 2]), random.Random(3))
    torch.testing.assert_close(out, lam * images + (1 - lam) * images.roll(1, 0))


def test_mix_prob_zero_leaves_batch_untouched():
    m = BatchMixer(AugConfig(mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.0), 5, 0.0)
    images = torch.rand(2, 3, 4, 4)
    out, targets, lam = m(images.clone(), torch.tensor([1, 4]), random.Random(0))
    assert lam == 1.0 and torch.equal(out, images)
    torch.testing.assert_close(targets, nn.functional.one_hot(torch.tensor([1, 4]), 5).float())


def test_bce_loss_and_threshold():
    cfg = OptimConfig(loss="bce", bce_target_thresh=0.2)
    logits = torch.randn(4, 6)
    labels = torch.tensor([0, 1, 2, 3])
    soft = 0.7 * one_hot_smoothed(labels, 6, 0) + 0.3 * one_hot_smoothed(labels.roll(1), 6, 0)
    hard = (soft > 0.2).float()  # both mixed labels count as positives
    expected = nn.functional.binary_cross_entropy_with_logits(logits, hard)
    torch.testing.assert_close(classification_loss(cfg, logits, labels, soft), expected)
    ce = OptimConfig(loss="ce", label_smoothing=0.1)
    torch.testing.assert_close(
        classification_loss(ce, logits, labels, None),
        classification_loss(ce, logits, labels, one_hot_smoothed(labels, 6, 0.1)))


def test_ema_equals_its_closed_form():
    model = nn.Linear(1, 1, bias=False)
    decay, values = 0.9, [1.0, 2.0, 4.0, -3.0, 0.5, 7.0]
    ema = ModelEma(model, decay, every=1)
    for step, v in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.fill_(v)
        ema.step(model, step, in_warmup=False)
    # The first update copies the weights (torchvision's AveragedModel), then
    # ema_n = d^(n-1) w_1 + sum_{k=2..n} (1 - d) d^(n-k) w_k
    n = len(values)
    closed = decay ** (n - 1) * values[0] + sum((1 - decay) * decay ** (n - k) * values[k - 1]
                                                for k in range(2, n + 1))
    assert ema.module.weight.item() == pytest.approx(closed, rel=1e-6)


def test_ema_updates_every_k_steps():
    model = nn.Linear(1, 1, bias=False)
    ema = ModelEma(model, 0.5, every=2)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.step(model, 2, in_warmup=False)
    assert ema.module.weight.item() == 3.0  # first update: a copy
    with torch.no_grad():
        model.weight.fill_(5.0)
    ema.step(model, 3, in_warmup=False)
    assert ema.module.weight.item() == 3.0  # not an update step
    ema.step(model, 4, in_warmup=False)
    assert ema.module.weight.item() == 4.0


def test_the_first_ema_update_after_warmup_copies_as_torchvisions():
    """torchvision's train.py zeroes n_averaged after each warmup update, so the first update
    after warmup is a copy of the weights, not an average with the last warmup copy."""
    model = nn.Linear(1, 1, bias=False)
    ema = ModelEma(model, 0.5, every=1)
    for step, (weight, warmup) in enumerate([(1.0, True), (9.0, True), (3.0, False),
                                             (7.0, False)], 1):
        with torch.no_grad():
            model.weight.fill_(weight)
        ema.step(model, step, in_warmup=warmup)
    # copies at steps 1-3 (the last warmup update reset the count), then 0.5 * 3 + 0.5 * 7;
    # averaging through warmup would give ((1 + 9) / 2 + 3) / 2 = 4, then 5.5
    assert ema.module.weight.item() == 5.0


def test_ema_updates_are_torchs_averaged_model_bit_for_bit():
    """ModelEma replaces AveragedModel.update_parameters (two device syncs per update, four
    kernels per integer buffer) with the same arithmetic: parameters, BatchNorm buffers and
    num_batches_tracked equal torch's exactly, through warmup resets and a state-dict reload."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = create_model("cifar_resnet20", width=0.25, num_classes=3)
    model.register_buffer("counts", torch.tensor([7, 300, 11]))  # integers of another shape
    ours = ModelEma(model, 0.9, every=1)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 7):
        loss = model(torch.randn(4, 3, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.counts += step * 13
        warmup = step <= 2
        ours.step(model, step, in_warmup=warmup)
        torchs.update_parameters(model)
        if warmup:
            torchs.n_averaged.zero_()
        if step == 4:  # a resume: the next update must average, not copy
            reloaded = ModelEma(model, 0.9, every=1)
            reloaded.load_state_dict(ours.state_dict())
            ours = reloaded
        for (name, a), b in zip(ours.state_dict().items(), torchs.state_dict().values()):
            assert torch.equal(a, b), (step, name)


def _op_counts(fn, top_level: bool = False) -> dict[str, int]:
    """aten ops `fn` dispatches (with `top_level`, only those no other op called: a CPU
    foreach op runs per-tensor ops inside, a CUDA one launches a few kernels)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events()
                   if not (top_level and e.cpu_parent is not None
                           and e.cpu_parent.name.startswith("aten::")))


def test_an_ema_update_reads_nothing_back_from_the_device():
    """AveragedModel.update_parameters tests `n_averaged` on the device twice per update: on a
    GPU each test waits for the queued training step (torch's _local_scalar_dense)."""
    model = create_model("cifar_resnet20", width=0.25, num_classes=3)
    ema = ModelEma(model, 0.9, every=1)
    for step in (1, 2):  # the copy, then an average
        ops = _op_counts(lambda: ema.step(model, step, in_warmup=False))
        assert "aten::_local_scalar_dense" not in ops and "aten::item" not in ops, ops


def test_ema_decay_adjustment_matches_torchvision():
    # torchvision: alpha = (1 - decay) * world * batch_per_gpu * ema_steps / epochs
    assert adjusted_decay(0.99998, 1024, 32, 600) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    assert adjusted_decay(0.5, 10**6, 32, 1) == 0.0  # capped


@pytest.mark.parametrize("size,world,reps", [(40, 2, 4), (36, 3, 3), (10, 1, 2), (17, 4, 3)])
def test_repeated_augmentation_sampler(size, world, reps):
    shares = [EpochSampler(size, r, world, seed=1, reps=reps) for r in range(world)]
    for s in shares:
        s.set_epoch(3)
    pairs = [list(zip(*s.share())) for s in shares]
    flat = [p for share in pairs for p in share]
    assert len(flat) == len(set(flat)) == size * reps  # disjoint (index, copy) sets
    counts = np.bincount([i for i, _ in flat], minlength=size)
    assert (counts == reps).all()  # the data set is covered exactly reps times
    if reps <= world:
        for share in pairs:  # copies of an image go to different ranks
            indices = [i for i, _ in share]
            assert len(indices) == len(set(indices))
    for s in shares:  # every rank keeps an epoch of len(dataset) // world samples
        assert len(list(s)) == len(s) == size // world


@pytest.mark.parametrize("size,world,accum,batch,reps",
                         [(103, 1, 4, 5, 4), (64, 2, 2, 4, 3), (50, 3, 2, 4, 2), (50, 2, 2, 4, 1)])
def test_accumulation_deals_micro_batches_as_ranks(
        size, world, accum, batch, reps):
    """Micro-batch k of step s on rank r is batch s of rank r * accum + k in a run on
    world x accum ranks, so the global batch's composition (copies of an image in different
    micro-batches) is the recipe's on fewer devices; a resume offset skips whole steps."""
    for epoch in (0, 3):
        for rank in range(world):
            sampler = EpochSampler(size, rank, world, 7, reps, accum, batch)
            sampler.set_epoch(epoch)
            ours = [i for _, i, _ in sampler]
            assert len(ours) == len(sampler)
            steps = len(ours) // batch // accum
            for k in range(accum):
                twin = EpochSampler(size, rank * accum + k, world * accum, 7, reps)
                twin.set_epoch(epoch)
                theirs = [i for _, i, _ in twin]
                assert steps == len(theirs) // batch
                for step in range(steps):
                    micro = ours[(step * accum + k) * batch:][:batch]
                    assert micro == theirs[step * batch:(step + 1) * batch]
                    assert len(set(micro)) == len(micro) or reps > world * accum
            sampler.set_epoch(epoch, accum * batch)  # resume after one step
            assert [i for _, i, _ in sampler] == ours[accum * batch:]


def test_mixing_pairs_no_copies_under_accumulation_at_the_recipes_reps():
    """thin_r50 recipes: ra_reps 4 and mixup/cutmix; on one rank with 4 micro-batches per step
    no sample is mixed with another view of itself (roll by one within each micro-batch), where
    dealing to the one real rank mixed 75 % of them so."""
    size, batch, accum = 4096, 32, 4

    def self_pairs(sampler):
        indices = torch.tensor([i for _, i, _ in sampler])
        micro = indices[:len(indices) // batch * batch].view(-1, batch)
        return (micro == micro.roll(1, dims=1)).float().mean().item()

    assert self_pairs(EpochSampler(size, 0, 1, 0, 4, accum, batch)) == 0.0
    assert self_pairs(EpochSampler(size, 0, 1, 0, 4)) == pytest.approx(0.75)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "resident"])
@pytest.mark.parametrize("reps", [1, 4])
def test_loaders_deal_micro_batches_as_to_ranks(backend, reps, data_root):
    """Both backends, with and without repeated augmentation: one rank with 4 micro-batches
    per step yields the batches (images and crops) ranks 0-3 of a 4-rank run yield. (The
    resident backend drew its crops by the real rank and position, and without ra_reps a
    micro-batch was a slice of the rank's share: other images in each BatchNorm batch.)"""
    from fasttrain.data import build_loaders

    cfg = load(ROOT / "recipes" / "quickstart.yaml",
               [f"--data.backend={backend}", f"--data.path={data_root / 'digits'}",
                "--data.batch_size=64", f"--data.ra_reps={reps}", "--data.num_workers=0"])

    def batches(loader, count):
        loader.set_epoch(1)
        return [(x.clone(), y.clone()) for (x, y), _ in zip(loader, range(count))]

    accumulated = batches(build_loaders(cfg.data, cfg.aug, seed=2,
                                        grad_accum_steps=4).train, 8)
    ranks = [batches(build_loaders(cfg.data, cfg.aug, seed=2, rank=k, world_size=4).train, 2)
             for k in range(4)]
    for step in range(2):
        for k in range(4):
            (x, y), (x_rank, y_rank) = accumulated[step * 4 + k], ranks[k][step]
            assert torch.equal(y, y_rank) and torch.equal(x, x_rank)


@pytest.mark.parametrize("reps,batch,world,accum,mixup,said,advice", [
    (4, 128, 1, 1, 0.2, "75%", "train.grad_accum_steps=4 keeps them apart"),
    (4, 128, 2, 1, 0.2, "50%", "train.grad_accum_steps=2 keeps them apart"),
    # the RSB recipes: 3 copies, a batch of 2048: 3 micro-batches would not split it
    (3, 2048, 1, 1, 0.2, "67%", "train.grad_accum_steps=4 keeps them apart"),
    (3, 2, 1, 2, 0.2, "33%", "data.batch_size=2 splits into no such number of micro-batches"),
    (4, 128, 1, 4, 0.2, None, None), (4, 128, 1, 1, 0.0, None, None)])
def test_training_says_when_mixing_pairs_copies_of_an_image(reps, batch, world, accum, mixup,
                                                            said, advice):
    from fasttrain.engine.loop import _note_copies_mixed

    cfg = load(ROOT / "recipes" / "quickstart.yaml",
               [f"--data.ra_reps={reps}", f"--aug.mixup_alpha={mixup}",
                f"--data.batch_size={batch}", f"--train.grad_accum_steps={accum}"])
    printed = []
    _note_copies_mixed(cfg, world, type("Report", (), {"print": printed.append})())
    assert len(printed) == (said is not None)
    if said:
        assert f"mixes about {said} of the samples" in printed[0] and advice in printed[0]


@pytest.mark.parametrize("batch, world, accum, sync_bn, said", [
    # 2 images on 2 ranks trained silently to a validation loss of 2e7
    (2, 2, 1, False, "data.batch_size=2 over 2 ranks x 1 micro-batch): its statistics are "
                     "that image's, which validation's running statistics do not match; use a "
                     "larger data.batch_size or train.sync_bn"),
    (4, 1, 4, False, "data.batch_size=4 over 1 rank x 4 micro-batches)"),
    (2, 2, 1, True, None), (4, 2, 1, False, None), (1, 1, 1, True, "over 1 rank x")])
def test_training_says_when_batch_norm_sees_one_image(batch, world, accum, sync_bn, said):
    from fasttrain.engine.loop import _note_single_image_batch_norm

    cfg = load(ROOT / "recipes" / "quickstart.yaml",
               [f"--data.batch_size={batch}", f"--train.grad_accum_steps={accum}",
                f"--train.sync_bn={str(sync_bn).lower()}"])
    printed = []
    _note_single_image_batch_norm(cfg, world, 10,
                                  type("Report", (), {"print": printed.append})())
    assert len(printed) == (said is not None), printed
    if said:
        assert printed[0].startswith("note: each training step's BatchNorm sees one image (")
        assert said in printed[0], printed[0]


@pytest.mark.parametrize("extra", [["--data.train_res=4"],
                                   ["--data.min_res=4", "--data.max_res=32"]])
def test_a_micro_batch_of_one_reaching_a_1x1_map_is_refused_at_start(extra):
    """The note said training would go on; the first step then refused it. A meta-device
    forward at the smallest training resolution (progressive resizing's first) finds it."""
    from fasttrain.engine.loop import _note_single_image_batch_norm

    cfg = load(ROOT / "recipes" / "quickstart.yaml",
               ["--data.batch_size=1", "--model.norm_act=fused", *extra])
    printed = []
    with pytest.raises(ConfigError, match=r"^data.batch_size=1: a training micro-batch of 1 "
                                          r"image\(s\) per rank leaves BatchNorm one value"):
        _note_single_image_batch_norm(cfg, 1, 10, type("Report", (), {"print": printed.append})())
    assert printed == []


def test_a_train_res_that_progressive_resizing_never_uses_is_not_checked():
    """min_res = max_res = 16 trains every epoch at 16 px, where one image per BatchNorm is
    allowed (with the note); the unread train_res of 2 px refused the run."""
    from fasttrain.engine.loop import _note_single_image_batch_norm

    cfg = load(ROOT / "recipes" / "quickstart.yaml",
               ["--data.batch_size=1", "--data.train_res=2", "--data.min_res=16",
                "--data.max_res=16"])
    printed = []
    _note_single_image_batch_norm(cfg, 1, 10, type("Report", (), {"print": printed.append})())
    assert printed[0].startswith("note: each training step's BatchNorm sees one image (")


def test_progressive_resolution_follows_ffcv():
    data = DataConfig(min_res=160, max_res=192, start_ramp=65, end_ramp=76)
    expected = {0: 160, 65: 160, 66: 160, 70: 160, 71: 192, 72: 192, 76: 192, 87: 192}
    for epoch, res in expected.items():
        interp = np.interp(epoch, [65, 76], [160, 192])
        if 65 < epoch < 76:
            assert res == int(np.round(interp / 32)) * 32
        assert progressive_resolution(data, epoch) == res, epoch
    assert progressive_resolution(DataConfig(train_res=176), 5) == 176
    # Ends that are not multiples of 32: rounding alone gives 0 px or a size above max_res.
    small = DataConfig(min_res=8, max_res=40, start_ramp=0, end_ramp=4)
    assert [progressive_resolution(small, e) for e in range(5)] == [8, 8, 32, 32, 40]
    narrow = DataConfig(min_res=16, max_res=24, start_ramp=0, end_ramp=4)
    assert [progressive_resolution(narrow, e) for e in range(5)] == [16, 24, 24, 24, 24]


def test_triangular_lr_at_chosen_iterations():
    cfg = ScheduleConfig(kind="triangular", epochs=16, peak_epoch=2, warmup_epochs=0)
    steps = 100
    assert lr_factor(cfg, 0, steps) == pytest.approx(1e-4)
    assert lr_factor(cfg, 100, steps) == pytest.approx(1e-4 + (1 - 1e-4) * 0.5)
    assert lr_factor(cfg, 200, steps) == pytest.approx(1.0)
    assert lr_factor(cfg, 900, steps) == pytest.approx(0.5)  # half-way down from 2 to 16
    assert lr_factor(cfg, 1600, steps) == pytest.approx(0.0)
    assert lr_factor(cfg, 1550, steps) == pytest.approx(0.5 / 14)


def test_lamb_step_equals_hand_computation():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3))
    g1, g2 = torch.randn(5, 3), torch.randn(5, 3)
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-6, 0.02
    opt = Lamb([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    w = p.detach().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate((g1, g2), start=1):
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + wd * w
        w = w - lr * (w.norm() / u.norm()) * u
        torch.testing.assert_close(p.detach(), w)
    # Without weight decay there is no trust ratio: a plain bias-corrected Adam step.
    q = nn.Parameter(torch.ones(3))
    q.grad = torch.full((3,), 2.0)
    Lamb([q], lr=0.1, eps=0.0, weight_decay=0.0).step()
    torch.testing.assert_close(q.detach(), torch.full((3,), 0.9))


def _lamb_per_parameter(params, state, lr, b1, b2, eps, wd):
    """The per-parameter LAMB update (timm's order of operations): the reference that the
    multi-tensor implementation must equal bit for bit."""
    for p in params:
        if p.grad is None:
            continue
        st = state.setdefault(p, {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        st["step"] += 1
        t, g = st["step"], p.grad
        st["m"].mul_(b1).add_(g, alpha=1 - b1)
        st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (st["v"] / (1 - b2 ** t)).sqrt_().add_(eps)
        update = (st["m"] / (1 - b1 ** t)).div_(denom)
        if wd != 0:
            update.add_(p, alpha=wd)
            w_norm, u_norm = p.norm(), update.norm()
            one = torch.ones_like(w_norm)
            update.mul_(torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, one),
                                    one))
        p.add_(update, alpha=-lr)


@pytest.mark.parametrize("wd", [0.0, 0.02])
def test_lamb_multi_tensor_step_equals_the_per_parameter_update(wd):
    """Parameters of many shapes, one all zero (norm 0), one without a gradient at the first
    step (so its step count lags): every value equal to the per-parameter loop's."""
    torch.manual_seed(0)
    shapes = [(8, 3, 3, 3), (8,), (5, 8), (5,), (4, 4)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    with torch.no_grad():
        ours[3].zero_()
    theirs = [p.detach().clone() for p in ours]
    opt = Lamb(ours, lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=wd)
    state: dict = {}
    for step in range(4):
        grads = [torch.randn(s) for s in shapes]
        for i, (p, q, g) in enumerate(zip(ours, theirs, grads)):
            late = i == 4 and step == 0
            p.grad = None if late else g.clone()
            q.grad = None if late else g.clone()
        opt.step()
        with torch.no_grad():
            _lamb_per_parameter(theirs, state, 0.01, 0.9, 0.999, 1e-6, wd)
        for p, q in zip(ours, theirs):
            assert torch.equal(p.detach(), q)
    assert opt.state[ours[4]]["step"] == 3 and opt.state[ours[0]]["step"] == 4


def test_a_lamb_step_launches_the_same_ops_for_10_or_40_parameters():
    """Multi-tensor ops: the per-parameter loop launched ~13-19 kernels per parameter (about
    2,150 per step for a ResNet-50)."""
    def ops_for(n: int) -> int:
        params = [nn.Parameter(torch.randn(3, 3)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn(3, 3)
        opt = Lamb(params, lr=0.01, weight_decay=0.02)
        opt.step()  # the state is created
        counts = _op_counts(opt.step, top_level=True)
        return sum(c for k, c in counts.items() if k.startswith("aten::_foreach")
                   or k in ("aten::add_", "aten::mul_", "aten::div", "aten::div_",
                            "aten::sqrt_", "aten::addcmul_", "aten::norm",
                            "aten::linalg_vector_norm"))

    assert ops_for(40) == ops_for(10)


def test_linear_scaling_rule_is_opt_in():
    assert effective_lr(OptimConfig(lr=0.5), 4096) == 0.5
    assert effective_lr(OptimConfig(lr=0.5, lr_reference_batch=1024), 256) == pytest.approx(0.125)


def test_drop_path_keeps_the_expectation_and_is_identity_in_eval():
    torch.manual_seed(0)
    drop = DropPath(0.3).train()
    x = torch.ones(20000, 4)
    out = drop(x)
    kept = out[:, 0][out[:, 0] != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.7))
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    assert (out == out[:, :1]).all()  # one decision per sample
    assert torch.equal(drop.eval()(x), x)
    model = create_model("thin_resnet50", width=0.25, drop_path_rate=0.1)
    rates = [b.drop_path.p if isinstance(b.drop_path, DropPath) else 0.0
             for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
             for b in layer]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)


def test_blurpool_preserves_a_constant_image_and_the_state_dict():
    conv = nn.Conv2d(16, 4, 3, stride=2, padding=1, bias=False)
    blurred = BlurPoolConv2d(16, 4, 3, stride=2, padding=1, bias=False)
    blurred.load_state_dict(conv.state_dict())
    x = torch.full((1, 16, 12, 12), 3.0)
    assert torch.allclose(blurred._blur(x)[..., 1:-1, 1:-1], x[..., 1:-1, 1:-1])
    model = create_model("thin_resnet50", width=0.25)
    keys = model.state_dict().keys()
    apply_blurpool(model)
    assert model.state_dict().keys() == keys
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride[0] > 1]
    assert all(isinstance(m, BlurPoolConv2d) == (m.in_channels >= 16) for m in strided)
    assert isinstance(model.layer2[0].conv2, BlurPoolConv2d)
    assert not isinstance(model.conv1, BlurPoolConv2d)  # 3 input channels
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_blurpool_includes_a_conv_with_exactly_min_channels_inputs():
    model = apply_blurpool(create_model("thin_resnet18", width=0.25))
    conv = model.layer2[0].conv1
    assert (conv.in_channels, conv.stride) == (16, (2, 2))
    assert isinstance(conv, BlurPoolConv2d)
    assert isinstance(model.layer2[0].downsample[0], BlurPoolConv2d)  # 16 inputs too


def test_pad_random_crop_reaches_every_offset():
    cfg = load(None, ["--data.train_res=8", "--aug.train_crop=pad_random", "--aug.padding=2",
                      "--aug.hflip=0", "--data.backend=torch"])
    augment = TrainAugment(cfg.data, cfg.aug)
    # Pixel (r, c) holds 1 + 8r + c, so any non-zero output pixel says where the crop started
    # in the 12 x 12 padded image (the padding is 0).
    image = (torch.arange(64, dtype=torch.uint8) + 1).reshape(1, 8, 8).repeat(3, 1, 1)
    offsets = set()
    for seed in range(200):
        out = augment(image, random.Random(seed))[0]
        i, j = (int(v) for v in out.nonzero()[0])
        r, c = divmod(int(out[i, j]) - 1, 8)
        offsets.add((r + 2 - i, c + 2 - j))
    assert offsets == {(top, left) for top in range(5) for left in range(5)}


def test_fixres_176_232_224_sizes():
    cfg = load(None, ["--data.train_res=176", "--data.val_resize=232", "--data.val_res=224",
                      "--aug.auto_augment=trivialaugment", "--aug.random_erase=1.0"])
    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    out = TrainAugment(cfg.data, cfg.aug)(image, random.Random(0))
    assert out.shape == (3, 176, 176) and out.dtype == torch.uint8
    resized = ValTransform(cfg.data)(image)
    assert resized.shape == (3, 224, 224)


def test_random_erasing_fills_the_mean_colour():
    cfg = load(None, ["--data.train_res=32", "--aug.random_erase=1.0", "--aug.hflip=0",
                      "--aug.scale=[1,1]", "--aug.ratio=[1,1]"])
    image = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    out = TrainAugment(cfg.data, cfg.aug)(image, random.Random(1))
    mean = torch.tensor([round(m * 255) for m in cfg.data.mean], dtype=torch.uint8)
    erased = (out != 7).any(0)
    assert 0.02 * 1024 * 0.9 <= erased.sum() <= 0.33 * 1024 * 1.1
    assert (out[:, erased] == mean[:, None]).all()


def test_random_erasing_boxes_follow_torchvisions_rule():
    """Strictly inside the image (torchvision rejects a box as tall or as wide as the image;
    the crop's rule, used before, accepted it in ~1 % of draws on 16 px) and erased areas
    distributed as RandomErasing.get_params draws them."""
    from torchvision.transforms import RandomErasing

    from fasttrain.data.transforms import random_erase_box

    rng, n = random.Random(0), 20000
    ours = [random_erase_box(16, 16, rng) for _ in range(n)]
    assert all(b is None or (b[2] < 16 and b[3] < 16) for b in ours)
    torch.manual_seed(0)
    image = torch.zeros(3, 16, 16)
    theirs = [RandomErasing.get_params(image, (0.02, 0.33), (0.3, 3.3), value=[0])
              for _ in range(n)]
    mean_ours = sum(h * w for b in ours if b for _, _, h, w in [b]) / n
    mean_theirs = sum(h * w for _, _, h, w, _ in theirs if h < 16) / n  # (0,0,16,16): no erase
    assert mean_ours == pytest.approx(mean_theirs, rel=0.02)


@pytest.mark.parametrize("kind", ["trivialaugment", "randaugment"])
def test_auto_augment_is_a_function_of_its_generator(kind):
    aug = AutoAugment(AugConfig(auto_augment=kind, randaug_magnitude=7,
                                randaug_magnitude_std=0.5))
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    outs = [aug(image, random.Random(s)) for s in (5, 5, 6, 7, 8, 9)]
    assert torch.equal(outs[0], outs[1])
    assert any(not torch.equal(outs[0], o) for o in outs[2:])
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outs)
    levels = [aug._level(random.Random(s)) for s in range(200)]
    assert 0 <= min(levels) and max(levels) <= 30
    if kind == "randaugment":
        assert abs(np.mean(levels) - 21) < 1.5  # level 7 of 10 → bin 21 of 30


@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
def test_randaugment_applies_each_operation_with_randaug_prob(prob, monkeypatch):
    """timm's RandAugment applies each of its operations with probability 0.5 (its AugmentOp),
    torchvision's always: the applied count per image is Binomial(randaug_ops, prob)."""
    aug = AutoAugment(AugConfig(auto_augment="randaugment", randaug_ops=2, randaug_prob=prob))
    applied = []
    apply = aug.policy._apply_image_or_video_transform
    monkeypatch.setattr(aug.policy, "_apply_image_or_video_transform",
                        lambda *a, **k: applied.append(1) or apply(*a, **k))
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    counts = []
    for seed in range(2000):
        before = len(applied)
        out = aug(image, random.Random(seed))
        counts.append(len(applied) - before)
        if counts[-1] == 0:
            assert torch.equal(out, image)
    assert np.mean(counts) == pytest.approx(2 * prob, abs=0.05)
    if 0 < prob < 1:  # the two operations are drawn independently
        assert np.mean(np.array(counts) == 0) == pytest.approx((1 - prob) ** 2, abs=0.03)


@pytest.mark.parametrize("kind", ["trivialaugment", "randaugment"])
def test_auto_augment_rotates_shears_and_translates_with_the_configured_interpolation(kind):
    """torchvision's reference recipe passes its bilinear to TrivialAugmentWide; the policies'
    own default, nearest, which fasttrain used, aliases every rotated or sheared edge."""
    import torchvision.transforms.v2 as v2
    import torchvision.transforms.v2.functional as TF

    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    for mode in ("bilinear", "nearest"):
        aug = AutoAugment(AugConfig(auto_augment=kind, auto_augment_interpolation=mode,
                                    randaug_ops=1, randaug_magnitude=10))
        rotated = []
        apply = aug.policy._apply_image_or_video_transform

        def spy(img, name, magnitude, **kwargs):
            out = apply(img, name, magnitude, **kwargs)
            if name == "Rotate":
                rotated.append((out, magnitude))
            return out

        aug.policy._apply_image_or_video_transform = spy
        for seed in range(400):
            aug(image, random.Random(seed))
        assert rotated, "no Rotate drawn"
        for out, magnitude in rotated:
            expected = TF.rotate(image, magnitude, interpolation=v2.InterpolationMode(mode))
            assert torch.equal(out, expected), (mode, magnitude)
    assert AugConfig().auto_augment_interpolation == "bilinear"


def test_horizontal_flip_equals_torchvision_in_either_memory_layout():
    import torchvision.transforms.v2.functional as TF

    from fasttrain.data.transforms import horizontal_flip
    hwc = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8).permute(2, 0, 1)  # a crop
    chw = hwc.contiguous()
    for image in (hwc, chw):
        flipped = horizontal_flip(image)
        assert torch.equal(flipped, TF.horizontal_flip(image))
    assert horizontal_flip(hwc).permute(1, 2, 0).is_contiguous()  # the crop's layout kept


def test_torch_threads_restores_the_callers_count_after_an_error():
    from fasttrain.data.loader import torch_threads
    kept = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            torch.set_num_threads(2)
            raise RuntimeError
    assert torch.get_num_threads() == kept


@pytest.mark.parametrize("shape", [(280, 300), (230, 240), (100, 90), (224, 224), (7, 500)])
def test_resize_square_equals_torchvision(shape):
    import torchvision.transforms.v2.functional as TF

    from fasttrain.data.transforms import resize_square
    gen = torch.Generator().manual_seed(0)
    crop = torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=gen).permute(2, 0, 1)
    for image in (crop, crop.contiguous(), crop.float()):  # fast path, then the fallbacks
        resized = resize_square(image, 224)
        assert torch.equal(resized, TF.resize(image, [224, 224], antialias=True))
    assert resize_square(crop, 224).permute(1, 2, 0).is_contiguous()  # the crop's layout kept
