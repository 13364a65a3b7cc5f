#!/usr/bin/env bash
# Multi-node launch of megatron_agg's example training (torchrun static rendezvous).
#
# Environment (validated up front):
#   MASTER_ADDR     address of node 0 (required when NNODES > 1; default 127.0.0.1 on one node)
#   MASTER_PORT     its port, 1024-65535 (default 29500)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank, 0..NNODES-1 (default 0; SLURM_NODEID if set)
#   NPROC_PER_NODE  ranks per node (default: the GPUs nvidia-smi sees, else 1)
#   TRAIN_SCRIPT    what to run (default: examples/train_tiny_gpt.py next to this script)
# Arguments are passed to the training script. --dry-run prints the torchrun command and exits.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 docker/launch.sh --device cuda --tp 2   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 docker/launch.sh --device cuda --tp 2   # node 1
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

die() { echo "launch.sh: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

DRY_RUN=0
ARGS=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then DRY_RUN=1; else ARGS+=("$a"); fi
done

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    if [ "${gpus:-0}" -gt 0 ]; then NPROC_PER_NODE="$gpus"; fi
  fi
fi
TRAIN_SCRIPT="${TRAIN_SCRIPT:-$ROOT/examples/train_tiny_gpt.py}"

is_int "$NNODES" && [ "$NNODES" -ge 1 ] || die "NNODES must be a positive integer, got '$NNODES'"
is_int "$NODE_RANK" || die "NODE_RANK must be a non-negative integer, got '$NODE_RANK'"
[ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK=$NODE_RANK is not below NNODES=$NNODES (ranks are 0..$((NNODES - 1)))"
is_int "$NPROC_PER_NODE" && [ "$NPROC_PER_NODE" -ge 1 ] || die "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"
is_int "$MASTER_PORT" && [ "$MASTER_PORT" -ge 1024 ] && [ "$MASTER_PORT" -le 65535 ] \
  || die "MASTER_PORT must be an integer in 1024..65535, got '$MASTER_PORT'"
if [ -z "${MASTER_ADDR:-}" ]; then
  [ "$NNODES" -eq 1 ] || die "MASTER_ADDR is required when NNODES=$NNODES > 1 (the address of node 0)"
  MASTER_ADDR=127.0.0.1
fi
[[ "$MASTER_ADDR" =~ ^[A-Za-z0-9._:-]+$ ]] || die "MASTER_ADDR is not a host name or address: '$MASTER_ADDR'"
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
