#!/usr/bin/env python
"""Time the README's quickstart command end to end and record what it reached.

    bash tools/env.sh python benchmarks/bench_quickstart.py --repeats 2

Runs `torchrun --nproc_per_node=1 tools/train.py recipes/quickstart.yaml --data.backend=B` (set-up
already done, digits already cached) `--repeats` times per data backend, the backends taking turns
(so a slow spell of the machine hits them alike), each into a fresh log directory, and measures
per run: whole-command wall time (process start to exit, torch import and
torchrun included), the training time the run reports (training + validation epochs), the final
and best validation top-1 and the first epoch reaching the 98.5 % target. Writes
`benchmarks/results/quickstart-cpu-<cores>c.json` (the cores it may run on; a run of other
backends than the four defaults adds their names, `-torch+resident`) with the conditions
(CPU model, cores, torch, commit, date) and prints a table.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _args import (check_out, fail, items, partial_out, settings_suffix,  # noqa: E402
                   subset_suffix, whole_rounds_kept, write_json)
from fasttrain.cli import ArgumentParser, int_at_least, sigterm_as_interrupt  # noqa: E402

RECIPE = ROOT / "recipes" / "quickstart.yaml"
DEFAULT_BACKENDS = "torch,resident,dali,ffcv"
TARGET_TOP1 = 98.5


def train_errors(stderr: str) -> list[str]:
    """train.py's own one-line errors in a failed run's stderr, without torchrun's report
    around them (whose traceback would otherwise bury them)."""
    return list(dict.fromkeys(line for line in stderr.splitlines()
                              if line.startswith("error: ")))


def run_stopping_on_interrupt(cmd: list[str], grace_s: float = 30.0):
    """subprocess.run(cmd) with output captured, except that a KeyboardInterrupt (Ctrl-C, or
    SIGTERM through sigterm_as_interrupt) stops the child with SIGTERM and waits up to `grace_s`
    before killing it, then re-raises. subprocess.run kills at once, and a killed torchrun
    cannot stop its training worker, which then trained on alone after the benchmark ended."""
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            stdout, stderr = process.communicate()
        except KeyboardInterrupt:
            process.terminate()
            try:
                process.communicate(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
            raise
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def run_once(log_dir: Path, backend: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "tools" / "train.py"), str(RECIPE),
           f"--data.backend={backend}", f"--log.dir={log_dir}", "--log.progress=plain"]
    start = time.perf_counter()
    result = run_stopping_on_interrupt(cmd)
    wall = time.perf_counter() - start
    if result.returncode:
        errors = train_errors(result.stderr)
        if errors:  # train.py refused something: its words, one line each, as a user error
            fail("\n".join([f"quickstart --data.backend={backend} failed: "
                            f"{errors[0].removeprefix('error: ')}", *errors[1:]]))
        raise SystemExit(f"quickstart --data.backend={backend} failed ({result.returncode}); "
                         f"the end of its output:\n{result.stderr[-2000:]}")
    (metrics_file,) = log_dir.glob("*/metrics.jsonl")
    epochs = [json.loads(l) for l in metrics_file.read_text().splitlines()]
    hit = next((m for m in epochs if m["val_top1"] >= TARGET_TOP1), None)
    return {"wall_s": wall, "train_time_s": epochs[-1]["train_time_s"],
            "final_val_top1": epochs[-1]["val_top1"],
            "best_val_top1": max(m["val_top1"] for m in epochs),
            "epochs": len(epochs),
            "first_epoch_at_target": hit["epoch"] if hit else None,
            "train_time_at_target_s": hit["train_time_s"] if hit else None,
            "train_images_per_s_mean": statistics.mean(m["train_images_per_s"] for m in epochs)}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int_at_least(1), default=3)
    p.add_argument("--backends", default=DEFAULT_BACKENDS,
                   help="data backends to compare (default: %(default)s; another set is written "
                   "to a result file named after it)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: by conditions)")
    args = p.parse_args(argv)
    from fasttrain.config import load
    from fasttrain.errors import ConfigError

    backends = items("--backends", args.backends)
    for backend in backends:  # the recipe as train.py will load it, before torchrun starts
        try:
            load(RECIPE, [f"--data.backend={backend}"])
        except ConfigError as e:
            fail(f"--backends {args.backends!r}: {e}")
    import torch

    from fasttrain.measure.env import cpu_name, git_commit, usable_cores
    cores = usable_cores()
    out = check_out(args.out, ROOT / "benchmarks" / "results" / f"quickstart-cpu-{cores}c"
                    f"{subset_suffix(backends, DEFAULT_BACKENDS.split(','))}"
                    f"{settings_suffix(args, p, ['repeats'])}.json")

    from fasttrain.data import build_digits
    from fasttrain.data.datasets import default_root

    # The digits' JPEG files are written on first use: before the first timed run, not in it.
    build_digits(default_root("digits"))
    if "ffcv" in backends:  # the quickstart's FFCV files, written once (not timed)
        from fasttrain.data.ffcv_loader import beton_dir, write_beton
        data = load(RECIPE).data
        if not (beton_dir(data) / "train.beton").exists():
            write_beton(data)
    runs: dict[str, list[dict]] = {b: [] for b in backends}  # complete repeats only
    try:
        for i in range(args.repeats):
            this_repeat = {}
            for backend in backends:
                tmp = Path(tempfile.mkdtemp(prefix="ft-quickstart-"))
                try:
                    r = run_once(tmp, backend) | {"load_avg_1m": os.getloadavg()[0]}
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                this_repeat[backend] = r
                print(f"{backend} run {i + 1}: wall {r['wall_s']:.1f} s, training "
                      f"{r['train_time_s']:.1f} s, final top-1 {r['final_val_top1']:.2f} %, "
                      f"best {r['best_val_top1']:.2f} %, target at epoch "
                      f"{r['first_epoch_at_target']}")
            for backend in backends:
                runs[backend].append(this_repeat[backend])
    except KeyboardInterrupt:
        whole_rounds_kept(len(runs[backends[0]]), args.repeats, "repeat")
    interrupted = len(runs[backends[0]]) < args.repeats
    result = {
        "benchmark": "quickstart",
        "command": "torchrun --nproc_per_node=1 tools/train.py recipes/quickstart.yaml "
                   "--data.backend=B",
        "conditions": {"device": "cpu", "cpu_model": cpu_name(), "cores": cores,
                       "torch": str(torch.__version__), "python": platform.python_version(),
                       "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
                       "target_val_top1": TARGET_TOP1},
        "repeats": len(runs[backends[0]]), "interrupted": interrupted,
        "backends": {b: {"runs": rs, "summary": {
            k: {"min": min(r[k] for r in rs), "max": max(r[k] for r in rs),
                "mean": statistics.mean(r[k] for r in rs)}
            for k in ("wall_s", "train_time_s", "final_val_top1", "best_val_top1")}}
            for b, rs in runs.items()},
    }
    if interrupted:
        out = partial_out(out)
    write_json(out, result)
    print(f"wrote {out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sigterm_as_interrupt()  # a time limit keeps the complete repeats
    sys.exit(main())
