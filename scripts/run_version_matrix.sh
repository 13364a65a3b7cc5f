#!/usr/bin/env bash
# The version matrix: for every supported megatron-core minor release, a cached virtual
# environment and one launch (4 CPU ranks, tests/support/release_run.py) of the gradient-equivalence
# "release" suite (DP, TP, PP, VPP and CP layouts; every loss spec and Megatron path; negative
# controls), the FSDP wrapper probe (tests/support/wrapper_probe.py --strict) and, where the release
# has Megatron's hybrid-CP schedule (0.16+), the dynamic context parallelism proof
# (tests/support/dynamic_cp_run.py).
#
#   bash scripts/run_version_matrix.sh                 # all releases
#   MEGATRON_AGG_VERSIONS="0.13.1 0.19.2" bash scripts/run_version_matrix.sh
#   bash scripts/run_version_matrix.sh --prepare       # only build (or refresh) the venvs
#   MEGATRON_AGG_PROBE_ONLY="0.16.1" bash scripts/...    # those releases: the wrapper probe only
#                                                        # (the test command runs their suite and dynamic CP)
#
# 0.20.0 is Megatron-LM main (d98e8a64), installed without a network from the source tarball in
# shared/upstream/sources (MEGATRON_AGG_SHARED, default the shared/ folder beside this checkout).
# 0.13–0.16 run on Python 3.11 with the CPU torch 2.13.0; 0.17+ need Python 3.12 (found as
# PYTHON312, python3.12 on PATH, or pyenv's 3.12.1) and then take torch from the registry (a
# CUDA build of ~3 GB, used on the CPU; installed once and shared by every Python 3.12 venv, see
# scripts/venvs.sh). Venvs are cached in MEGATRON_AGG_CACHE
# (default ~/.cache/megatron_agg) and reused while their requirements stay the same.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSIONS="${MEGATRON_AGG_VERSIONS:-0.13.1 0.14.0 0.15.3 0.16.1 0.18.0 0.19.2 0.20.0}"
OUT="${MEGATRON_AGG_OUT:-$ROOT/results/versions}"
# shellcheck source=scripts/venvs.sh
source "$ROOT/scripts/venvs.sh"
mkdir -p "$OUT"

if [ "${1:-}" = "--prepare" ]; then
  for v in $VERSIONS; do
    start=$(date +%s)
    venv="$(make_venv "$v")"
    echo "versions: megatron-core $v ready in $venv ($(( $(date +%s) - start ))s)"
  done
  exit 0
