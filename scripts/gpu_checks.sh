#!/usr/bin/env bash
# Every check that needs a CUDA device, in one go (run it on a machine with a GPU and the package installed):
#
#     bash scripts/gpu_checks.sh [OUT_DIR]       # default OUT_DIR: scripts/results/gpu
#
# 1. the CUDA tests (`pytest -m cuda`): pinned host store and side stream, the cache on CUDA, training on CUDA with
#    every store, CUDA against CPU, flat CUDA memory in n, exact resume, MemoryMonitor's CUDA counters;
# 2. the constant-memory experiment on CUDA (per-step peak of allocated device memory, host store), OUT_DIR/constant_memory;
# 3. the throughput benchmark on CUDA (device vs host vs disk store, GlobalMoE), OUT_DIR/throughput.
# Exit code 0 only when every step passed. PYTHON picks the interpreter (default: python3).
set -uo pipefail
out=${1:-scripts/results/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
status=0

step() {
    local name=$1 started=$SECONDS
    shift
    echo "== $name: $*"
    if "$@"; then echo "== $name: passed in $((SECONDS - started)) s"; else echo "== $name: FAILED (exit $?) after $((SECONDS - started)) s"; status=1; fi
}

step environment "$py" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"
step "CUDA tests" timeout 300 "$py" -m pytest -q -m cuda -p no:cacheprovider tests
step "constant memory" timeout 400 "$py" scripts/prove_constant_memory.py --experts 8 64 256 512 4096 32768 \
    --baseline-max-experts 256 --store host --out "$out/constant_memory"
step throughput timeout 300 "$py" scripts/bench_throughput.py --rounds 6 --out "$out/throughput"
exit $status
