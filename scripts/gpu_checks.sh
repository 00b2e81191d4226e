#!/usr/bin/env bash
# The checks a session runs when a GPU is lent (one call of the device tool, from the repository root):
#
#     PYTHONUNBUFFERED=1 bash scripts/gpu_checks.sh            # writes its logs and JSON under $OUT
#
# 1. tests/test_cuda.py: the CUDA/NCCL paths against the same computation on the CPU;
# 2. benchmarks/selection.py on the GPU: each compressor's selection at 25M elements against one memory pass;
# 3. benchmarks/overlap.py at one rank on the GPU (NCCL): nothing crosses a wire, so "exchange" is the hook's
#    local work on the device and "overlapped" the training step that pays for it (docs/architecture.md).
#
# DEVICE=cpu runs the same on the CPU (SPARSEDIST_TEST_DEVICE=cpu, gloo), which checks the script itself; SMALL=1
# shrinks the benchmarks. Every step runs even if an earlier one fails; the exit status is the first failure's.
set -u -o pipefail
out=${OUT:-gpu_checks_out}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${SMALL:-0}" = 1 ]; then
    numel=300000; model=(--width 256 --depth 4 --steps 4)
else
    numel=25000000; model=()
fi
status=0
run() {  # run NAME COMMAND...: tee the output to $out/NAME.log, remember the first failure
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $name failed ($rc)"; [ "$status" = 0 ] && status=$rc; }
}
nvidia-smi 2>&1 | head -15 > "$out/nvidia-smi.txt" || true
python -c "import torch; print(torch.__version__, torch.cuda.is_available())" | tee "$out/torch.txt"
run test_cuda env SPARSEDIST_TEST_DEVICE="$device" python -m pytest -q tests/test_cuda.py
run selection python benchmarks/selection.py --device "$device" --numel "$numel"
run overlap torchrun --nproc_per_node=1 --master_port=29511 benchmarks/overlap.py --device "$device" "${model[@]}" \
    --json "$out/overlap_${device}_1rank.json"
exit "$status"