elif [ $# -gt 0 ]; then
  echo "usage: bash scripts/run_version_matrix.sh [--prepare]" >&2
  exit 2
fi

launch() {  # venv log torchrun-args... : 4 CPU ranks from the checkout, output to log
  local venv="$1" log="$2"; shift 2
  (cd "$ROOT" && PYTHONPATH="$ROOT/tests:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore OMP_NUM_THREADS=1 \
      PYTHONFAULTHANDLER=1 \
      "$venv/bin/python" -m torch.distributed.run \
      --nproc-per-node 4 --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29533}" "$@" >"$log" 2>&1)
}

reruns=()
launch_judged() {  # venv log marks torchrun-args... : launch; if a rank died by a signal (SIGSEGV, SIGABRT,
  # SIGBUS: seen rarely, under load, in Megatron-FSDP 0.19.2 on the CPU) before any check failed (no
  # line matching marks), say so, keep that log and run the launch once more: the rerun judges every
  # configuration again and decides. A failed check is never run again.
  local venv="$1" log="$2" marks="$3" rc=0 sig
  shift 3
  launch "$venv" "$log" "$@" || rc=$?
  sig="$(grep -oE "\((SIGSEGV|SIGABRT|SIGBUS)\)" "$log" | head -1 || true)"
  if [ $rc -ne 0 ] && [ -n "$sig" ] && ! grep -qE "$marks" "$log"; then
    mv "$log" "${log%.log}.crashed.log"
    failed "${log%.log}.crashed.log" "$marks"
    echo "versions: $(basename "$log"): a rank died by $sig before any check failed; running it once more" >&2
    reruns+=("$(basename "$log"): a rank died by $sig, run once more (${log%.log}.crashed.log)")
    rc=0
    launch "$venv" "$log" "$@" || rc=$?
  fi
  return $rc
}

failed() {  # log pattern : the lines that say what failed, then the end of the log (a crashed rank's
  # signal and torchrun's failure summary say the rest; CI keeps only what is printed)
  local log="$1" pattern="$2"
  { echo "--- $log: lines matching $pattern"; grep -E "$pattern" "$log" | head -20 || true
    echo "--- $log: last 40 lines"; tail -40 "$log"; echo "---"; } >&2
}

status=0
summary=()
# A failed check in any part's log (suite, probe, dynamic CP): never run again after a crash.
MARKS="\] FAIL |SILENTLY|\(!\)|\(FAIL;|MISSED NOT"
for v in $VERSIONS; do
  start=$(date +%s)
  venv="$(make_venv "$v")"
  installed=$(( $(date +%s) - start ))
  log="$OUT/release-$v.log"
  probe_only=0
  [[ " ${MEGATRON_AGG_PROBE_ONLY:-} " == *" $v "* ]] && probe_only=1
  # One launch per release (tests/support/release_run.py), its parts separated by ---:
  # - the release suite (unless MEGATRON_AGG_PROBE_ONLY: the test command's matrix runs that release);
  # - the FSDP wrappers of this release (torch-fsdp2, Megatron-FSDP x strategy x no_sync/overlap,
  #   DP4, 3 micro-batches, the mean and the per-token sum paths): the hook exact or refusing an
  #   upstream defect (--strict: exit 1 otherwise); where it refused, Megatron's plain loss off by the
  #   factor the probe predicts (the defect is Megatron's: no needless refusal). Where the hook is
  #   exact, its own row is the proof and the plain row is not run (--plain refused);
  # - dynamic (hybrid) context parallelism through Megatron's own schedule, where the release has it
  #   (0.16+; the test command runs it for its own release).
  parts=()
  if [ $probe_only -eq 0 ]; then
    parts+=(suite --suite release --layer-spec "$ROOT/tests/support/cp_attention.py:layer_spec"
            --out "$OUT/release-$v.json" ---)
  fi
  parts+=(probe --strict --wrappers torch-fsdp2,megatron-fsdp --layouts dp4 --microbatches 3
          --paths 2-tuple,3-tuple+per-token --div-fusion on --plain refused --json "$OUT/wrappers-$v.json")
  hybrid=0
  if "$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('megatron.core.pipeline_parallel.hybrid_cp_schedule') is None)" 2>/dev/null; then
    hybrid=1
    [ $probe_only -eq 1 ] || parts+=(--- dynamic --json "$OUT/dynamic-cp-$v.json")
  fi
  echo "versions: megatron-core $v: $( [ $probe_only -eq 1 ] || printf 'suite, ')probe$( [ $hybrid -eq 0 ] || [ $probe_only -eq 1 ] || printf ', dynamic cp') in one launch (log: $log)"
  set +e
  launch_judged "$venv" "$log" "$MARKS" tests/support/release_run.py "${parts[@]}"
  rc=$?
  set -e
  if [ $probe_only -eq 1 ]; then
    line="release suite skipped (MEGATRON_AGG_PROBE_ONLY: the test command's matrix runs this release)"
  else
    line="$(grep -E '^world [0-9]+: ran' "$log" | tail -1 || true)"
    [ -n "$line" ] || line="release suite did not finish (exit $rc); see $log"
  fi
  wline="$(grep -E '^wrapper probe:' "$log" | tail -1 || true)"
  [ -n "$wline" ] || wline="wrapper probe did not finish (exit $rc); see $log"
  if [ $hybrid -eq 0 ]; then
    dline="no hybrid-CP schedule"
  elif [ $probe_only -eq 1 ]; then
    dline="dynamic cp: in the test command"
  else
    dline="$(grep -E '^dynamic cp: ([0-9]+ checks|not run)' "$log" | tail -1 || true)"
    [ -n "$dline" ] || dline="dynamic cp did not finish (exit $rc); see $log"
  fi
  if [ $rc -ne 0 ]; then status=1; failed "$log" "$MARKS|FAIL|Error|release_run: .* exit [^0]"; fi
  summary+=("megatron-core $v: $line; $wline; $dline; install ${installed}s, total $(( $(date +%s) - start ))s")
  echo "versions: ${summary[-1]}"
done
echo
echo "version matrix summary:"
printf '  %s\n' "${summary[@]}"
if [ ${#reruns[@]} -gt 0 ]; then
  echo "run again after a crash (the rerun's result is the one above):"
  printf '  %s\n' "${reruns[@]}"
fi
exit $status
