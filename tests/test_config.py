"""Typed config: recipes, base inheritance, overrides, and one-line errors with exit code 2."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fasttrain import config
from conftest import load_tool
from fasttrain.config import ConfigError, load

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_defaults_and_recipe_values(tmp_path):
    path = write(tmp_path, "r.yaml", "optim:\n  lr: 0.4\nmodel:\n  width: 1\n")
    cfg = load(path)
    assert cfg.optim.lr == 0.4
    assert cfg.model.width == 1.0 and isinstance(cfg.model.width, float)
    assert cfg.optim.momentum == 0.9  # default kept


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "optim:\n  lr: 0.4\n  momentum: 0.8\nschedule:\n  epochs: 5\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\noptim:\n  lr: 0.1\n")
    cfg = load(child, ["--schedule.epochs=7", "--aug.scale=[0.2, 0.9]", "--train.compile=true"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.schedule.epochs) == (0.1, 0.8, 7)
    assert cfg.aug.scale == [0.2, 0.9]
    assert cfg.train.compile is True


def test_an_error_in_a_base_file_names_that_file(tmp_path, monkeypatch):
    """A bad value or unknown key in a `base:` file was reported against the recipe naming it,
    where it is not; `base: ~/x.yaml` was not expanded, `base: ""` said "Is a directory", and
    a missing base did not say which recipe named it."""
    write(tmp_path, "base.yaml", "optim:\n  lr: -1\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel:\n  width: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load(child)
    assert str(e.value) == f"{tmp_path / 'base.yaml'}: optim.lr must be > 0, got -1"
    # a value the child gives is the child's; a section the child replaces whole, too
    write(tmp_path, "base.yaml", "sched: {}\noptim:\n  momentum: 0.8\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'base.yaml'))}: "
                                          r"unknown section 'sched'"):
        load(child)
    write(tmp_path, "base.yaml", "optim:\n  lrr: 0.1\n  momentum: 0.8\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'base.yaml'))}: "
                                          r"unknown key optim.lrr"):
        load(child)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'c3.yaml'))}: "
                                          r"unknown key optim.lrr"):
        load(write(tmp_path, "c3.yaml", "base: base.yaml\noptim:\n  lrr: 0.3\n"))
    write(tmp_path, "base.yaml", "optim:\n  momentum: 0.8\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'c4.yaml'))}: "
                                          r"optim.momentum must be < 1"):
        load(write(tmp_path, "c4.yaml", "base: base.yaml\noptim: {momentum: 2}\n"))
    # base paths: ~ expanded; empty, a folder or a missing file named with the recipe
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "sub").mkdir()
    assert load(write(tmp_path / "sub", "c5.yaml", "base: ~/base.yaml\n")
                ).optim.momentum == 0.8
    for base, why in (('""', 'base: must be a recipe file\'s path, got \'\''),
                      (".", "base: .: is a directory"),
                      ("nope.yaml", "base: nope.yaml: recipe file not found")):
        recipe = write(tmp_path, "c6.yaml", f"base: {base}\n")
        with pytest.raises(ConfigError) as e:
            load(recipe)
        assert str(e.value).startswith(f"{recipe}: {why}"), str(e.value)


def test_dump_round_trips(tmp_path):
    cfg = load(ROOT / "recipes" / "quickstart.yaml", ["--optim.lr=0.3"])
    again = load(write(tmp_path, "resolved.yaml", config.dump(cfg)))
    assert again == cfg


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    """YAML 1.2 floats: PyYAML's YAML 1.1 resolver reads 1e-3 as a string."""
    path = write(tmp_path, "r.yaml", "optim:\n  lr: 1e-3\n  weight_decay: 5e-4\n"
                 "model:\n  name: thin_resnet50\nlog:\n  name: '1e3'\n")
    cfg = load(path, ["--optim.eps=1E-8", "--optim.max_grad_norm=+2e0"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.eps) == (1e-3, 5e-4, 1e-8)
    assert cfg.optim.max_grad_norm == 2.0
    assert (cfg.model.name, cfg.log.name) == ("thin_resnet50", "1e3")
    # dump quotes a string that now reads as a float, so the run's config.yaml loads back
    assert load(write(tmp_path, "resolved.yaml", config.dump(cfg))) == cfg


def test_merge_keys_are_not_duplicates(tmp_path):
    path = write(tmp_path, "r.yaml", "optim: {<<: {lr: 0.1, momentum: 0.5}, lr: 0.2}\n")
    cfg = load(path)
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.2, 0.5)


