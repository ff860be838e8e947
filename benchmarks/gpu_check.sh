#!/usr/bin/env bash
# Everything the CUDA kernels need checked on a GPU, in one command (about 8 minutes on an
# H100/H200 with 16 CPU cores), from a fresh copy of the repository:
#
#     bash benchmarks/gpu_check.sh               # logs and results in $RESULTS (default benchmarks/results/gpu/)
#     SUITE=0 bash benchmarks/gpu_check.sh       # without the whole test suite at the end
#
#   1 build the extension in place for sm_90 (TORCH_CUDA_ARCH_LIST to change it)
#   2 tests/test_ops.py on CUDA for every version of the kernels (csrc/cuda/v1.cu, v2.cu):
#     values, indices, gradients in float32/float16/bfloat16, opcheck, gradcheck.
#     Deselected: the bad-input tests, whose error messages format integers; on the GPU
#     machines we are lent (torch 2.11) any TORCH_CHECK that formats an integer segfaults,
#     even in a minimal extension: an environment fault, run on the CPU machines instead.
#   3 benchmarks/bench_ops.py: every version, fp32/bf16/fp16, eager and compiled reference,
#     batch-1 latency; writes bench_ops.md (every row and the goals' check) and .json
#   4 benchmarks/profile_ops.py: each version's kernels by device time
#   5 end to end: bench_inference.py at the paper's scale (fp32, batch 1 and 16; fused with
#     each version, and the reference) and bench_train_step.py at the paper's settings
#   6 the whole test suite (pytest -n 8), with what time is left before BUDGET seconds
# Each step's log is kept; the summary lines are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results/gpu}
SUITE=${SUITE:-1}
BUDGET=${BUDGET:-480}          # seconds for the whole script; the suite gets what is left
VERSIONS=${VERSIONS:-1,2}
BAD_INPUT_TESTS=(--deselect tests/test_ops.py::test_bad_inputs_rrs --deselect tests/test_ops.py::test_bad_inputs_afs
                 --deselect tests/test_ops.py::test_bad_inputs_devices)
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
SUMMARY=()
step() { echo; echo "=== $* (t=${SECONDS}s)"; }
note() { SUMMARY+=("$*"); echo "$*"; }

step "1 build"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RESULTS/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$RESULTS/device.txt"
date -u '+%Y-%m-%d %H:%M UTC' | tee -a "$RESULTS/device.txt"
if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        python3 setup.py build_ext --inplace > "$RESULTS/build.log" 2>&1; then
    tail -40 "$RESULTS/build.log"
    echo "build failed"
    exit 1
fi
note "build: ok (${SECONDS}s)"

step "2 CUDA parity tests, per version"
for v in ${VERSIONS//,/ }; do
    # one pytest per version: a device-side fault in one cannot hide the other's results
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py -k "v$v" \
        "${BAD_INPUT_TESTS[@]}" > "$RESULTS/test_ops_v$v.log" 2>&1
    note "test_ops.py CUDA, version $v: $(tail -1 "$RESULTS/test_ops_v$v.log")"
done

step "3 op benchmark"
timeout 300 python3 benchmarks/bench_ops.py --device cuda --dtypes float32,bfloat16,float16 --kernels "$VERSIONS" \
    --json "$RESULTS/bench_ops.json" --markdown "$RESULTS/bench_ops.md" 2>&1 | tee "$RESULTS/bench_ops.txt"
SUMMARY+=("$(sed -n '/^goals/,$p' "$RESULTS/bench_ops.txt")")

step "4 profile"
timeout 60 python3 benchmarks/profile_ops.py --kernels "$VERSIONS" 2>&1 | tee "$RESULTS/profile.txt"

step "5 end to end"
for v in ${VERSIONS//,/ }; do  # the newest version also times the reference beside it
    variants=fused; [ "$v" = "${VERSIONS##*,}" ] && variants=fused,reference
    REALNET_CUDA_KERNELS=$v timeout 150 python3 benchmarks/bench_inference.py --device cuda --scale paper \
        --precisions fp32 --variants $variants --batches 1,16 --out "$RESULTS/inference_v$v" > "$RESULTS/inference_v$v.log" 2>&1
    note "inference (paper scale, fp32), kernels v$v: $(grep -E '^  fp32 ' "$RESULTS/inference_v$v.log" | tr -s ' ' | tr '\n' ';')"
done
for v in ${VERSIONS//,/ }; do
    REALNET_CUDA_KERNELS=$v timeout 120 python3 benchmarks/bench_train_step.py --device cuda --input-size 256 \
        --layers 1 2 3 4 --dims 256 512 512 256 --width-ratio 0.5 --batch-size 16 --precisions fp32 bf16 \
        --json "$RESULTS/train_step_v$v.json" > "$RESULTS/train_step_v$v.log" 2>&1
    note "train step (paper settings), v$v: $(grep '^| fp32\|^| bf16' "$RESULTS/train_step_v$v.log" | tr '\n' ' ')"
done

if [ "$SUITE" = 1 ]; then
    left=$((BUDGET - SECONDS))
    step "6 the whole test suite (${left}s left)"
    if [ "$left" -gt 60 ]; then
        timeout "$left" python3 -m pytest -q -p no:cacheprovider -n 8 tests "${BAD_INPUT_TESTS[@]}" \
            > "$RESULTS/suite.log" 2>&1
        note "suite (rc $?): $(tail -1 "$RESULTS/suite.log")"
        grep -E "^(FAILED|ERROR)" "$RESULTS/suite.log" | head -20
    else
        note "suite: skipped, ${left}s left"
    fi
fi

echo
echo "=== summary (t=${SECONDS}s)"
printf '%s\n' "${SUMMARY[@]}"
