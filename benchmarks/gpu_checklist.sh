#!/usr/bin/env bash
# The GPU checklist in one call, for a lent GPU host whose torch is already installed and that has
# no package index (the project's GPU hosts: torch 2.11, Python 3.12, no ffcv/DALI):
#
#   FASTTRAIN_COMMIT=<sha> OUT=<dir> bash benchmarks/gpu_checklist.sh [DEADLINE_S]
#
# 1. builds the native ops for the GPU (TORCH_CUDA_ARCH_LIST, default 9.0) and runs `pytest -m cuda`;
# 2. runs the benchmarks: training img/s of thin_resnet50 at w1.0@224 and w0.5@176 on GPU-resident
#    synthetic data (whole step in a CUDA graph; torch.compile with and without CUDA graphs; fused
#    and native norm+ReLU), where the fused BN+ReLU step's time goes (profile_bn_relu.py), fused
#    BN+ReLU vs eager vs torch.compile (bench_bn_relu.py), the inference latency sweep (CUDA
#    graphs), the CIFAR augmentation comparison with batches going to the GPU, and the JPEG
#    loaders on the host's 16 cores (bench_loaders.py: decode limit, PIL, torch backend).
# Steps run in priority order; each has its own time limit, and a step that no longer fits before
# DEADLINE_S (default 560 s) is skipped, so a short lease loses the least important numbers.
# Logs and benchmarks/results/ are packed into $OUT/gpu.tgz after every step, so whatever
# finished comes back even if the call is cut off. Pure-Python packages the host lacks (fvcore and
# its needs) are read from .gpu/site when that folder exists (git-ignored; made here with
# `python3 -m pip install --no-deps --target .gpu/site fvcore iopath yacs termcolor`, then
# carried with the call).
set -u
OUT=${OUT:-/tmp/fasttrain-gpu}
DEADLINE=${1:-560}
PY=${PYTHON:-python3}
LOGS=/tmp/fasttrain-gpu-logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
[ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$LOGS/summary.txt"

pack() { tar czf "$OUT/gpu.tgz" -C "$LOGS" . -C "$PWD" benchmarks/results 2>/dev/null; }

# step NAME LIMIT_S CMD...: runs CMD under `timeout`, logs to $LOGS/NAME.log, records rc and time.
# ONLY="name1 name2 ..." runs just those steps (a rerun of what a short lease cut off).
step() {
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        return 0
    fi
    if [ "$left" -lt 30 ]; then
        echo "$name: skipped (${left}s left)" | tee -a "$SUMMARY"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s, t=${SECONDS}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
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

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTTRAIN_CUDA=1 FASTTRAIN_JPEG=0
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# In place, not `pip install -e .`: without a pyproject.toml the host's setuptools runs `develop`,
# which calls pip again with build isolation, and that needs a package index.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step build 240 "$PY" setup.py build_ext --inplace
step ext 60 "$PY" -c "from fasttrain.ops import _ext; print(_ext.HAS_EXT, _ext.HAS_CUDA_EXT, _ext.BUILD_INFO); assert _ext.HAS_CUDA_EXT"

# The test outcome is a result like the benchmarks': a JUnit file named by the GPU, commit inside.
GPU_SLUG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr 'A-Z ' 'a-z-')
TAIL=30 step pytest-cuda 200 "$PY" -m pytest -m cuda -q -p no:cacheprovider -n 16 -o addopts="-ra" \
    --timeout 180 tests --ignore tests/test_ffcv.py --ignore tests/test_dali.py \
    --junitxml "benchmarks/results/pytest-cuda-${GPU_SLUG:-gpu}.xml" \
    -o junit_suite_name="pytest -m cuda, commit ${FASTTRAIN_COMMIT:-unknown}"

TRAIN="$PY tools/benchmark.py --model thin_resnet50 --device cuda --precision bf16 --batch-size 256 --train --save"
W10="--width 1.0"
W05="--width 0.5 --resolution 176"
# Most informative first: the kernels and loaders changed since the last GPU run, the engine's
# CUDA-graph mode end to end, then the training rows, then what earlier runs already measured.
step profile-bn-relu 60 "$PY" benchmarks/profile_bn_relu.py
step bench-bn-relu 220 "$PY" benchmarks/bench_bn_relu.py --widths 1.0 0.5
step cifar-aug 90 "$PY" benchmarks/bench_cifar_aug.py --device cuda --rounds 2
# The engine on the GPU with compile_mode reduce-overhead (CUDA-graph trees around the real
# training loop, validation with flip TTA), on the built-in quickstart data.
step engine-reduce-overhead 180 "$PY" tools/train.py recipes/quickstart.yaml --train.device=cuda \
    --train.compile=true --train.compile_mode=reduce-overhead --aug.test_flip=true \
    --log.dir=/tmp/fasttrain-runs --log.progress=plain
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
# The JPEG loaders on the host's cores (CPU work; the reused worker buffers with 16 workers).
step loaders-16w 200 "$PY" benchmarks/bench_loaders.py --backends decode,pil,torch,torch-whole \
    --rounds 2 --workers 16
step train-w1.0-224-compile-fused 150 $TRAIN $W10 --mode compile --norm-act fused
step train-w0.5-176-compile-fused 130 $TRAIN $W05 --mode compile --norm-act fused
step train-w1.0-224-compile-native 150 $TRAIN $W10 --mode compile --norm-act native
step train-w0.5-176-compile-native 130 $TRAIN $W05 --mode compile --norm-act native

nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >>"$SUMMARY" 2>&1
pack
echo "=== summary (t=${SECONDS}s)"
cat "$SUMMARY"
