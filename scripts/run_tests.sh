#!/usr/bin/env bash
# Set up .venv, then run the tests. Two tiers (docs/TESTING.md says what each proves):
#
#   bash scripts/run_tests.sh          # the full proof (unit tests, the gradient-equivalence matrix
#                                      # on 1, 2 and 4 CPU ranks, features, FSDP, verl, compare, ...)
#   bash scripts/run_tests.sh --fast   # the fast tier (a few minutes): the core math on simulated
#                                      # data-parallel ranks, Megatron's own loss path, one 4-rank launch
#   bash scripts/run_tests.sh --e2e    # the upstream training scripts end to end, per release in their
#                                      # own venvs (Megatron-LM 0.19.2 and main, Megatron-Bridge); the
#                                      # version-matrix stage of .ci/run runs them
#
# Extra arguments go to pytest (e.g. -k "matrix and core-world2").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tier=(-m "not e2e and not smoke")  # e2e: the version-matrix stage; smoke: the matrix has its layouts
if [ "${1:-}" = "--fast" ]; then
  shift
  tier=(-m fast)
elif [ "${1:-}" = "--e2e" ]; then
  shift
  tier=(-m e2e)
fi
bash "$ROOT/scripts/setup_env.sh"
VENV="${MEGATRON_AGG_VENV:-$ROOT/.venv}"
cd "$ROOT"
PYTHONWARNINGS=ignore exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${tier[@]}" "$@" tests
