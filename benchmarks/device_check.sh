#!/usr/bin/env bash
# One command for a lent GPU machine (H100: Python 3.12, torch 2.11, triton 3.6, transformers, peft,
# nvcc, ninja; no network). Run from the repository root:
#
#     bash benchmarks/device_check.sh            # results in $OUT (default ./device_out)
#     DEVICE_CHECK_BUDGET_S=240 DEVICE_CHECK_STEPS=install,fastpeft-bench,plot bash benchmarks/device_check.sh
#
# Steps, in order of what later steps need: install, GPU summary, csrc JIT build (so the tests and the
# bench find it built), the cuda-marked tests, `fastpeft bench --device cuda`, the DoRA rows
# (`fastpeft bench --only dora --dropout 0`: base, fastpeft LoRA/DoRA, peft LoRA/DoRA interleaved; layer
# M = K = N = 4096, r = 16, bf16, and the decoder step), the mixed-batch rows (`fastpeft bench --only mixed`:
# one layer K = N = 4096, 64 decode rows, bf16, with 64 distinct r = 16 adapters and with one, vs the base layer
# and peft; a determinism check), the decode rows (benchmarks/decode_check.py: quantized decode nf4/int4/int8/fp8
# at M = 1, 4, 16 against the bf16 base and bitsandbytes + peft, LoRA's cost over rank 0, 16-bit decode at
# M = 1..64 with the split-K counts side by side, fp8 W8A8 against the dequantized path), an FSDP2 smoke step (`fastpeft bench --only fsdp2` on one GPU; output in the
# log only), the pytest-benchmark suite (with its DoRA module at dropout 0 and 0.1, and its mixed-batch
# module), the plot. Every step runs under `timeout`, sized from one overall deadline, so the whole script ends
# within DEVICE_CHECK_BUDGET_S seconds (default 540, 9 minutes) even if a step hangs; a failed
# step is reported and the next one still runs. At most 10 files are written to $OUT:
#   device_check.log  pytest_cuda.xml  bench_<gpu>.json  bench_dora_<gpu>.json  bench_mixed_<gpu>.json
#   bench_decode_<gpu>.json  bench_<gpu>.png  bench_suite.json  bench_suite.xml  summary.txt
set -u
set -o pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_check.log") 2>&1
set -x

PY="${PYTHON:-python3}"
BUDGET="${DEVICE_CHECK_BUDGET_S:-540}"
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
# Build caches stay off $OUT (it must hold only the files listed above).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/fastpeft_torch_extensions}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/fastpeft_triton_cache}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# DEVICE_CHECK_STEPS=name,name,... runs only those steps (names as below), for a short lease.
STEPS=",${DEVICE_CHECK_STEPS:-install,gpu-summary,csrc-build,pytest-cuda,fastpeft-bench,dora-bench,mixed-bench,decode-bench,fsdp2-smoke,bench-suite,plot},"

# step NAME MAX_SECONDS CMD...: run CMD with timeout min(MAX, time left - 5 s); record rc and seconds.
step() {
    local name="$1" max="$2"
    shift 2
    local now left limit rc t
    case "$STEPS" in
        *",$name,"*) ;;
        *) echo "SKIP   $name (not in DEVICE_CHECK_STEPS)" | tee -a "$SUMMARY"; return 0 ;;
    esac
    now=$(date +%s)
    left=$((DEADLINE - now - 5))
    if [ "$left" -lt 10 ]; then
        echo "SKIP   $name (no time left)" | tee -a "$SUMMARY"
        return 0
    fi
    limit=$(( max < left ? max : left ))
    echo "===== $name (timeout ${limit}s) ====="
    t=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    t=$(( $(date +%s) - t ))
    if [ "$rc" -eq 0 ]; then
        echo "OK     $name (${t}s)" | tee -a "$SUMMARY"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "TIMEOUT $name after ${t}s (limit ${limit}s)" | tee -a "$SUMMARY"
    else
        echo "FAIL   $name rc=$rc (${t}s)" | tee -a "$SUMMARY"
    fi
    return 0
}

# 1. Install. No network there: no build isolation (setuptools is already installed), no deps.
step install 60 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
if ! "$PY" -c "import fastpeft, fastpeft.cli" 2>/dev/null; then
    echo "editable install unusable; falling back to PYTHONPATH=$PWD"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. What machine this is.
