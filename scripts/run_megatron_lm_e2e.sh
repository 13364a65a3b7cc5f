#!/usr/bin/env bash
# Megatron-LM's real GPT training script end to end on 4 CPU ranks: pretrain_gpt.py (with
# gpt_builders.py and model_provider.py) of the installed megatron-core's line — the 0.19.x wheel
# (MEGATRON_AGG_E2E_VERSION=0.19.2, the default) or Megatron-LM main (0.20.0, built from the pinned
# source) — patched with megatron_agg's patch of that line, runs one training step per
# configuration (TP2xDP2, PP2xDP2, CP2xDP2 with packed SFT data, CP2xDP2 with
# --dataloader-inter-document-masking) and --loss-agg-mode, in one torchrun launch; the gradients
# must equal those of one process that holds the whole global batch and computes the loss by its
# definition, and the negative controls must miss.
#
#   bash scripts/run_megatron_lm_e2e.sh                      # everything (a few minutes)
#   MEGATRON_AGG_E2E_VERSION=0.20.0 bash scripts/run_megatron_lm_e2e.sh --modes token-mean
#   bash scripts/run_megatron_lm_e2e.sh --configs cp2-dp2-interdoc --modes seq-mean-token-mean
#
# Arguments go to `python -m harness.megatron_lm` (see its --help). The venv is the version
# matrix's one of that release (make_venv of scripts/venvs.sh: created on first use,
# then reused; megatron_agg installed editable from this checkout). Writes $MEGATRON_AGG_OUT
# (default results/megatron_lm_e2e): e2e.log, summary.json, captures/. Prints one line per
# configuration and per control; exits non-zero on any mismatch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${MEGATRON_AGG_E2E_VERSION:-0.19.2}"
OUT="${MEGATRON_AGG_OUT:-$ROOT/results/megatron_lm_e2e}"
# shellcheck source=scripts/venvs.sh
source "$ROOT/scripts/venvs.sh"  # make_venv: the version matrix's venv of that release
mkdir -p "$OUT"

start=$(date +%s)
venv="$(make_venv "$VERSION")"
installed=$(( $(date +%s) - start ))
port="${MASTER_PORT:-$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
log="$OUT/e2e.log"
echo "megatron-lm e2e: megatron-core $VERSION ($venv, ready in ${installed}s); 4 ranks; log $log"
set +e
(cd "$ROOT" && PYTHONPATH="$ROOT/tests:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore OMP_NUM_THREADS=1 \
      "$venv/bin/python" -m torch.distributed.run \
    --nproc-per-node 4 --master-addr 127.0.0.1 --master-port "$port" \
    -m harness.megatron_lm --out "$OUT" "$@" >"$log" 2>&1)
rc=$?
set -e
if ! grep -E '^megatron-lm e2e' "$log"; then
  echo "megatron-lm e2e: did not finish (exit $rc); the last lines of $log:" >&2
  tail -30 "$log" >&2
  [ $rc -ne 0 ] || rc=1
fi
echo "megatron-lm e2e: exit $rc, total $(( $(date +%s) - start ))s"
exit $rc