def test_bounds_accept_their_limits(tmp_path):
    cfg = load(None, [f"--train.seed={2**63 - 1}", "--train.threads=4096", "--model.width=16",
                      "--model.channel_divisor=512", "--schedule.kind=step",
                      "--schedule.milestones=[0, 30]", "--schedule.epochs=31"])
    assert cfg.train.seed == 2**63 - 1 and cfg.schedule.milestones == [0, 30]
    # a run cut short of its recipe keeps the recipe's milestones
    assert load(write(tmp_path, "short.yaml", "schedule:\n  kind: step\n  epochs: 2\n")
                ).schedule.milestones == [30, 60, 80]
    load(None, ["--schedule.kind=triangular", "--schedule.peak_epoch=3.5", "--schedule.epochs=4"])


@pytest.mark.parametrize("text,override,message", [
    ("optim:\n  lrr: 0.1\n", [], "r.yaml: unknown key optim.lrr (did you mean 'lr'?)"),
    # suggestions were case-sensitive: LR got none
    ("optim:\n  LR: 0.1\n", [], "r.yaml: unknown key optim.LR (did you mean 'lr'?)"),
    ("Optim:\n  lr: 0.1\n", [], "r.yaml: unknown section 'Optim' (did you mean 'optim'?)"),
    ("optimm:\n  lr: 0.1\n", [], "r.yaml: unknown section 'optimm' (did you mean 'optim'?)"),
    # a misspelt section with no keys was accepted; a key that is not text a TypeError
    ("optimm: {}\n", [], "r.yaml: unknown section 'optimm' (did you mean 'optim'?); "
     "sections: data, aug, model,"),
    ("1:\n  lr: 0.1\n", [], "r.yaml: unknown section 1; sections: data, aug,"),
    ("true: {}\n", [], "r.yaml: unknown section True; sections: data, aug,"),
    ("optim:\n  lr: fast\n", [], "r.yaml: optim.lr must be a number, got 'fast'"),
    ("optim:\n  lr: -1\n", [], "r.yaml: optim.lr must be > 0, got -1"),
    # typos that were a multi-terabyte allocation's traceback, or an epoch that never ended
    ("aug:\n  padding: 1000000\n", [], "r.yaml: aug.padding must be <= 256, got 1000000"),
    ("", ["--data.ra_reps=1000000000"], "--data.ra_reps=1000000000: data.ra_reps must be <= 64"),
    ("", ["--aug.randaug_ops=100000000"], "aug.randaug_ops must be <= 16, got 100000000"),
    # an unset shell variable (`--log.dir=$RUNS`) wrote runs into the current folder
    ("", ["--log.dir="], "--log.dir=: log.dir must name a folder (empty: an unset shell "
     "variable?), got ''"),
    ("optim:\n  lr: .inf\n", [], "r.yaml: optim.lr must be a finite number, got inf"),
    ("", ["--model.width=.nan"], "--model.width=.nan: model.width must be a finite number, "
     "got nan"),
    ("aug:\n  ratio: [0.75, .inf]\n", [], "aug.ratio must be a finite number"),
    ("schedule:\n  epochs: 2.5\n", [], "schedule.epochs must be an integer, got 2.5"),
    ("train:\n  precision: fp8\n", [], "train.precision must be one of 'bf16', 'fp16', 'fp32'"),
    ("", ["--train.compile_mode=fast"], "train.compile_mode must be one of 'default', "
     "'reduce-overhead'"),
    ("model:\n  zero_init_residual: 1\n", [], "model.zero_init_residual must be true or false"),
    ("data:\n  mean: [0.5]\n", [], "data.mean must have 3 elements"),
    ("aug:\n  scale: [0.9, 0.1]\n", [], "aug.scale must be [low, high]"),
    ("optim: 3\n", [], "section 'optim' must be a mapping"),
    ("- a\n- b\n", [], "a recipe must be a mapping of sections"),
    ("optim:\n  lr: [\n", [], "invalid YAML"),
    ("", ["--optim.lr=abc"], "--optim.lr=abc: optim.lr must be a number, got 'abc'"),
    ("", ["--optim"], "expected --section.key=value"),
    # argparse's form (a space, not `=`) is named with its fix
    ("", ["--optim.lr", "0.2"], "override '--optim.lr': expected --section.key=value (write "
     "--optim.lr=0.2)"),
    ("", ["--log.name", "my run"], "(write --log.name='my run')"),
    ("", ["--data.dataset=imagenet"], "data.dataset must be one of 'digits'"),
    ("", ["--data.dataset=imagefolder"], "data.path is required"),
    ("base: missing.yaml\n", [], "missing.yaml: recipe file not found"),
    (b"PK\x03\x04\x80\x00\x00", [], "r.yaml: not a text (YAML) recipe file (byte 0x80 at "
     "offset 4 is not UTF-8)"),
    (b"optim:\n  lr: \x00\n", [], "r.yaml: not a text (YAML) recipe file (character #x0000 "
     "at offset 13)"),
    ("optim:\n  lr: !!python/object/apply:os.getcwd []\n", [], "invalid YAML"),
    ("optim:\n  lr: 0.1\n  lr: 0.5\n", [], "r.yaml: line 3: duplicate key 'lr'"),
    ("optim: {lr: 0.1, lr: 0.5}\n", [], "r.yaml: line 1: duplicate key 'lr'"),
    ("optim:\n  lr: 0.1\noptim:\n  momentum: 0.5\n", [], "r.yaml: line 3: duplicate key 'optim'"),
    ("", ["--model.channels={stem: 8, stem: 16}"], "--model.channels={stem: 8, stem: 16}: "
     "duplicate key 'stem'"),
    ("", ["--data.batch_size=1e3"], "--data.batch_size=1e3: data.batch_size must be an integer, "
     "got 1000.0"),
    ("", ["--model.width=1.0e+4"], "model.width must be <= 16, got 10000.0"),
    ("", ["--model.channel_divisor=100000"], "model.channel_divisor must be <= 512, got 100000"),
    ("", ["--train.threads=100000"], "train.threads must be <= 4096, got 100000"),
    ("", [f"--train.seed={2**64}"], f"train.seed must be <= {2**63 - 1}, got {2**64}"),
    ("", [f"--train.seed={2**63}"], f"train.seed must be <= {2**63 - 1}, got {2**63}"),
    ("", ["--train.seed=-1"], "train.seed must be >= 0, got -1"),
    # typos that torch would meet as an allocation until killed, or thousands of processes
    ("", ["--data.val_resize=100000"], "data.val_resize must be <= 8192, got 100000"),
    ("", ["--data.train_res=100000"], "data.train_res must be <= 8192, got 100000"),
    # a typo trained a whole epoch at min_res, then failed to allocate at max_res
    ("", ["--data.max_res=1000000"], "data.max_res must be <= 8192, got 1000000"),
    ("", ["--data.min_res=1000000"], "data.min_res must be <= 8192, got 1000000"),
    ("", ["--model.num_classes=100000000"], "model.num_classes must be <= 100000"),
    ("", ["--data.num_workers=100000"], "data.num_workers must be <= 1024, got 100000"),
    # a path would put the run into any existing folder, over a config.yaml not a run's
    ("", ["--log.name=.."], "--log.name=..: log.name must be a plain folder name"),
    ("", ["--log.name=a/b"], "log.name must be a plain folder name (no path separator, not . "
     "or .., no control character; log.dir says where runs go), got 'a/b'"),
    ("", ["--log.name=a\nb"], "--log.name=a\\nb: log.name must be a plain folder name"),
    # the override echoed as typed made a two-line message
    ("", ["--optim.lr=0.2\nx"], "--optim.lr=0.2\\nx: optim.lr must be a number, got '0.2 x'"),
    ("", ["--data.x\ny=1"], "--data.x\\ny=1: unknown key data.x\\ny"),
    # 10**30 overflowed torch's samplers in a traceback after the first training step
    ("", [f"--data.val_batch_size={10**30}"], f"data.val_batch_size must be <= 16777216, got "
     f"{10**30}"),
    ("", [f"--data.batch_size={2**24 + 1}"], f"data.batch_size must be <= 16777216, got "
     f"{2**24 + 1}"),
    ("schedule:\n  kind: triangular\n  epochs: 16\n  peak_epoch: 20\n", [],
     "r.yaml: schedule.peak_epoch must be < schedule.epochs (16) for schedule.kind=triangular, "
     "got 20.0"),
    ("schedule:\n  milestones: [-3, 5]\n", [], "r.yaml: schedule.milestones must be >= 0, "
     "got [-3, 5]"),
    ("schedule:\n  kind: step\n  milestones: [60, 30]\n", [], "r.yaml: schedule.milestones "
     "must be increasing for schedule.kind=step, got [60, 30]"),
    ("model:\n  name: thin_resnet18\n  shortcut: B\n", [], "r.yaml: model.shortcut=B applies "
     "to the cifar_resnet* models only (model.name=thin_resnet18 always projects)"),
])
def test_errors_name_file_key_and_value(tmp_path, text, override, message):
    path = write(tmp_path, "r.yaml", text)
    with pytest.raises(ConfigError) as info:
        load(path, override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text,override,message", [
    # the recipe alone is consistent: the overrides that set a key the check names caused it
    ("schedule:\n  epochs: 5\n  warmup_epochs: 2\n", ["--optim.lr=0.2", "--schedule.epochs=1"],
     "--schedule.epochs=1: schedule.warmup_epochs must be <= schedule.epochs (1), got 2.0"),
    ("", ["--aug.scale=[0.9,0.1]"], "--aug.scale=[0.9,0.1]: aug.scale must be [low, high], "
     "got [0.9, 0.1]"),
    ("", ["--schedule.kind=step", "--schedule.milestones=[5, 3]"], "--schedule.kind=step "
     "--schedule.milestones=[5, 3]: schedule.milestones must be increasing for "
     "schedule.kind=step, got [5, 3]"),
    # the recipe alone is not: it is named, with the overrides that touched the keys
    ("schedule:\n  epochs: 5\n  warmup_epochs: 9\n", ["--optim.lr=0.2"],
     "{r}: schedule.warmup_epochs must be <= schedule.epochs (5), got 9.0"),
    ("schedule:\n  epochs: 5\n  warmup_epochs: 9\n", ["--schedule.epochs=3"],
     "{r} with --schedule.epochs=3: schedule.warmup_epochs must be <= schedule.epochs (3), "
     "got 9.0"),
])
def test_cross_key_errors_name_who_caused_them(tmp_path, text, override, message):
    path = write(tmp_path, "r.yaml", text)
    with pytest.raises(ConfigError) as info:
        load(path, override)
    assert str(info.value) == message.replace("{r}", str(path))


