#!/bin/bash
# Several nodes with torchrun and c10d rendezvous: run this same command on every node.
#
#   NNODES=2 RDZV_HOST=node01 launch/torchrun_multi.sh SCRIPT [ARGS...]      # on each of the 2 nodes
#
# Variables:
#   NNODES          number of nodes (required); "MIN:MAX" for elastic jobs
#   RDZV_HOST       a host every node can reach, normally the first node (required); it hosts the rendezvous
#   RDZV_PORT       rendezvous port on RDZV_HOST (default 29400)
#   RDZV_ID         job id shared by the nodes (default: sparsedist-$NNODES-$RDZV_HOST-$RDZV_PORT)
#   NODE_RANK       this node's rank (optional: c10d assigns ranks; set it to pin node 0 to RDZV_HOST)
#   NPROC_PER_NODE  processes per node (default: number of GPUs, or 1 without GPUs)
#   PYTHON          interpreter (default: python)
#   TORCHRUN_EXTRA  further torchrun options, e.g. "--max-restarts=3"
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE defaults to 1 here: every restart (--max-restarts) then rendezvouses in a fresh
# store; torch's shared store can hand a restarted worker its peer's stale address (pytorch/pytorch#135712).
# Multi-homed nodes: export GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the cluster network's interface.
set -euo pipefail
if [[ $# -eq 0 || -z "${NNODES:-}" || -z "${RDZV_HOST:-}" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2
fi
PYTHON="${PYTHON:-python}"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
RDZV_PORT="${RDZV_PORT:-29400}"
RDZV_ID="${RDZV_ID:-sparsedist-$NNODES-$RDZV_HOST-$RDZV_PORT}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')"
fi
node_rank=()
[[ -n "${NODE_RANK:-}" ]] && node_rank=(--node_rank="$NODE_RANK")
# shellcheck disable=SC2086
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" "${node_rank[@]}" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv_id="$RDZV_ID" ${TORCHRUN_EXTRA:-} "$@"
