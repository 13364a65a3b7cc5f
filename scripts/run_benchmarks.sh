#!/usr/bin/env bash
# The benchmarks of docs/BENCHMARKS.md, into results/benchmarks/ (set up .venv first):
#   - step time, hooked vs Megatron's own loss paths, interleaved (4 CPU ranks: TP2×DP2, PP2×DP2),
#     incl. the async vs sync all-reduce on the PP layout;
#   - the hook's own cost as micro-batches, tokens and packed sequences grow (one process);
#   - a 1,000-step soak (2 CPU ranks): memory and step time per 100 steps.
# STEPS (default 40) and SOAK_STEPS (default 1000) override the lengths.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
PY="${MEGATRON_AGG_VENV:-$ROOT/.venv}/bin/python"
OUT="$ROOT/results/benchmarks"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=1
export PYTHONPATH="$ROOT/tests:$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # bench_step counts collectives with the test harness (tests/harness)
run() { "$PY" -m torch.distributed.run --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29577}" "$@" \
          2> >(grep -v "^W[0-9]* \|^\*\*\*\|OMP_NUM_THREADS" >&2); }
echo "== machine: $(getconf _NPROCESSORS_ONLN) cores, $(uname -m), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $("$PY" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null)"
echo "== step time (4 ranks)"
run --nproc-per-node 4 benchmarks/bench_step.py --steps "${STEPS:-40}" --out "$OUT/bench_step.json"
echo "== the hook's own cost (1 process)"
"$PY" benchmarks/bench_hook_cost.py --out "$OUT/bench_hook_cost.json"
echo "== soak (2 ranks)"
run --nproc-per-node 2 benchmarks/soak.py --steps "${SOAK_STEPS:-1000}" --out "$OUT/soak.json"
echo "results in $OUT"
