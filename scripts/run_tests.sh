#!/usr/bin/env bash
# Set up .venv, then run the tests. Two tiers (docs/TESTING.md says what each proves):
#
#   bash scripts/run_tests.sh          # the full proof (unit tests, the gradient-equivalence matrix
#                                      # on 1, 2 and 4 CPU ranks, features, verl, Megatron-LM end to end, ...)
#   bash scripts/run_tests.sh --fast   # the fast tier (a few minutes): the core math on simulated
#                                      # data-parallel ranks, Megatron's own loss path, one 4-rank launch
#
# Extra arguments go to pytest (e.g. -k "matrix and core-world2").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tier=()
if [ "${1:-}" = "--fast" ]; then
  shift
  tier=(-m fast)
fi
bash "$ROOT/scripts/setup_env.sh"
VENV="${MEGATRON_AGG_VENV:-$ROOT/.venv}"
cd "$ROOT"
PYTHONWARNINGS=ignore exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${tier[@]}" "$@" tests
