#!/bin/bash
# Submit one of the sbatch templates with resources taken from documented variables.
#
#   slurm/submit.sh srun|torchrun SCRIPT [ARGS...]
#
#   srun      slurm/ddp_srun.sbatch: one srun task per GPU (per CPU slot when GPUS_PER_NODE=0)
#   torchrun  slurm/ddp_torchrun.sbatch: srun starts torchrun once per node, c10d rendezvous
#
# Variables (all optional):
#   NODES           number of nodes                                   (default 1)
#   GPUS_PER_NODE   GPUs per node; 0 for CPU-only nodes               (default 0)
#   TASKS_PER_NODE  training processes per node                       (default GPUS_PER_NODE, or 1 if 0)
#   CPUS_PER_TASK   CPUs per training process                         (default 1; torchrun: x TASKS_PER_NODE)
#   TIME            time limit, SLURM syntax (minutes, HH:MM:SS, ...)  (default 00:30:00)
#   PARTITION       partition                                         (default: the cluster's default)
#   ACCOUNT         account to charge                                 (default: none)
#   JOB_NAME        job name                                          (default: the template's)
#   OUTPUT          output file pattern                               (default: sparsedist-%x-%j.out)
#   SBATCH_EXTRA    further sbatch options, e.g. "--exclusive --wait"
# The templates themselves read PYTHON, MASTER_ADDR/MASTER_PORT, NPROC_PER_NODE, RDZV_PORT, SRUN_EXTRA
# (see their headers); sbatch passes the environment through.
#
# Prints sbatch's output (the job id; with --parsable in SBATCH_EXTRA, only the id).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -lt 2 || ( "$1" != srun && "$1" != torchrun ) ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
kind="$1"; shift

NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-0}"
if [[ "$GPUS_PER_NODE" -gt 0 ]]; then default_tasks="$GPUS_PER_NODE"; else default_tasks=1; fi
TASKS_PER_NODE="${TASKS_PER_NODE:-$default_tasks}"
CPUS_PER_TASK="${CPUS_PER_TASK:-1}"
TIME="${TIME:-00:30:00}"

opts=(--nodes="$NODES" --time="$TIME")
[[ -n "${PARTITION:-}" ]] && opts+=(--partition="$PARTITION")
[[ -n "${ACCOUNT:-}" ]] && opts+=(--account="$ACCOUNT")
[[ -n "${JOB_NAME:-}" ]] && opts+=(--job-name="$JOB_NAME")
[[ -n "${OUTPUT:-}" ]] && opts+=(--output="$OUTPUT")
[[ "$GPUS_PER_NODE" -gt 0 ]] && opts+=(--gpus-per-node="$GPUS_PER_NODE")

if [[ "$kind" == srun ]]; then
    template="$here/ddp_srun.sbatch"
    opts+=(--ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK")
else
    template="$here/ddp_torchrun.sbatch"
    opts+=(--ntasks-per-node=1 --cpus-per-task="$((CPUS_PER_TASK * TASKS_PER_NODE))")
    export NPROC_PER_NODE="${NPROC_PER_NODE:-$TASKS_PER_NODE}"
fi

# shellcheck disable=SC2086
exec sbatch "${opts[@]}" ${SBATCH_EXTRA:-} "$template" "$@"
