#!/bin/bash
# mpirun, one node or several. Each rank calls sparsedist.dist.init(), which reads the MPI launcher's variables
# (Open MPI, MPICH/Hydra, PMIx) and, without MASTER_ADDR/MASTER_PORT, agrees on a rendezvous over mpi4py; the
# sparse collectives can run over MPI itself with sparsedist.integrations.mpi.MPIBackend.
#
#   NP=4 launch/mpirun.sh SCRIPT [ARGS...]                                  # this node
#   NP=8 HOSTS=node01:4,node02:4 launch/mpirun.sh SCRIPT [ARGS...]          # two nodes, 4 slots each
#
# Variables:
#   NP            number of processes (default 2)
#   HOSTS         host list "host:slots,..." (default: this node)
#   MPIRUN        the mpirun to use (default: mpirun)
#   PYTHON        interpreter (default: python)
#   MPIRUN_EXTRA  further mpirun options, e.g. "--mca btl_tcp_if_include eth0"
# Open MPI: --bind-to none (PyTorch runs its own threads), --oversubscribe (more ranks than cores is allowed),
# --allow-run-as-root when run as root, and PATH, PYTHONPATH, OMP_NUM_THREADS, MASTER_ADDR/PORT and the
# *_SOCKET_IFNAME variables exported to every rank. MPICH/Hydra passes the whole environment by default.
set -euo pipefail
if [[ $# -eq 0 ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; fi
MPIRUN="${MPIRUN:-mpirun}"
PYTHON="${PYTHON:-python}"
NP="${NP:-2}"
opts=(-np "$NP")
[[ -n "${HOSTS:-}" ]] && opts+=(-H "$HOSTS")
if "$MPIRUN" --version 2>&1 | grep -q "Open MPI"; then
    opts+=(--bind-to none --oversubscribe)
    [[ $(id -u) -eq 0 ]] && opts+=(--allow-run-as-root)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    for v in PATH PYTHONPATH OMP_NUM_THREADS MASTER_ADDR MASTER_PORT GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
        [[ -n "${!v:-}" ]] && opts+=(-x "$v")
    done
fi
# shellcheck disable=SC2086
exec "$MPIRUN" "${opts[@]}" ${MPIRUN_EXTRA:-} "$PYTHON" "$@"
