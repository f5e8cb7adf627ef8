#!/usr/bin/env bash
# The GPU benchmark in one device call (about 8 minutes on an H100): write the 1B-shaped model, check the engine
# against `generate` with graph prefill off and on (step times of each), then the serving sweep.
#   bash bench/gpu_run.sh OUT_DIR [CONCURRENCY]      (CONCURRENCY default 1,16,32,64,128)
# On the lent device machines the project's packages travel as wheels (bench/RESULTS.md, "Serving on a GPU").
set -uo pipefail
out=${1:?output folder}
levels=${2:-1,16,32,64,128}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
[ -d /tmp/l1b ] || python3 bench/serve_bench.py --write-model llama-1b /tmp/l1b | tail -1
for prefill in 0 2048; do
  GRAPH_PREFILL_TOKENS=$prefill timeout 150 python3 bench/engine_check.py /tmp/l1b --device cuda --requests 16 \
    --tokens 32 2>&1 | grep -v "Warning\|warn(" | tee "$out/check-prefill-$prefill.txt"
done
timeout 360 python3 bench/serve_bench.py /tmp/l1b --device cuda --concurrency "$levels" --max-batch-size 128 \
  --baseline-requests 4 --json "$out/sweep.json" > "$out/sweep.txt" 2>&1
echo "sweep exit $?"
grep -v "Warning\|warn(" "$out/sweep.txt" | tail -45
