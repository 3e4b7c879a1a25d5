#!/usr/bin/env bash
# The GPU checklist in one call, for a lent GPU host whose torch is already installed and that has
# no package index (the project's GPU hosts: torch 2.11, Python 3.12, no ffcv/DALI):
#
#   FASTTRAIN_COMMIT=$(git describe --always --dirty) OUT=<dir> bash benchmarks/gpu_checklist.sh [DEADLINE_S]
#
# (FASTTRAIN_COMMIT is recorded as given: `--dirty` keeps a run from uncommitted code honest.)
#
# 1. builds the native ops for the GPU (TORCH_CUDA_ARCH_LIST, default 9.0) and runs `pytest -m cuda`;
# 2. runs the benchmarks: training img/s of thin_resnet50 at w1.0@224 and w0.5@176 on GPU-resident
#    synthetic data (whole step in a CUDA graph; torch.compile with and without CUDA graphs; fused
#    and native norm+ReLU), where the fused BN+ReLU step's time goes (profile_bn_relu.py), fused
#    BN+ReLU vs eager vs torch.compile (bench_bn_relu.py), the inference latency sweep (CUDA
#    graphs), the CIFAR augmentation comparison with batches going to the GPU, and the JPEG
#    loaders on the host's 16 cores (bench_loaders.py: decode limit, PIL, torch backend).
# Steps run in priority order; each has its own time limit, cut at DEADLINE_S (default 560 s), and
# a step starts only while half its limit (at least 30 s) is left, so a short lease loses the least
# important numbers. A benchmark cut by its limit keeps the rows it measured (SIGTERM).
# Logs and benchmarks/results/ are packed into $OUT/gpu.tgz after every step, so whatever
# finished comes back even if the call is cut off. If the native CUDA ops are missing or stale
# after `build` (the `ext` step, which always runs), the script stops: every fused number would
# time the PyTorch fallback. It exits non-zero when a step failed; ONLY names are checked.
# Pure-Python packages the host may lack (fvcore, pytest and the plugins the cuda step uses, and
# their needs) are read from .gpu/site when that folder exists, and the built-in digits (which
# need scikit-learn to build) from .gpu/data (both git-ignored; made here with
# `python3 -m pip install --no-deps --no-compile --target .gpu/site fvcore iopath yacs termcolor
#  pytest==9.2.0 pluggy iniconfig packaging pygments pytest-timeout==2.4.0 pytest-xdist execnet`
# and `mkdir -p .gpu/data/digits && cp -r ~/.cache/fasttrain/data/digits/{train,val}
# .gpu/data/digits/` (not its ffcv/ files: ~50 MB of the 64 MiB a call carries), then carried
# with the call).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2  # every path below is the repository's
OUT=${OUT:-/tmp/fasttrain-gpu}
DEADLINE=${1:-560}
PY=${PYTHON:-python3}
LOGS=${LOGS:-/tmp/fasttrain-gpu-logs}
if ! [[ $DEADLINE =~ ^[0-9]+$ ]]; then
    echo "error: DEADLINE_S must be a whole number of seconds, got '$DEADLINE'" >&2; exit 2
fi
STEPS=$(sed -n 's/^\([A-Z]*=[^ ]* \)*step \([^ ]*\) .*/\2/p' "${BASH_SOURCE[0]}")
for name in ${ONLY:-}; do
    if ! grep -qx -- "$name" <<<"$STEPS"; then
        echo "error: ONLY names an unknown step '$name' (steps: $(echo $STEPS))" >&2; exit 2
    fi
done
mkdir -p "$OUT" "$LOGS"
rm -f "$LOGS/summary.txt"  # a rerun's summary is its own
FAILED=0
export PYTHONUNBUFFERED=1
[ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu/data ] && export FASTTRAIN_DATA="$PWD/.gpu/data"
SUMMARY="$LOGS/summary.txt"

