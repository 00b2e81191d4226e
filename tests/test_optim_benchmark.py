"""benchmarks/adam_exchange.py: its in-process simulation of P workers against the same configuration on real
processes with ReferenceExchange (the same losses and bytes), and its report on synthetic records."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from sparsedist.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

adam_exchange = importlib.import_module("adam_exchange")
adam_report = importlib.import_module("adam_report")


def _config(method: str, value_dtype: str) -> dict:
    return {"model": "chargpt", "method": method, "density": 0.05, "steps": 4, "seed": 3, "workers": 2,
            "value_dtype": value_dtype, "warmup": 1, "eval_every": 2, "eval_batches": 2, "mode": "sim"}


def _dist(rank: int, world: int, cfg: dict):
    return adam_exchange.run_dist({**cfg, "mode": "dist"})


def test_simulation_is_what_real_processes_compute():
    """Bit for bit: the same validation losses and the same bytes at every evaluation (a dense warm-up step,
    then sparse steps with fp16 values, whose sums are rounded as the collective rounds them), so the figures'
    simulated runs stand for real ones."""
    cfg = _config("sparse-adamw", "float16")
    sim = adam_exchange.run_sim(cfg)
    real = run_distributed(_dist, 2, args=(cfg,), timeout=180)[0]
    assert sim["history"] == real["history"]
    assert sim["bytes_dense"] == real["bytes_dense"]
    assert sim["history"][-1][2] < sim["bytes_dense"] / 2  # mostly sparse


def _record(method, density, steps, seed, final, sent):
    hist = [[s, final + 0.5 * (1 - s / steps), sent * s / steps] for s in range(steps // 4, steps + 1, steps // 4)]
    return {"model": "chargpt", "method": method, "density": density, "steps": steps, "seed": seed, "workers": 2,
            "value_dtype": "float16", "warmup": 1 if method == "sparse-adamw" else 0, "params": 1000,
            "history": hist, "final": final, "bytes_sent": sent, "bytes_dense": 4000.0 * steps}


def test_report_states_each_target_with_its_verdict(tmp_path):
    recs = [_record("ddp", 1.0, 300, s, 2.00 + 0.01 * s, 4000.0 * 300) for s in range(3)]
    recs += [_record("sparse-adamw", 0.01, 360, s, 2.02 + 0.01 * s, 4000.0 + 60.0 * 359) for s in range(3)]
    recs += [_record("sparse-adamw", 0.001, 450, s, 2.10, 4000.0 + 8.0 * 449) for s in range(3)]
    adam_report.write_report(recs, tmp_path / "r", "chargpt", 300)
    text = (tmp_path / "r.md").read_text()
    assert "DDP's mean after 300 steps: **2.0100**" in text
    assert "density 0.01 in 1.2x DDP's steps: loss 2.0300 vs 2.0100 + 0.02: **met** (+0.0200)" in text
    assert "density 0.001 in 1.5x DDP's steps: loss 2.1000 vs 2.0100 + 0.02: **missed** (+0.0900)" in text
    assert "66.7x fewer after warm-up" in text  # 4000 per dense step against 60 per sparse step
    assert (tmp_path / "r.png").stat().st_size > 10_000
