#!/bin/bash
# Single node, several processes, with torchrun (standalone rendezvous on a free local port).
#
#   launch/torchrun_single.sh SCRIPT [ARGS...]
#   NPROC=4 launch/torchrun_single.sh examples/mnist.py --compressor topk --density 0.01
#
# Variables:
#   NPROC        processes on this node (default: number of GPUs, or 2 without GPUs)
#   PYTHON       interpreter (default: python)
#   TORCHRUN_EXTRA  further torchrun options, e.g. "--max-restarts=1"
# The script calls sparsedist.dist.init(), which reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*.
set -euo pipefail
if [[ $# -eq 0 ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; fi
PYTHON="${PYTHON:-python}"
if [[ -z "${NPROC:-}" ]]; then
    NPROC="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
# shellcheck disable=SC2086
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" ${TORCHRUN_EXTRA:-} "$@"