ONLY_FFCV = "(only the ffcv backend does); remove it or use data.backend=ffcv"
ONLY_TORCH_FFCV = ("(only the torch and ffcv backends do); remove it or use data.backend=torch "
                   "or ffcv")


@pytest.mark.parametrize("override,message", [
    (["--data.backend=dali", "--data.ffcv_order=quasi_random"],
     f"data.backend=dali does not read data.ffcv_order=quasi_random {ONLY_FFCV}"),
    (["--data.ffcv_resize=opencv"],
     f"data.backend=torch does not read data.ffcv_resize=opencv {ONLY_FFCV}"),
    (["--data.ffcv_os_cache=false"],
     f"data.backend=torch does not read data.ffcv_os_cache=false {ONLY_FFCV}"),
    (["--data.backend=resident", "--data.ffcv_order=quasi_random"],
     f"data.backend=resident does not read data.ffcv_order=quasi_random {ONLY_FFCV}"),
    (["--data.backend=dali", "--data.region_decode=false"],
     f"data.backend=dali does not read data.region_decode=false {ONLY_TORCH_FFCV}"),
    (["--data.backend=resident", "--data.region_decode=false"],
     f"data.backend=resident does not read data.region_decode=false {ONLY_TORCH_FFCV}"),
    (["--data.backend=ffcv", "--data.val_res=288"], "data.backend=ffcv center-crops inside the "
     "resized image: data.val_res=288 must be <= data.val_resize=256 (the other backends "
     "zero-pad the border)"),
])
def test_a_key_the_backend_does_not_read_is_an_error(override, message):
    with pytest.raises(ConfigError) as info:
        load(None, override)
    assert str(info.value) == " ".join(override) + ": " + message  # one line, naming the args