# Written aside, then renamed: a call cut off during the tar leaves the previous archive whole.
pack() {
    tar czf "$OUT/.gpu.tgz.tmp" -C "$LOGS" . -C "$PWD" benchmarks/results 2>/dev/null \
        && mv -f "$OUT/.gpu.tgz.tmp" "$OUT/gpu.tgz"
}

# step NAME LIMIT_S CMD...: runs CMD under `timeout`, logs to $LOGS/NAME.log, records rc and time.
# SIG=INT step ...: the limit sends SIGINT (pytest writes its summary and JUnit file on it, on
# SIGTERM nothing).
# ONLY="name1 name2 ..." runs just those steps (a rerun of what a short lease cut off).
step() {
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
    shift 2
    # ext always runs: a rerun on a fresh machine must not time the fallback as 'fused'.
    if [ -n "${ONLY:-}" ] && [ "$name" != ext ] && [[ " $ONLY " != *" $name "* ]]; then
        return 0
    fi
    if [ "$left" -lt 30 ] || [ $((2 * left)) -lt "$limit" ]; then
        echo "$name: skipped (${left}s left)" | tee -a "$SUMMARY"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s, t=${SECONDS}s)"
    local t0=$SECONDS
    timeout --kill-after=10 -s "${SIG:-TERM}" "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    echo "$name: rc=$rc in $((SECONDS - t0))s" | tee -a "$SUMMARY"
    tail -n "${TAIL:-15}" "$LOGS/$name.log"
    pack
    return $rc
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,utilization.gpu \
        --format=csv
    "$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
    nvcc --version | tail -n 2
    nproc
} >"$LOGS/host.txt" 2>&1
cat "$LOGS/host.txt"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTTRAIN_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# In place, not `pip install -e .`: without a pyproject.toml the host's setuptools runs `develop`,
# which calls pip again with build isolation, and that needs a package index.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step build 240 "$PY" setup.py build_ext --inplace || BUILD_FAILED=1
CHECK_EXT="import torch; from fasttrain.ops import _ext
print(_ext.HAS_EXT, _ext.HAS_CUDA_EXT, _ext.BUILD_INFO)
gpu = torch.device('cuda')
assert _ext.supports(gpu), _ext.unavailable_reason(gpu)
assert not _ext.is_stale(), 'libraries built from other sources'"
step ext 60 "$PY" -c "$CHECK_EXT" || BUILD_FAILED=1
if [ -n "${BUILD_FAILED:-}" ]; then
    # Every fused row and the BN+ReLU benchmarks would time the PyTorch fallback under the
    # name 'fused': stop rather than spend the lease on mislabelled numbers.
    echo "native CUDA ops missing or stale: stopping (build.log, ext.log; a fresh machine" \
         "needs ONLY=\"build ...\")" | tee -a "$SUMMARY"
    pack; exit 1
fi

# The test outcome is a result like the benchmarks': a JUnit file named by the GPU, commit inside.
GPU_SLUG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr 'A-Z ' 'a-z-')
# pytest-xdist spreads the tests over the host's cores when it is there (.gpu/site); without it
# `-n` would be an unknown option and the step would test nothing. The host's own plugins
# (pytest-cov, hypothesis, ...) are not loaded into .gpu/site's pytest: a combination never run.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-p xdist.plugin -n 16")
TIMEOUT=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "-p pytest_timeout --timeout 90")
SIG=INT TAIL=30 step pytest-cuda 200 env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
    "$PY" -m pytest -m cuda -q -p no:cacheprovider $XDIST \
    -o addopts="-ra" $TIMEOUT tests --ignore tests/test_ffcv.py --ignore tests/test_dali.py \
    --junitxml "benchmarks/results/pytest-cuda-${GPU_SLUG:-gpu}.xml" \
    -o junit_suite_name="pytest -m cuda, commit ${FASTTRAIN_COMMIT:-unknown}"

