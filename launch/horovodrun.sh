#!/bin/bash
# horovodrun, one node or several (Horovod 0.28.1 built by scripts/build_horovod.sh).
#
#   NP=2 launch/horovodrun.sh SCRIPT [ARGS...]                              # this node
#   NP=8 HOSTS=node01:4,node02:4 launch/horovodrun.sh SCRIPT [ARGS...]      # two nodes (passwordless ssh)
#
# Variables:
#   NP            number of processes (default 2)
#   HOSTS         host list "host:slots,..." (default: localhost:NP)
#   CONTROLLER    gloo or mpi (default gloo)
#   NETWORK_INTERFACE  interface(s) for Horovod's traffic, e.g. eth0 (default: Horovod chooses)
#   PYTHON        interpreter (default: python)
#   HOROVODRUN_EXTRA  further horovodrun options, e.g. "--timeline-filename /tmp/tl.json"
# The script calls hvd.init(); sparsedist's Horovod optimizer exchanges sparse payloads with Horovod's
# collectives. With CONTROLLER=mpi as root, OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM) are set for you.
set -euo pipefail
if [[ $# -eq 0 ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; fi
PYTHON="${PYTHON:-python}"
NP="${NP:-2}"
HOSTS="${HOSTS:-localhost:$NP}"
CONTROLLER="${CONTROLLER:-gloo}"
case "$CONTROLLER" in
    gloo|mpi) ;;
    *) echo "CONTROLLER must be gloo or mpi, got '$CONTROLLER'" >&2; exit 2 ;;
esac
opts=(-np "$NP" -H "$HOSTS" "--$CONTROLLER")
[[ -n "${NETWORK_INTERFACE:-}" ]] && opts+=(--network-interface "$NETWORK_INTERFACE")
if [[ "$CONTROLLER" == mpi && $(id -u) -eq 0 ]]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# shellcheck disable=SC2086
exec horovodrun "${opts[@]}" ${HOROVODRUN_EXTRA:-} "$PYTHON" "$@"