@pytest.mark.parametrize("backend", ["torch", "ffcv", "dali", "resident"])
def test_backend_keys_at_their_defaults_or_on_their_backend_are_accepted(backend):
    load(None, [f"--data.backend={backend}", "--data.ffcv_dir=/elsewhere"])  # write_ffcv reads it
    for key, readers in config.BACKEND_KEYS.items():
        default = getattr(config.DataConfig(), key)
        load(None, [f"--data.backend={backend}", f"--data.{key}={str(default).lower()}"])
        if backend in readers:
            other = {"ffcv_order": "quasi_random", "ffcv_os_cache": "false",
                     "ffcv_resize": "opencv", "region_decode": "false"}[key]
            assert getattr(load(None, [f"--data.backend={backend}", f"--data.{key}={other}"]
                               ).data, key) != default
    if backend != "ffcv":  # they zero-pad a crop larger than the resized image
        load(None, [f"--data.backend={backend}", "--data.val_res=288"])


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load(tmp_path / "a.yaml")


@pytest.mark.parametrize("args,message", [
    (["missing.yaml"], "error: missing.yaml: recipe file not found"),
    (["{q}", "--optim.lrr=1"], "error: --optim.lrr=1: unknown key optim.lrr"),
    (["{q}", "--optim.lr=-3"], "error: --optim.lr=-3: optim.lr must be > 0, got -3"),
    (["{q}", "--model.name=thin_resnet5"], "model.name 'thin_resnet5' is not a registered model"
     " (did you mean 'thin_resnet50'?); registered: cifar_resnet110, cifar_resnet20, "),
    (["{q}", "--model.name=bogus"], "model.name 'bogus' is not a registered model; registered: "
     "cifar_resnet110, cifar_resnet20, cifar_resnet32, cifar_resnet44, cifar_resnet56, "
     "thin_resnet101, thin_resnet152, thin_resnet18, thin_resnet34, thin_resnet50"),
    (["{q}", "--data.batch_size=100000"], "larger than the training set"),
    (["{q}", "--nonsense"], "expected --section.key=value"),
    (["{q}", "--resume", "/nowhere/last.pt"], "no checkpoint at"),
    ([], "error: the following arguments are required: recipe"),
    (["last.pt", "--dry-run"], "error: last.pt: not a text (YAML) recipe file"),
    (["{q}", "--schedule.epochs=1"], "error: --schedule.epochs=1: schedule.warmup_epochs must be "
     "<= schedule.epochs (1), got 2.0"),
    (["{q}", "--train.seed=18446744073709551616"], "train.seed must be <= 9223372036854775807"),
    (["{q}", "--train.threads=100000"], "train.threads must be <= 4096"),
    (["{q}", "--model.width=1.0e+4"], "model.width must be <= 16"),
    (["{q}", "--resume", ""], "error: argument --resume: empty path"),  # an unset $CKPT
    (["{q}", "--log.dir={file}/runs", "--dry-run"], "/a_file is a file, not a folder"),
])
def test_train_cli_user_errors_exit_2_with_one_line(run_tool, tmp_path, args, message):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04" + bytes(range(128, 256)))  # not UTF-8
    (tmp_path / "a_file").write_text("kept")
    args = [a.replace("{q}", str(ROOT / "recipes" / "quickstart.yaml"))
            .replace("{file}", str(tmp_path / "a_file")) for a in args]
    result = run_tool("train.py", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_keys_lists_every_key_once_with_a_value_that_reads_back():
    """`tools/train.py --keys`: each line's value, pasted into a recipe or an override, gives
    that value back; its type and bounds are the ones `load` enforces."""
    cfg = load(ROOT / "recipes" / "quickstart.yaml", ["--data.batch_size=32"])
    lines = config.describe(cfg)
    fields = [(s, f.name) for s in config.SECTIONS
              for f in config.dataclasses.fields(getattr(cfg, s))]
    assert [line.split(" = ")[0] for line in lines] == [f"{s}.{k}" for s, k in fields]
    for line, (section, key) in zip(lines, fields):
        value = line.split(" = ", 1)[1].split("  (", 1)[0]
        again = load(None, [f"--{section}.{key}={value}"]) if value != "''" else None
        if again is not None:
            assert getattr(getattr(again, section), key) == getattr(getattr(cfg, section), key), line
    by_key = {line.split(" = ")[0]: line for line in lines}
    assert by_key["data.batch_size"].startswith("data.batch_size = 32  (an integer; >= 1, "
                                                "<= 16777216)  global")
    assert by_key["aug.scale"].startswith("aug.scale = [0.6, 1.0]  (a list of numbers; 2 "
                                          "elements, > 0, <= 1)  RandomResizedCrop area")
    assert by_key["data.backend"].startswith("data.backend = resident  (one of 'torch', 'ffcv'")
    assert config.describe()[0].startswith("data.dataset = digits")  # the defaults


def test_train_tool_keys_needs_no_recipe_and_exits_0(capsys):
    train_tool = load_tool("train")
    assert train_tool.main(["--keys"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == config.describe()
    assert train_tool.main(["--keys", str(ROOT / "recipes" / "quickstart.yaml"),
                            "--optim.lr=0.05"]) == 0
    assert "optim.lr = 0.05  (a number; > 0)" in capsys.readouterr().out
    assert train_tool.main(["--keys", str(ROOT / "recipes" / "quickstart.yaml"),
                            "--optim.lr=-1"]) == 2
    assert capsys.readouterr().err.startswith("error: --optim.lr=-1: optim.lr must be > 0")
    with pytest.raises(SystemExit) as e:
        train_tool.main([])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: the following arguments are required: recipe\n"
    # an ImageNet recipe names no data.path: its keys are listed all the same, a run needs it
    imagenet = str(ROOT / "recipes" / "thin_r50_w0.5.yaml")
    assert train_tool.main(["--keys", imagenet]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("model.width = 0.5  ") for line in listed)
    assert train_tool.main([imagenet, "--dry-run"]) == 2
    assert "data.path is required" in capsys.readouterr().err


def test_among_overrides_the_last_of_a_key_wins_and_a_file_refuses_duplicates(tmp_path):
    """Shared overrides in a shell variable followed by a change of one of them: the change
    wins, as with any command-line flag; inside one YAML file a repeated key is a typo."""
    cfg = load(None, ["--optim.lr=0.1", "--model.width=0.5", "--optim.lr=0.2"])
    assert (cfg.optim.lr, cfg.model.width) == (0.2, 0.5)
    with pytest.raises(ConfigError, match=r"r.yaml: line 3: duplicate key 'lr'"):
        load(write(tmp_path, "r.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n"))


def test_a_text_key_override_is_taken_as_typed():
    """YAML read `--log.name=2024-01-01` as a date and `123` as a number: refused, although
    the user typed a name."""
    cfg = load(None, ["--log.name=2024-01-01", "--log.dir=123", "--data.path=~"])
    assert (cfg.log.name, cfg.log.dir, cfg.data.path) == ("2024-01-01", "123", "~")
    assert load(None, ["--log.name=run 1"]).log.name == "run 1"
    # YAML's reading of text changed the name: `exp #2` was `exp` (a comment), 'a' was a
    for typed in ("exp #2", "'quoted'", "[a]", "a: b", "|"):
        assert load(None, [f"--log.name={typed}"]).log.name == typed
    assert load(None, ["--data.path=/data/set #1"]).data.path == "/data/set #1"
    assert load(None, ["--log.progress= plain"]).log.progress == "plain"


def test_a_yaml_boolean_word_given_to_a_choice_is_named_as_typed():
    # --log.progress=off is YAML 1.1's False: the error said "got False"
    with pytest.raises(ConfigError, match=r"log.progress must be one of 'auto', 'rich', "
                                          r"'plain', got 'off'"):
        load(None, ["--log.progress=off"])
    assert load(None, ["--train.device=cpu"]).train.device == "cpu"


def test_numbers_and_booleans_are_read_as_yaml_1_2_in_recipes_and_overrides(tmp_path):
    """YAML 1.1 read `epochs: 010` as octal 8 and `seed: 1:20` as sexagesimal 80, silently;
    `progress: off` in a recipe as False ("got False") where the override said "got 'off'";
    `name: no` as False."""
    recipe = write(tmp_path, "r.yaml", "schedule:\n  epochs: 010\ntrain:\n  seed: 1_000\n"
                                       "log:\n  name: no\n")
    cfg = load(recipe)
    assert (cfg.schedule.epochs, cfg.train.seed, cfg.log.name) == (10, 1000, "no")
    cfg = load(None, ["--schedule.epochs=010", "--train.seed=0x10", "--data.batch_size=0o20",
                      "--train.deterministic=true"])
    assert (cfg.schedule.epochs, cfg.train.seed, cfg.data.batch_size) == (10, 16, 16)
    assert cfg.train.deterministic is True
    for text, message in [("train:\n  seed: 1:20\n", "train.seed must be an integer, got '1:20'"),
                          ("log:\n  progress: off\n", "log.progress must be one of 'auto', "
                                                       "'rich', 'plain', got 'off'"),
                          ("train:\n  deterministic: yes\n",
                           "train.deterministic must be true or false, got 'yes'")]:
        with pytest.raises(ConfigError, match=re.escape(f"r.yaml: {message}")):
            load(write(tmp_path, "r.yaml", text))
        section, rest = text.split(":\n  ")
        key, value = rest.strip().split(": ")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(None, [f"--{section}.{key}={value}"])
    # a dump quotes the names either YAML version would read as something else
    for name in ("0o17", "off", "010", "1:20", "yes"):
        cfg = load(None, [f"--log.name={name}"])
        dumped = write(tmp_path, "dumped.yaml", config.dump(cfg))
        assert load(dumped).log.name == name
        assert f"name: '{name}'" in dumped.read_text()


def test_load_mapping_refuses_what_is_not_a_mapping_of_sections():
    from fasttrain.config import load_mapping

    with pytest.raises(ConfigError, match=r"^stored: a config must be a mapping of sections, "
                                          r"got list$"):
        load_mapping([1, 2], "stored")
    cfg = load(None, ["--data.batch_size=8", "--model.width=0.5"])
    assert load_mapping(cfg.to_dict(), "again") == cfg


def test_a_value_of_nested_yaml_aliases_is_refused_with_a_short_line(tmp_path):
    # each level holds the previous one 9 times: a few lines whose repr in the message was
    # 9**6 elements long (9**9 in the file that hung for minutes)
    levels = ['&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for name, prev in zip("bcdef", "abcde"):
        levels.append(f"&{name} [{', '.join([f'*{prev}'] * 9)}]")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  width: [{', '.join(levels)}]\n")
    with pytest.raises(ConfigError, match=r"r.yaml: model.width must be a number, got \[\[") as e:
        load(recipe)
    assert len(str(e.value)) < 1000, len(str(e.value))


@pytest.mark.parametrize("override", ["--log.name=a\0b", "--data.path=/data/a\0b",
                                      "--model.init_from=x\0.pt"])
def test_a_nul_character_in_a_text_key_is_a_config_error(override):
    # os functions raised "embedded null byte" (a traceback) once training touched the path
    key = override[2:].partition("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} contains a NUL character, got '"):
        load(None, [override])


def test_train_keys_into_a_closed_pipe_is_quiet():
    # `train.py --keys | head -1`: a BrokenPipeError traceback (exit 1, or 120 at exit)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--keys"],
                            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("tool, args", [
    ("benchmark", ["--checkpoint", "a.pt", "--checkpoint=b.pt"]),
    ("benchmark", ["--model", "thin_resnet50", "--json", "x.json", "--json", "y.json"]),
    ("evaluate", ["--file", "a.ts", "--file", "b.ts"]),
    ("export", ["--model", "thin_resnet50", "--out", "a.pt", "--out", "b.pt"]),
    ("prune", ["last.pt", "--out", "a.pt", "--target-width", "0.5", "--out", "b.pt"]),
    ("train", ["--resume", "auto", "--resume", "x"]),
])
def test_an_option_given_twice_is_refused_not_the_last_kept(tool, args, capsys, tmp_path,
                                                            monkeypatch):
    """argparse keeps an option's last value silently: `--checkpoint a.pt --checkpoint b.pt`
    measured b.pt alone, `--out` twice wrote one file."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        load_tool(tool).main(args)
    err = capsys.readouterr().err
    option = args[-2] if "=" not in args[-1] else args[-1].partition("=")[0]
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {option} given twice (") and err.endswith("); give it once\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tool", ["benchmark", "check_data", "compare", "evaluate", "export",
                                  "prune", "train", "write_ffcv"])
def test_help_names_the_defaults_and_never_none(tool, capsys, monkeypatch):
    # --help said "timed calls per row" for --iters 100: the defaults were in the README only
    monkeypatch.setenv("COLUMNS", "200")  # one option per line
    with pytest.raises(SystemExit) as e:
        load_tool(tool).main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for shown in ("(default: None)", "(default: False)", "(default: )", "(default: [",
                  "(default: ("):
        assert shown not in text, (tool, shown)
    expected = {"benchmark": ["--iters ITERS  timed calls per row (default: 100)",
                              "--precision {fp32,bf16,fp16}  default: fp32",
                              "--batch-size BATCH_SIZE  e.g. 1,8,64 (default: 1)"],
                "prune": ["(default: l1)", "(default: global)"],
                "export": ["--atol ATOL  parity: absolute tolerance (default: 0.0001)",
                           "--parity-batch-sizes B1,B2  default: 1,3"],
                "write_ffcv": ["(default: 90)"],
                # 0 == False: a zero default was taken for an unset flag and not shown
                "check_data": ["(0 = all cores) (default: 0)"]}
    squeezed = " ".join(text.split())
    for line in expected.get(tool, []):
        assert " ".join(line.split()) in squeezed, (tool, line)


def test_a_key_set_by_attribute_must_exist_and_a_section_keep_its_class():
    """`cfg.model.widht = 0.5` in a notebook was kept as a stray attribute that train() never
    read: the run trained the recipe's width without a word."""
    import copy
    import dataclasses
    import pickle

    cfg = load(ROOT / "recipes" / "quickstart.yaml")
    with pytest.raises(AttributeError, match=r"^ModelConfig has no key 'widht' \(did you mean "
                                             r"'width'\?\)$"):
        cfg.model.widht = 0.5
    with pytest.raises(AttributeError, match="OptimConfig has no key 'lrr'"):
        cfg.optim.lrr = 9.0
    # a dict in a section's place read as a partial section: every other key at its default
    with pytest.raises(TypeError, match="^Config.model must be a ModelConfig, got dict$"):
        cfg.model = {"width": 0.5}
    cfg.model.width = 0.75  # declared keys as before, and the copies a program makes
    cfg.model = dataclasses.replace(cfg.model, num_classes=7)
    for copied in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert (copied.model.width, copied.model.num_classes) == (0.75, 7)
    assert cfg.to_dict()["model"]["width"] == 0.75
