#!/usr/bin/env bash
# Install the system tools sparsedist's launcher tests use: Open MPI + mpi4py, SLURM + munge, iproute2 (ip, tc).
#
# Idempotent and fast: every part is skipped when its tools are already present, and apt-get update runs
# only when something is missing. Debian/Ubuntu (apt-get); needs root for the apt part. Any pip command pins
# torch==2.13.0 (see constraints.txt) so that nothing here can replace the installed torch.
#
#   bash scripts/install_system.sh            # everything
#   SPARSEDIST_SKIP_APT=1 bash scripts/...    # only the pip part (machines without root)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
start=$(date +%s)

have() { command -v "$1" >/dev/null 2>&1; }

apt_pkgs=()
have mpirun    || apt_pkgs+=(openmpi-bin)
have mpicc     || apt_pkgs+=(libopenmpi-dev)
have slurmctld || apt_pkgs+=(slurmctld)
have slurmd    || apt_pkgs+=(slurmd)
have sbatch    || apt_pkgs+=(slurm-client)
have munged    || apt_pkgs+=(munge)
{ have ip && have tc; } || apt_pkgs+=(iproute2)

if ((${#apt_pkgs[@]})); then
    if [[ -n "${SPARSEDIST_SKIP_APT:-}" ]]; then
        echo "install_system: SPARSEDIST_SKIP_APT set; not installing ${apt_pkgs[*]}" >&2
    else
        SUDO=""
        if [[ $(id -u) -ne 0 ]]; then
            have sudo || { echo "install_system: need root (or sudo) to apt-get install ${apt_pkgs[*]}" >&2; exit 1; }
            SUDO="sudo"
        fi
        echo "install_system: apt-get install ${apt_pkgs[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
    fi
else
    echo "install_system: Open MPI, SLURM, munge, iproute2 already present"
fi

if "$PY" -c "import mpi4py" 2>/dev/null; then
    echo "install_system: mpi4py already present"
else
    echo "install_system: pip install mpi4py"
    "$PY" -m pip install -q -c "$here/constraints.txt" "mpi4py>=3.1" "torch==2.13.0"
fi

echo "install_system: done in $(( $(date +%s) - start )) s"
