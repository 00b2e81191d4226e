"""The examples run end to end under torchrun (2 ranks): the MNIST example and the default char-GPT demo."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_mnist_example_under_torchrun(tmp_path, mnist_small):
    out = tmp_path / "summary.json"
    _torchrun("mnist.py", "--data", str(mnist_small), "--compressor", "topk", "--density", "0.01", "--steps", "40",
              "--quiet", "--json", str(out))
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


def test_mnist_time_to_accuracy_flags(tmp_path):
    """--eval-every records accuracy against training seconds; --target-accuracy stops every rank at the same step;
    fp16 is PyTorch's own hook; --collective reaches the hook."""
    out = tmp_path / "fp16.json"
    _torchrun("mnist.py", "--compressor", "fp16", "--steps", "60", "--eval-every", "10", "--target-accuracy", "50",
              "--schedule", "constant", "--quiet", "--json", str(out))
    s = json.loads(out.read_text())
    hist = s["history"]
    assert [h["step"] for h in hist] == list(range(10, s["steps"] + 1, 10))
    assert hist[-1]["test_accuracy"] >= 50 and all(h["test_accuracy"] < 50 for h in hist[:-1])
    assert s["steps"] < 60, "the target is reached long before 60 steps"
    assert all(b["train_seconds"] > a["train_seconds"] for a, b in zip(hist, hist[1:]))
    out = tmp_path / "auto.json"
    _torchrun("mnist.py", "--compressor", "topk", "--collective", "dsar_split_allgather", "--steps", "10",
              "--quiet", "--json", str(out))
    assert set(json.loads(out.read_text())["collectives"]) == {"dsar_split_allgather"}
    bad = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist.py"), "--compressor", "ddp", "--collective",
                          "auto"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--collective applies to sparsedist's hooks" in bad.stderr


def test_char_gpt_fp16_and_target_loss(tmp_path):
    out = tmp_path / "summary.json"
    common = ["--steps", "40", "--eval-every", "5", "--eval-batches", "2", "--width", "32", "--layers", "1", "--quiet"]
    _torchrun("char_gpt.py", "--compressor", "fp16", *common, "--target-val-loss", "3.6", "--json", str(out))
    s = json.loads(out.read_text())
    assert s["history"][-1]["val_loss"] <= 3.6 and all(h["val_loss"] > 3.6 for h in s["history"][:-1])
    assert s["steps"] == s["history"][-1]["step"] < 40
    assert s["sparsity"]["gradients"]["compression_ratio"] == 2.0  # fp16 values, dense allreduce
    _torchrun("char_gpt.py", "--compressor", "topk", "--collective", "ssar_recursive_double", *common[:1], "6",
              *common[2:], "--json", str(out))
    assert set(json.loads(out.read_text())["sparsity"]["gradients"]["collectives"]) == {"ssar_recursive_double"}


def test_examples_without_mnist_stop_with_how_to_get_it(tmp_path):
    """No data: each MNIST example exits before any rendezvous, naming the path it tried and how to get MNIST."""
    missing = tmp_path / "nowhere" / "mnist.npz"
    for script in ("mnist.py", "mnist_rigl.py"):
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--data", str(missing)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, (script, proc.stderr[-2000:])
        assert str(missing) in proc.stderr and "torchvision.datasets.MNIST" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_char_gpt_fsdp_sparse_smoke(tmp_path):
    """examples/char_gpt_fsdp.py --sparse: FSDP2 + RigL + packed AdamW + the sparse reduce-scatter, 2 ranks."""
    out = tmp_path / "summary.json"
    _torchrun("char_gpt_fsdp.py", "--sparse", "--steps", "6", "--eval-every", "3", "--eval-batches", "2",
              "--width", "32", "--layers", "1", "--rigl-every", "2", "--quiet", "--json", str(out))
    s = json.loads(out.read_text())
    assert s["world_size"] == 2 and s["steps"] == 6
    assert 0 < s["exchange"]["bytes_sent"] < s["exchange"]["bytes_dense"]
    assert 0.85 < s["weight_sparsity"] < 0.95


def test_char_gpt_sparse_adamw_with_error_reset(tmp_path):
    """--sparse-adamw --error-reset: sparsedist.optim.AdamW through the top-k hook, the local models consolidated
    before each evaluation; --error-reset alone is refused."""
    out = tmp_path / "summary.json"
    _torchrun("char_gpt.py", "--sparse-adamw", "--error-reset", "--density", "0.01", "--steps", "12", "--eval-every",
              "6", "--eval-batches", "2", "--width", "32", "--layers", "1", "--lr-schedule", "cosine", "--quiet",
              "--json", str(out))
    s = json.loads(out.read_text())
    assert [h["step"] for h in s["history"]] == [6, 12]
    assert s["history"][-1]["val_loss"] < s["history"][0]["val_loss"] < 4.5
    assert s["compression_ratio"] > 2  # one dense warm-up step of twelve, the rest 1 %
    bad = subprocess.run([sys.executable, str(ROOT / "examples" / "char_gpt.py"), "--error-reset"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--error-reset is an option of --sparse-adamw" in bad.stderr
