"""The examples run end to end under torchrun (2 ranks): the MNIST example and the default char-GPT demo."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, *args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
           str(ROOT / "examples" / script), *args]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(not MNIST.exists(), reason=f"MNIST data not found at {MNIST}")
def test_mnist_example_under_torchrun(tmp_path):
    out = tmp_path / "summary.json"
    _torchrun("mnist.py", "--compressor", "topk", "--density", "0.01", "--steps", "40", "--quiet",
              "--json", str(out))
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 40
    assert summary["test_accuracy"] > 30.0  # well above chance (10%) after 40 steps
    assert summary["compression_ratio"] > 40


def test_char_gpt_demo_runs_on_the_bundled_text(tmp_path):
    out = tmp_path / "summary.json"
    stdout = _torchrun("char_gpt.py", "--steps", "12", "--eval-every", "6", "--eval-batches", "2", "--width", "32",
                       "--layers", "1", "--quiet", "--json", str(out))
    summary = json.loads(out.read_text())
    assert "MB saved" in stdout
    assert summary["history"][-1]["val_loss"] < summary["history"][0]["val_loss"] + 0.5
    assert summary["compression_ratio"] > 40
