#!/usr/bin/env bash
# Multi-node launch of megatron_agg's example training (torchrun static rendezvous).
#
# Environment (validated up front; a bad value exits 2 with a message naming the variable):
#   MASTER_ADDR     address of node 0 (required when NNODES > 1; default 127.0.0.1 on one node): a host
#                   name or IPv4 address, without a port (the port goes into MASTER_PORT; IPv6
#                   addresses are refused: use node 0's host name)
#   MASTER_PORT     its port, 1024-65535 (default 29500)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank, 0..NNODES-1 (default: SLURM_NODEID if set, else 0)
#   NPROC_PER_NODE  ranks per node (default: the GPUs nvidia-smi sees, else 1)
#   TRAIN_SCRIPT    what to run (default: examples/train_tiny_gpt.py next to this script)
# Numbers are decimal without a sign or leading zeros (08 is refused: bash would read it as octal).
# A variable may be unset (its default applies) but not set to an empty value (NNODES= is refused).
# Arguments are passed to the training script. --dry-run prints the torchrun command and exits.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 docker/launch.sh --device cuda --tp 2   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 docker/launch.sh --device cuda --tp 2   # node 1
#
# In the GPU image (docker/Dockerfile) this script is the ENTRYPOINT: `docker run ... IMAGE --tp 2`
# passes --tp 2 to the training script; `docker run --entrypoint torchrun ...` runs something else.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

die() { echo "launch.sh: $*" >&2; exit 2; }

# not_empty NAME: a set variable must have a value (${NAME:-default} would hide NAME= silently).
not_empty() {
  if [ -n "${!1+x}" ] && [ -z "${!1}" ]; then
    die "$1 is set but empty; unset it for the default or give a value"
  fi
}

# need_number NAME VALUE MIN WHAT EXAMPLE: VALUE is a decimal integer >= MIN, no sign or leading zeros.
need_number() {
  if ! [[ "$2" =~ ^(0|[1-9][0-9]{0,8})$ ]] || (( 10#$2 < $3 )); then
    local example="$5"
    if [[ "$2" =~ ^[0-9]{1,9}$ ]] && (( 10#$2 >= $3 )); then example="$((10#$2))"; fi
    die "$1 must be $4, got '$2'; write it in decimal without a sign or leading zeros (e.g. $1=$example)"
  fi
}

DRY_RUN=0
ARGS=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then DRY_RUN=1; else ARGS+=("$a"); fi
done

for var in NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE TRAIN_SCRIPT; do not_empty "$var"; done
NNODES="${NNODES-1}"
RANK_FROM=NODE_RANK
if [ -z "${NODE_RANK+x}" ] && [ -n "${SLURM_NODEID+x}" ]; then
  not_empty SLURM_NODEID
  RANK_FROM=SLURM_NODEID
  NODE_RANK="$SLURM_NODEID"
fi
NODE_RANK="${NODE_RANK-0}"
MASTER_PORT="${MASTER_PORT-29500}"
if [ -z "${NPROC_PER_NODE+x}" ]; then
  NPROC_PER_NODE=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    if [ "${gpus:-0}" -gt 0 ]; then NPROC_PER_NODE="$gpus"; fi
  fi
fi
TRAIN_SCRIPT="${TRAIN_SCRIPT-$ROOT/examples/train_tiny_gpt.py}"

need_number NNODES "$NNODES" 1 "a positive integer" 2
need_number "$RANK_FROM" "$NODE_RANK" 0 "a non-negative integer" 0
(( 10#$NODE_RANK < 10#$NNODES )) \
  || die "$RANK_FROM=$NODE_RANK is not below NNODES=$NNODES (ranks are 0..$((10#$NNODES - 1)))"
need_number NPROC_PER_NODE "$NPROC_PER_NODE" 1 "a positive integer" 8
need_number MASTER_PORT "$MASTER_PORT" 0 "an integer in 1024..65535" 29500
(( 10#$MASTER_PORT >= 1024 && 10#$MASTER_PORT <= 65535 )) \
  || die "MASTER_PORT must be an integer in 1024..65535, got '$MASTER_PORT'; pick a free port, e.g. MASTER_PORT=29500"
if [ -z "${MASTER_ADDR+x}" ]; then
  (( 10#$NNODES == 1 )) || die "MASTER_ADDR is required when NNODES=$NNODES > 1 (the address of node 0)"
  MASTER_ADDR=127.0.0.1
fi
case "$MASTER_ADDR" in
  *:*:*|\[*) die "MASTER_ADDR must be a host name or IPv4 address, got '$MASTER_ADDR': IPv6 addresses are not supported by this launcher; give node 0's host name" ;;
  *:*) die "MASTER_ADDR must be a host name or address without a port, got '$MASTER_ADDR'; put the port into MASTER_PORT (MASTER_ADDR=${MASTER_ADDR%%:*} MASTER_PORT=${MASTER_ADDR#*:})" ;;
esac
[[ "$MASTER_ADDR" =~ ^[A-Za-z0-9._-]+$ ]] || die "MASTER_ADDR is not a host name or address: '$MASTER_ADDR'"
[ -f "$TRAIN_SCRIPT" ] || die "TRAIN_SCRIPT not found: $TRAIN_SCRIPT"

PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
CMD=("$PYTHON" -m torch.distributed.run
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
  "$TRAIN_SCRIPT" ${ARGS[@]+"${ARGS[@]}"})

if [ "$DRY_RUN" -eq 1 ]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
echo "launch.sh: node $NODE_RANK/$NNODES, $NPROC_PER_NODE ranks, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
exec "${CMD[@]}"
