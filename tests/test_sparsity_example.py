"""End-to-end: examples/mnist_rigl.py under torchrun with 2 ranks, RigL + mask-aware exchange (short run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

def test_mnist_rigl_example_two_ranks(tmp_path, mnist_small):
    out = tmp_path / "result.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "mnist_rigl.py"), "--data", str(mnist_small), "--method", "rigl", "--steps", "40",
           "--update-every", "10", "--mask-aware", "--no-progress", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text().strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["steps"] == 40
    assert result["weight_density"] == pytest.approx(0.1, abs=1e-6)
    assert result["nonzero_weight_fraction"] <= result["weight_density"]
    assert result["mask_updates"] == 2  # updates at steps 10 and 20; none from floor(0.75 * 40) = 30
    assert result["test_acc"] > 0.5  # 40 steps of SGD already beat chance (0.1) by far
    comm = result["comm"]
    assert comm["steps"] == 40 and 0 < comm["bytes_sent"] < comm["bytes_dense"]
