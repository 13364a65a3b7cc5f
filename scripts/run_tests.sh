#!/usr/bin/env bash
# Set up .venv, then run the whole test suite (unit tests, the single-rank hook tests, the
# gradient-equivalence matrix on 1, 2, 4 and 8 CPU ranks, the example). Extra arguments go
# to pytest (e.g. -k matrix).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${MEGATRON_AGG_VENV:-$ROOT/.venv}"
cd "$ROOT"
PYTHONWARNINGS=ignore exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
