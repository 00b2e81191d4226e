"""benchmarks/paper_claims.py and benchmarks/density_sweep.py: the claim logic and reports with synthetic runs
(in-process, no training), then each script end to end in a tiny configuration (30 steps, 2 ranks, one seed)."""

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

paper_claims = importlib.import_module("paper_claims")
density_sweep = importlib.import_module("density_sweep")

# synthetic final accuracies: top-k + EF close to DDP, no-EF far below, DGC below top-k (so `dgc` must fail)
ACCURACY = {"ddp": 97.0, "fp16": 96.9, "topk": 96.6, "noef": 90.0, "dgc": 96.0, "variance": 96.5, "threshold": 96.2,
            "randk": 94.0, "rigl": 98.0, "static": 97.0}


def fake_run(script: str, args: list[str], nproc: int, timeout: float) -> dict:
    """What run_example returns, made up from the arguments: deterministic, with a small per-seed wobble."""
    seed = int(args[args.index("--seed") + 1])
    if script == "mnist_rigl.py":
        method = args[args.index("--method") + 1]
        erk = args[args.index("--distribution") + 1] == "erk"
        return {"test_accuracy": ACCURACY[method] + (0.5 if erk else 0.0) + 0.01 * seed}
    kind = args[args.index("--compressor") + 1]
    if "--no-error-feedback" in args:
        kind = "noef"
    run = {"test_accuracy": ACCURACY[kind] + 0.01 * seed, "seconds": 1.0}
    if kind not in ("ddp", "fp16"):
        tau = float(args[args.index("--threshold") + 1]) if "--threshold" in args else 0.0025
        sent = 1e7 * 0.0025 / tau  # threshold: bytes inversely proportional to tau; variance sends what tau=0.0025 does
        run.update(bytes_sent=sent, bytes_dense=3e9, compression_ratio=3e9 / sent, density=0.001)
    if "--eval-every" in args:
        final = run["test_accuracy"]
        run["history"] = [{"step": s, "test_accuracy": final - (3 - s // 100) * (2 if kind == "randk" else 1)}
                          for s in (100, 200, 300)]
    return run


def test_every_claim_prints_its_expectation_first_and_computes_its_verdict(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(paper_claims, "run_example", fake_run)
    report = paper_claims.main(["--seeds", "0", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(report["claims"]) == set(paper_claims.CLAIMS)
    for name, claim in paper_claims.CLAIMS.items():
        expected_at = out.index(f"EXPECTED: {claim.expected}")
        assert expected_at < out.index(f"VERDICT {name}:")
        result = report["claims"][name]
        assert result["rows"] and result["checks"]
        assert result["verdict"] == ("reproduced" if all(c["passed"] for c in result["checks"]) else "not reproduced")
        for row in result["rows"]:
            assert len(row["accuracy"]) == 2 and row["sd"] > 0
    first_run = out.index("  [")  # the first run's log line comes after the first claim's expectation
    assert out.index("EXPECTED:") < first_run
    verdicts = {name: r["verdict"] for name, r in report["claims"].items()}
    assert verdicts == {"ef": "reproduced", "dgc": "not reproduced", "variance": "reproduced",
                        "randk": "reproduced", "rigl": "reproduced"}
    assert report["claims"]["variance"]["extra"]["threshold"] == pytest.approx(0.0025, rel=0.2)
    # runs shared between claims (DDP, top-k at 0.001 in ef and dgc) ran once
    assert len(report["commands"]) == len(set(report["commands"]))
    md = (tmp_path / "paper_claims.md").read_text()
    assert all(f"### `{name}`" in md for name in paper_claims.CLAIMS)
    assert json.loads((tmp_path / "paper_claims.json").read_text())["claims"]["ef"]["verdict"] == "reproduced"


def test_density_sweep_reports_every_point_with_reference_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(paper_claims, "run_example", fake_run)
    report = density_sweep.main(["--densities", "0.001", "0.01", "--thresholds", "0.005", "--alphas", "1",
                                 "--out", str(tmp_path)])
    points = report["points"]
    assert [p["compressor"] for p in points] == ["topk", "topk", "randk", "randk", "dgc", "dgc", "threshold",
                                                 "variance", "ddp", "fp16"]
    ddp, fp16 = points[-2:]
    assert ddp["bytes_sent"] == 3e9 and fp16["bytes_sent"] == 1.5e9
    assert (tmp_path / "density_sweep_mnist.png").stat().st_size > 10_000
    assert (tmp_path / "density_sweep.md").read_text().count("\n| ") == len(points) + 1


def _script(name: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_paper_claims_end_to_end_smoke(tmp_path):
    _script("paper_claims.py", "--claim", "ef", "--steps", "30", "--seeds", "0", "--out", str(tmp_path))
    claim = json.loads((tmp_path / "paper_claims.json").read_text())["claims"]["ef"]
    assert [r["label"] for r in claim["rows"]] == ["DDP", "top-k + EF", "top-k, no EF"]
    assert all(r["runs"][0]["steps"] == 30 and 0 <= r["accuracy"][0] <= 100 for r in claim["rows"])
    assert claim["rows"][0]["accuracy"][0] > 30  # DDP: well above chance after 30 steps
    assert claim["rows"][1]["bytes_sent"] == claim["rows"][2]["bytes_sent"] > 0
    assert claim["verdict"] in ("reproduced", "not reproduced")
    assert "**Verdict:" in (tmp_path / "paper_claims.md").read_text()


def test_rigl_runs_are_read_from_the_result_line():
    run = paper_claims.run_example("mnist_rigl.py", ["--method", "rigl", "--steps", "30", "--seed", "0"], 2, 300)
    assert run["method"] == "rigl" and run["steps"] == 30 and 20 < run["test_accuracy"] <= 100


def test_density_sweep_end_to_end_smoke(tmp_path):
    _script("density_sweep.py", "--compressors", "topk", "--densities", "0.01", "--references", "ddp", "--steps",
            "30", "--out", str(tmp_path))
    report = json.loads((tmp_path / "density_sweep.json").read_text())
    topk, ddp = report["points"]
    assert topk["compressor"] == "topk" and ddp["compressor"] == "ddp"
    assert 0 < topk["bytes_sent"] < ddp["bytes_sent"] == topk["runs"][0]["bytes_dense"]
    assert (tmp_path / "density_sweep_mnist.png").exists()



def test_overlap_benchmark_smoke(tmp_path):
    """benchmarks/overlap.py on loopback, tiny: the four times and both ratios come out for each mode and density."""
    out = tmp_path / "overlap.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", str(ROOT / "benchmarks" / "overlap.py"), "--width", "64",
                           "--depth", "3", "--steps", "2", "--warmup", "1", "--densities", "0.05,0.5",
                           "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["density"]) for r in rows] == [("exact", 0.05), ("exact", 0.5), ("sampled", 0.05),
                                                          ("sampled", 0.5)]
    assert all(r["ranks"] == 2 for r in rows)
    for r in rows:
        assert min(r["compute_s"], r["exchange_s"], r["overlapped_s"], r["synchronous_s"]) > 0
        assert r["overlapped_vs_max"] == r["overlapped_s"] / max(r["compute_s"], r["exchange_s"])


def test_selection_benchmark_times_every_compressor_on_a_small_tensor():
    selection = importlib.import_module("selection")
    rows = selection.main(["--numel", "300000", "--repeats", "1"])
    assert len(rows) == 10 and all(r["seconds"] >= 0 for r in rows)
    sent = {(r["compressor"], r["density"]): r["sent"] for r in rows}
    assert sent[("topk (exact)", 0.001)] == 300 and sent[("topk (exact)", 0.01)] == 3000
    assert sent[("randk", 0.01)] == 3000 and 150 <= sent[("topk (sampled)", 0.001)] <= 300


def test_estimate_tables_rebuild_the_documented_tables():
    """benchmarks/estimate_tables.py turns docs/estimate_emulated.json into docs/estimate.md's tables."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "estimate_tables.py"),
                          str(ROOT / "docs" / "estimate_emulated.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for heading in ("#### 100mbit", "#### 1gbit"):
        assert heading in out.stdout
    assert "| dense allreduce (DDP) | 1 | ring allreduce |" in out.stdout
