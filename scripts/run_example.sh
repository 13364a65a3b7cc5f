#!/usr/bin/env bash
# The main job: set up .venv, then `megatron-agg compare` on 4 CPU ranks (gloo): the same small GPT
# trained from one initial state on one stream of ragged batches with Megatron (TP=2 × DP=2) + the
# hook, FSDP2 (DP=4) + the hook, and Megatron's plain averaging. Prints a per-step table (loss,
# gradient norm, gradient difference from the FSDP path), writes results/compare/compare.png and
# .json, and exits non-zero if the hooked Megatron path and the FSDP path disagree. Extra arguments
# go to `megatron-agg compare` (e.g. --loss-agg-mode token-mean --tp 1 --pp 2 --steps 20).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${MEGATRON_AGG_VENV:-$ROOT/.venv}"
cd "$ROOT"
PYTHONWARNINGS=ignore exec "$VENV/bin/megatron-agg" compare --nproc "${NPROC:-4}" --tp 2 --steps 8 \
  --out results/compare "$@"