TRAIN="$PY tools/benchmark.py --model thin_resnet50 --device cuda --precision bf16 --batch-size 256 --train --save"
W10="--width 1.0"
W05="--width 0.5 --resolution 176"
# Most informative first: the kernels and loaders changed since the last GPU run, the engine's
# CUDA-graph mode end to end, then the training rows, then what earlier runs already measured.
step profile-bn-relu 60 "$PY" benchmarks/profile_bn_relu.py
step bench-bn-relu 220 "$PY" benchmarks/bench_bn_relu.py --widths 1.0 0.5
# --out: the file the README cites (2 rounds, fewer than the script's default 3, which would
# otherwise name a file of its own)
step cifar-aug 90 "$PY" benchmarks/bench_cifar_aug.py --device cuda --rounds 2 \
    --out benchmarks/results/cifar-aug-cuda-16w.json
# The engine on the GPU with compile_mode reduce-overhead (CUDA-graph trees around the real
# training loop, validation with flip TTA), on the built-in quickstart data.
step engine-reduce-overhead 180 "$PY" tools/train.py recipes/quickstart.yaml --train.device=cuda \
    --train.compile=true --train.compile_mode=reduce-overhead --aug.test_flip=true \
    --log.dir="$LOGS/runs" --log.progress=plain
step train-w0.5-176-compile-cudagraphs-fused 150 $TRAIN $W05 --mode compile-cudagraphs --norm-act fused
step train-w0.5-176-compile-cudagraphs-native 150 $TRAIN $W05 --mode compile-cudagraphs --norm-act native
step train-w1.0-224-compile-cudagraphs-fused 150 $TRAIN $W10 --mode compile-cudagraphs --norm-act fused
step train-w1.0-224-compile-cudagraphs-native 150 $TRAIN $W10 --mode compile-cudagraphs --norm-act native
# Thin networks leave the GPU part idle at batch 256: does a larger per-GPU batch raise img/s?
step train-w0.5-176-compile-cudagraphs-fused-b512-1024 150 "$PY" tools/benchmark.py \
    --model thin_resnet50 --device cuda --precision bf16 --batch-size 512,1024 --train --save \
    $W05 --mode compile-cudagraphs --norm-act fused
step train-w0.5-176-cudagraphs-fused 60 $TRAIN $W05 --mode cudagraphs --norm-act fused
step train-w0.5-176-cudagraphs-native 60 $TRAIN $W05 --mode cudagraphs --norm-act native
step train-w1.0-224-cudagraphs-fused 60 $TRAIN $W10 --mode cudagraphs --norm-act fused
step train-w1.0-224-cudagraphs-native 60 $TRAIN $W10 --mode cudagraphs --norm-act native
step bench-bn-relu-launched 220 "$PY" benchmarks/bench_bn_relu.py --widths 1.0 0.5 --timing launched
step latency-cudagraphs 90 "$PY" tools/benchmark.py --model thin_resnet50 \
    --width 1.0,0.75,0.5,0.25 --device cuda --precision bf16 --mode cudagraphs \
    --batch-size 1,64,256 --save
# The JPEG loaders on the host's cores (CPU work; the reused worker buffers with 16 workers). The
# torch backend's row needs the region JPEG decoder, which a host without libjpeg-turbo's
# headers does not build (bench_loaders refuses the row rather than time whole decodes).
LOADERS=decode,pil,torch-whole
if [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" loaders-16w "* ]]; then  # a torch import: seconds
    "$PY" -c "from fasttrain.data import jpeg; assert jpeg.AVAILABLE" 2>/dev/null && LOADERS+=,torch
fi
step loaders-16w 200 "$PY" benchmarks/bench_loaders.py --backends $LOADERS --rounds 2 --workers 16
step train-w1.0-224-compile-fused 150 $TRAIN $W10 --mode compile --norm-act fused
step train-w0.5-176-compile-fused 130 $TRAIN $W05 --mode compile --norm-act fused
step train-w1.0-224-compile-native 150 $TRAIN $W10 --mode compile --norm-act native
step train-w0.5-176-compile-native 130 $TRAIN $W05 --mode compile --norm-act native

nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >>"$SUMMARY" 2>&1
pack
echo "=== summary (t=${SECONDS}s)"
cat "$SUMMARY"
[ "$FAILED" -eq 0 ]
