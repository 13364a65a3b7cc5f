#!/usr/bin/env bash
# Create (or update) the virtual environment the README's commands use:
# torch (the CPU build 2.13.0 on our machines), megatron-core 0.16.1 and this package with its
# test extras. Never installs transformer-engine (it cannot be built here, and its empty
# meta-package breaks `import megatron.core`). Override with PYTHON, MEGATRON_AGG_VENV,
# TORCH_SPEC and MCORE_SPEC.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_AGG_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MCORE_SPEC="${MCORE_SPEC:-megatron-core==0.16.1}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
pip_install() {
  local log
  log="$(mktemp)"
  if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  grep -v "^WARNING: Location .* is ignored" "$log" || true
  rm -f "$log"
}
echo "setup: installing $TORCH_SPEC, $MCORE_SPEC and megatron_agg[test] into $VENV"
pip_install "$TORCH_SPEC"
pip_install "$MCORE_SPEC" -e "$ROOT[test]"
PYTHONWARNINGS=ignore "$VENV/bin/python" - <<'PY'
import importlib.util, sys
import torch, megatron.core
if importlib.util.find_spec("transformer_engine") is not None:
    sys.exit("setup: transformer-engine is installed in this venv but cannot work on a CPU machine; remove it")
print(f"setup: torch {torch.__version__}, megatron-core {megatron.core.__version__}")
PY
