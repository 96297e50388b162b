#!/usr/bin/env bash
# A GPU day, prepared: on a machine with one CUDA GPU, check and measure in under 8 minutes (each part has a hard
# time limit; the sum is 7.6 minutes plus start-up):
#   (a) the Triton kernels against their PyTorch references, compiled natively (tests/triton_interpreter_cases.py
#       without TRITON_INTERPRET: fp32 at 1e-4 relative error, and bf16 inputs against the fp32 reference);
#   (b) bench/gpu_kernels.py: kernel timings against their PyTorch peers -> bench/results/gpu_kernels.json;
#   (c) bench/mqar_step_time.py --device cuda: one MQAR training step of every family at d_model 128, seq_len 256,
#       batch 64, against attention -> bench/results/mqar_step_time_cuda.json (plans the claim grid's GPU hours);
#   (d) bench/mqar_official.py: the official Palimpsa MQAR configuration at (512, 128) (d_model 128, 8 heads of key
#       dim 16, expand_v 2, vocab 8192, no MLP) for palimpsa, not_palimpsa and mamba2, MQAR_SECONDS (default 40) of
#       training each, early stop at 0.99 -> bench/results/mqar_official_cuda.json.
# A part that fails or runs out of time is reported and the next one still runs; the exit status is 1 if any part
# failed. A summary (each part's command, exit status and seconds) goes to bench/results/gpu_check.json.
# Without a CUDA GPU it says so and exits 0.
#
#     bash bench/gpu_check.sh                   # from anywhere; PYTHON=/path/to/python to choose the interpreter
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MQAR_SECONDS=${MQAR_SECONDS:-40}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu_check.sh: no CUDA GPU visible to torch ($PYTHON): nothing checked; run it on a machine with one."
    exit 0
fi

failed=0
parts=()
part() {  # part NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    local rc=$?
    local took=$((SECONDS - started))
    if [ "$rc" -eq 0 ]; then
        echo "=== $name: ok in ${took}s"
    else
        echo "=== $name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', out of time')) after ${took}s"
        failed=1
    fi
    parts+=("{\"part\": \"$name\", \"command\": \"$*\", \"exit\": $rc, \"seconds\": $took}")
}

part kernels_vs_references 110 env -u TRITON_INTERPRET "$PYTHON" -m pytest -q -p no:cacheprovider -rs \
    tests/triton_interpreter_cases.py
part kernel_timings 90 "$PYTHON" bench/gpu_kernels.py
part mqar_step_time 45 "$PYTHON" bench/mqar_step_time.py --device cuda --warmup 3 --steps 10
part mqar_official_512x128 $((3 * (MQAR_SECONDS + 20) + 30)) "$PYTHON" bench/mqar_official.py --device cuda \
    --families palimpsa not_palimpsa mamba2 --max-seconds "$MQAR_SECONDS"

mkdir -p bench/results
{
    echo "{\"device\": \"$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')\","
    echo " \"git_commit\": \"$(git rev-parse HEAD 2>/dev/null)\", \"written\": \"$(date -u '+%Y-%m-%d %H:%M:%S UTC')\","
    echo " \"command\": \"bash bench/gpu_check.sh\", \"mqar_seconds\": $MQAR_SECONDS, \"parts\": ["
    (IFS=,; echo "  ${parts[*]}")
    echo " ]}"
} > bench/results/gpu_check.json
echo "summary -> bench/results/gpu_check.json"
exit $failed
