#!/usr/bin/env bash
# Build and install Horovod 0.28.1 for the installed torch (2.13 here), with Gloo and MPI controllers.
#
# Horovod 0.28.1, the newest release, compiles its extension as C++14 while torch >= 2.1's headers need C++17
# (horovod issue #3996; the fix is merged upstream but unreleased). This script downloads the sdist, switches
# the two CMakeLists.txt to C++17 and builds it without build isolation against the torch already installed.
# About 4 minutes on 2 cores and 2.4 GB of peak memory. Idempotent: does nothing when `import horovod.torch`
# already works. The built wheel is kept in a cache keyed by the Python and torch versions, so another environment
# on the same machine (a new virtualenv, CI's fresh clone) installs it in seconds instead of building again.
# Every pip command pins torch==2.13.0 so the build can never replace torch.
#
#   bash scripts/build_horovod.sh
#   HOROVOD_BUILD_DIR=/somewhere bash scripts/build_horovod.sh   # where the sdist is unpacked (default: a temp dir)
#   SPARSEDIST_WHEEL_CACHE=/somewhere bash scripts/...           # wheel cache (default: ~/.cache/sparsedist/wheels)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
VERSION=0.28.1
start=$(date +%s)

if "$PY" -c "import horovod.torch" 2>/dev/null; then
    echo "build_horovod: horovod.torch already importable ($("$PY" -c 'import horovod; print(horovod.__version__)')); nothing to do"
    exit 0
fi

have() { command -v "$1" >/dev/null 2>&1; }

# Build tools and MPI headers (Open MPI comes from install_system.sh; repeated here so this script stands alone).
need=()
have cmake  || need+=(cmake)
have g++    || need+=(g++)
have make   || need+=(make)
have mpicxx || need+=(libopenmpi-dev openmpi-bin)
if ((${#need[@]})); then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    echo "build_horovod: apt-get install ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

pin=(-c "$here/constraints.txt" "torch==2.13.0")
"$PY" -m pip install -q "${pin[@]}" wheel packaging

# A wheel built earlier on this machine for the same Python and torch: install it and stop.
key="$("$PY" -c 'import sys, torch; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")')"
cache="${SPARSEDIST_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sparsedist/wheels}/horovod-$VERSION-$key"
if compgen -G "$cache/horovod-$VERSION-*.whl" >/dev/null \
        && "$PY" -m pip install -q "${pin[@]}" "$cache"/horovod-"$VERSION"-*.whl \
        && "$PY" -c "import horovod.torch" 2>/dev/null; then
    echo "build_horovod: installed the cached wheel from $cache in $(( $(date +%s) - start )) s"
    exit 0
fi

build_dir="${HOROVOD_BUILD_DIR:-}"
cleanup=""
if [[ -z "$build_dir" ]]; then
    build_dir="$(mktemp -d /tmp/sparsedist-hvd.XXXXXX)"
    cleanup="$build_dir"
fi
trap '[[ -n "$cleanup" ]] && rm -rf "$cleanup"' EXIT

src="$build_dir/horovod-$VERSION"
if [[ ! -d "$src" ]]; then
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$VERSION" -d "$build_dir"
    tar xzf "$build_dir/horovod-$VERSION.tar.gz" -C "$build_dir"
fi
# The one change 0.28.1 needs to build against torch >= 2.1 (upstream #3996).
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" \
    || { echo "build_horovod: could not switch horovod/torch/CMakeLists.txt to C++17" >&2; exit 1; }

echo "build_horovod: building Horovod $VERSION (takes a few minutes)"
mkdir -p "$cache"
HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    "$PY" -m pip wheel -q --no-deps --no-cache-dir --no-build-isolation -w "$cache" "$src"
"$PY" -m pip install -q "${pin[@]}" "$cache"/horovod-"$VERSION"-*.whl

"$PY" - <<'PY'
import horovod
import horovod.torch as hvd
assert hvd.gloo_built(), "Horovod was built without Gloo"
print("build_horovod: horovod", horovod.__version__, "gloo:", hvd.gloo_built(), "mpi:", hvd.mpi_built())
PY
echo "build_horovod: done in $(( $(date +%s) - start )) s"
