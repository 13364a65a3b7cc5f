# Sourced by scripts/run_version_matrix.sh, run_megatron_lm_e2e.sh and run_bridge_e2e.sh: how the
# cached venvs of the version matrix and of the end-to-end runs are built (make_venv <release>).
# 0.20.0 is Megatron-LM main (d98e8a64), installed without a network from the source tarball in
# shared/upstream/sources (MEGATRON_AGG_SHARED, default the shared/ folder beside this checkout).
#
# Python 3.11 venvs take the CPU torch 2.13.0 on this machine. Python 3.12 venvs (megatron-core 0.17+,
# Megatron-Bridge) need torch from the registry, a CUDA build of ~3 GB used on the CPU: it is
# installed once into $CACHE/venvs/torch-py312, and every Python 3.12 venv sees it through a .pth
# file (pip counts it as installed, so no venv downloads it again; a package that needs another
# version would install its own into its venv, which comes first on sys.path).
ROOT="${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
CACHE="${MEGATRON_AGG_CACHE:-$HOME/.cache/megatron_agg}"
PYTHON311="${PYTHON311:-python3}"
mkdir -p "$CACHE/venvs"
SHARED_TORCH312="$CACHE/venvs/torch-py312"

python312() {
  if [ -n "${PYTHON312:-}" ]; then "$PYTHON312" "$@";
  elif command -v python3.12 >/dev/null 2>&1 && python3.12 --version >/dev/null 2>&1; then python3.12 "$@";
  else PYENV_VERSION=3.12.1 python3.12 "$@"; fi
}

quiet_pip() {  # venv pip-args...: pip install, its output shown only when it fails
  local venv="$1"; shift
  local log; log="$(mktemp)"
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}

purelib() {  # venv -> its site-packages
  "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

shared_torch312() {  # builds (once) the venv that holds the Python 3.12 torch
  local stamp="py312 torch"
  if [ ! -x "$SHARED_TORCH312/bin/python" ] || [ "$(cat "$SHARED_TORCH312/.megatron_agg_stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$SHARED_TORCH312"
    python312 -m venv "$SHARED_TORCH312"
    echo "venvs: installing torch (Python 3.12) into $SHARED_TORCH312, shared by every Python 3.12 venv" >&2
    quiet_pip "$SHARED_TORCH312" torch
    echo "$stamp" > "$SHARED_TORCH312/.megatron_agg_stamp"
  fi
}

new_venv312() {  # venv: a fresh Python 3.12 venv that sees the shared torch
  shared_torch312
  rm -rf "$1"
  python312 -m venv "$1"
  purelib "$SHARED_TORCH312" > "$(purelib "$1")/_megatron_agg_shared_torch.pth"
}

make_venv() {  # megatron-core version -> prints its venv (built or refreshed, this checkout installed)
  local v="$1" minor="${1%.*}" venv="$CACHE/venvs/mc-$1" stamp
  local torch_spec="torch==2.13.0" py="py311"
  case "$minor" in 0.13|0.14|0.15|0.16) ;; *) torch_spec="shared-torch"; py="py312" ;; esac
  local source="megatron-core==$v"
  local shared="${MEGATRON_AGG_SHARED:-$ROOT/../shared}" main_tarball="megatron-lm-main-d98e8a64.tar.gz"
  [ "$v" != 0.20.0 ] || source="$main_tarball"
  stamp="$py $torch_spec $source"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.megatron_agg_stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "versions: installing $stamp into $venv" >&2
    if [ "$py" = py311 ]; then
      rm -rf "$venv"; "$PYTHON311" -m venv "$venv"; quiet_pip "$venv" "$torch_spec"
    else
      new_venv312 "$venv"
    fi
    if [ "$source" = "$main_tarball" ]; then  # Megatron-LM main: offline, from the pinned source
      if [ ! -f "$shared/upstream/sources/$main_tarball" ]; then
        echo "versions: $shared/upstream/sources/$main_tarball is missing (set MEGATRON_AGG_SHARED)" >&2
        return 1
      fi
      quiet_pip "$venv" pytest numpy packaging "setuptools>=80" pybind11
      quiet_pip "$venv" --no-build-isolation --no-deps "$shared/upstream/sources/$main_tarball"
    else
      quiet_pip "$venv" "megatron-core==$v" pytest numpy
    fi
    echo "$stamp" > "$venv/.megatron_agg_stamp"
  fi
  quiet_pip "$venv" einops  # Megatron-FSDP's import (the wrapper probe); a no-op once installed
  quiet_pip "$venv" --no-deps -e "$ROOT"  # this checkout, every time
  echo "$venv"
}
