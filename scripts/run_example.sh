#!/usr/bin/env bash
# The main job: set up .venv, then train the tiny GPT for a few steps on 4 CPU ranks
# (TP=2 × DP=2, gloo) with megatron_agg's hook, printing the hooked global loss next to the
# single-process reference and the largest gradient difference. Extra arguments go to
# examples/train_tiny_gpt.py (e.g. --loss-agg-mode token-mean --pp 2 --tp 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${MEGATRON_AGG_VENV:-$ROOT/.venv}"
cd "$ROOT"
PYTHONWARNINGS=ignore OMP_NUM_THREADS=1 exec "$VENV/bin/python" -m torch.distributed.run \
  --nproc-per-node "${NPROC:-4}" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29511}" \
  examples/train_tiny_gpt.py --tp 2 --steps 10 "$@" 2> >(grep -v "^W[0-9]* \|^\*\*\*\|OMP_NUM_THREADS" >&2)
