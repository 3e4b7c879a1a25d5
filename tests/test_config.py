"""Typed config: recipes, base inheritance, overrides, and one-line errors with exit code 2."""
from pathlib import Path

import pytest

from fasttrain import config
from fasttrain.config import ConfigError, load

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
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


def test_dump_round_trips(tmp_path):
    cfg = load(ROOT / "recipes" / "quickstart.yaml", ["--optim.lr=0.3"])
    again = load(write(tmp_path, "resolved.yaml", config.dump(cfg)))
    assert again == cfg


@pytest.mark.parametrize("text,override,message", [
    ("optim:\n  lrr: 0.1\n", [], "r.yaml: unknown key optim.lrr (did you mean 'lr'?)"),
    ("optimm:\n  lr: 0.1\n", [], "r.yaml: unknown section 'optimm' (did you mean 'optim'?)"),
    ("optim:\n  lr: fast\n", [], "r.yaml: optim.lr must be a number, got 'fast'"),
    ("optim:\n  lr: -1\n", [], "r.yaml: optim.lr must be > 0, got -1"),
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
    ("", ["--data.dataset=imagenet"], "data.dataset must be one of 'digits'"),
    ("", ["--data.dataset=imagefolder"], "data.path is required"),
    ("base: missing.yaml\n", [], "missing.yaml: recipe file not found"),
])
def test_errors_name_file_key_and_value(tmp_path, text, override, message):
    path = write(tmp_path, "r.yaml", text)
    with pytest.raises(ConfigError) as info:
        load(path, override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load(tmp_path / "a.yaml")


@pytest.mark.parametrize("args,message", [
    (["missing.yaml"], "error: missing.yaml: recipe file not found"),
    (["{q}", "--optim.lrr=1"], "error: --optim.lrr=1: unknown key optim.lrr"),
    (["{q}", "--optim.lr=-3"], "error: --optim.lr=-3: optim.lr must be > 0, got -3"),
    (["{q}", "--model.name=thin_resnet5"], "model.name 'thin_resnet5' is not a registered model"),
    (["{q}", "--data.batch_size=100000"], "larger than the training set"),
    (["{q}", "--nonsense"], "expected --section.key=value"),
    (["{q}", "--resume", "/nowhere/last.pt"], "no checkpoint at"),
    ([], "error: the following arguments are required: recipe"),
])
def test_train_cli_user_errors_exit_2_with_one_line(run_tool, args, message):
    args = [a.replace("{q}", str(ROOT / "recipes" / "quickstart.yaml")) for a in args]
    result = run_tool("train.py", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