step gpu-summary 20 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv; nvcc --version | tail -2; '"$PY"' -c "import torch, triton, transformers, peft, sys; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"transformers\", transformers.__version__, \"peft\", peft.__version__, torch.cuda.get_device_name(0))"'
GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' | grep -oE 'h100|h200|a100|l40s|l4|b200' | head -1)
GPU_TAG="${GPU_TAG:-gpu}"

# 3. csrc: JIT-build the CUDA extension with ninja (fills TORCH_EXTENSIONS_DIR for the steps below).
step csrc-build 150 "$PY" -c "
import time, torch
import fastpeft.ops.cuda_backend as cb
t = time.time()
mod = cb.load(torch.device('cuda'))
print('csrc extension:', mod, 'built/loaded in %.1fs' % (time.time() - t))
assert mod is not None and not isinstance(mod, str), 'csrc build failed: %s' % (mod,)
"

# 4. The cuda-marked tests.
step pytest-cuda 120 "$PY" -m pytest -m cuda tests -q -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" -o junit_family=xunit2

# 5. The side-by-side bench with ratios (headline layer shapes, bf16, and the decoder).
step fastpeft-bench 120 "$PY" -m fastpeft bench --device cuda --json "$OUT/bench_${GPU_TAG}.json"

# 5b. DoRA vs LoRA, fastpeft vs peft, all rows interleaved, at dropout 0 (the target: DoRA
#     forward+backward <= 1.10x LoRA at M = K = N = 4096, r = 16, bf16; the table prints "issue targets: ... met").
step dora-bench 100 "$PY" -m fastpeft bench --device cuda --only dora --dropout 0 --no-progress \
    --json "$OUT/bench_dora_${GPU_TAG}.json"

# 5c. Many adapters in one batch (adapter_names), eval: one layer K = N = 4096, 64 decode rows, bf16; base, fastpeft
#     and peft with 64 distinct r = 16 adapters and with one adapter for all rows, fastpeft ranks 8/16/32/64 vs all
#     30, interleaved; per row the host's issue time and the kernels' time. The issue's targets: one adapter
#     <= 1.04x the base layer, 64 adapters <= 1.5x, identical outputs on a rerun (the table prints "... met").
step mixed-bench 90 "$PY" -m fastpeft bench --device cuda --only mixed --no-progress \
    --json "$OUT/bench_mixed_${GPU_TAG}.json"

# 5c'. Decode (issue 14), every row in CUDA graphs: quantized decode vs the bf16 base (targets at M = 1: nf4 >= 3.0x,
#     int4 >= 3.3x, fp8 >= 1.8x; LoRA <= 5% over rank 0), 16-bit decode at M = 1..64 (<= 1.10x F.linear) with the
#     triton split-K counts 1/2/4/8 and the csrc GEMV side by side (the crossovers dispatch should follow), fp8 W8A8
#     vs the dequantized path at M = 4096. Rows are saved as they are measured.
step decode-bench 150 "$PY" benchmarks/decode_check.py "$OUT/bench_decode_${GPU_TAG}.json"

# 5d. FSDP2 smoke: one training step per impl under fully_shard on this one GPU (torchrun, 1 rank, nccl),
#     fastpeft vs peft side by side; dropout 0, so the printed first-step loss rel. diff should be ~1e-3 (bf16).
step fsdp2-smoke 90 "$PY" -m fastpeft bench --device cuda --quick --only fsdp2 --fsdp2-nproc 1 --dropout 0 --no-progress

# 6. The pytest-benchmark suite.
step bench-suite 100 "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$OUT/bench_suite.json" \
    --junitxml="$OUT/bench_suite.xml" --benchmark-columns=min,median,max,rounds --benchmark-sort=name

# 7. Plot the ratios.
if [ -f "$OUT/bench_${GPU_TAG}.json" ]; then
    step plot 20 "$PY" benchmarks/plot.py "$OUT/bench_${GPU_TAG}.json" "$OUT/bench_${GPU_TAG}.png"
else
    echo "SKIP   plot (no bench_${GPU_TAG}.json)" | tee -a "$SUMMARY"
fi

set +x
echo "===== summary ($(( $(date +%s) - T0 ))s of ${BUDGET}s) ====="
cat "$SUMMARY"
ls -la "$OUT"
