"""benchmarks/pruning_claims.py with made-up runs (its expectations come first, its verdicts follow from the
numbers, its report is written) and benchmarks/pruning_inference.py in a tiny configuration."""

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_MNIST = ROOT / "tests" / "data" / "mnist_small.npz"  # exists; the runs are faked
sys.path.insert(0, str(ROOT / "benchmarks"))
claims = importlib.import_module("pruning_claims")
inference = importlib.import_module("pruning_inference")


def fake_execute(task, data, scale, gpt):
    """Accuracies shaped like the expected outcomes, except claim e (small dense wins) so one verdict fails."""
    if task[0] == "gpt":
        _, seed, method, sparsity, budget, score = task
        loss = 1.8 + sparsity * 0.2 + (0.3 if score == "random" else 0) + (0.05 if budget == "uniform" else 0)
        out = {"val_loss": loss + (0.05 if method == "prune-retrain" else 0) + 0.001 * seed}
        if method == "dense":
            out["oneshot"] = {str(s): {"global": 2 + s, "random": 3 + s} for s in claims.GPT_SPARSITIES}
        return out
    _, model, seed, extra = task
    opts = dict(zip(extra[::2], extra[1::2]))
    method, s = opts["--method"], float(opts.get("--sparsity", 0))
    acc = 98.0 + 0.01 * seed
    r = {"command": f"python examples/mnist_prune.py {' '.join(extra)}", "weights": 1000, "nonzero_weights": 100}
    if method == "dense" and "--width" in opts:
        acc = 99.0  # the small dense model wins: claim e must come out "not reproduced"
    elif method == "dense":
        r["oneshot"] = {str(x): {"global": 97 - 20 * x, "uniform": 96, "erk": 96, "random": 50}
                        for x in claims.SPARSITIES}
    elif method == "gmp":
        acc -= max(0.0, s - 0.9) * 30 + (3 if opts.get("--score") == "random" else 0) + \
            (1 if opts.get("--budget") == "uniform" else 0)
    elif method == "prune-retrain":
        acc -= 0.5 + (1 if opts.get("--weights") == "reinit" else 0)
        r.update(after_pruning=[80.0], dense_before_pruning=97.5)
    else:
        acc -= 0.4
        r.update(pruned_flops=50, flops=100)
    r["test_accuracy"] = acc
    return r


def test_claims_report_from_fake_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(claims, "execute", fake_execute)
    report = claims.main(["--data", str(SMALL_MNIST), "--seeds", "0", "1", "--jobs", "0",
                          "--no-inference", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.index("(a) expected") < out.index("to run") < out.index("(a) reproduced")
    verdicts = {c["claim"]: c["verdict"] for c in report["claims"]}
    assert verdicts == {"a": "reproduced", "b": "reproduced", "c": "reproduced", "d": "reproduced",
                        "e": "not reproduced", "f": "reproduced", "g": "not run"}
    md = (tmp_path / "pruning_claims.md").read_text()
    assert "**not reproduced**" in md and "examples/mnist_prune.py" in md
    assert any("gap +0.00" in line or "met" in line for line in report["done_means"])
    assert (tmp_path / "pruning_curve.png").exists() and (tmp_path / "pruning_methods.png").exists()
    # a second call reuses every stored run
    runs = (tmp_path / "pruning_runs.jsonl").read_text().splitlines()
    claims.main(["--data", str(SMALL_MNIST), "--seeds", "0", "1", "--jobs", "0", "--no-inference",
                 "--out", str(tmp_path)])
    assert "0 to run" in capsys.readouterr().out
    assert len((tmp_path / "pruning_runs.jsonl").read_text().splitlines()) == len(runs)
    assert json.loads(runs[0])["fingerprint"]["scale"] == 1.0


def test_inference_benchmark_tiny(tmp_path):
    report = inference.measure(kinds=("mlp",), batches=(1,), reps=2, calls=1, log=lambda s: None)
    rows = report["models"]["mlp"]
    assert set(rows) >= {"dense", "structured", "csr@0.90", "csr@0.95", "2:4 dense", "2:4 csr"}
    assert rows["structured"]["flops"] <= 0.5 * rows["dense"]["flops"]
    assert rows["csr@0.90"]["weight_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert rows["csr@0.90"]["storage_bytes"] < 0.3 * rows["dense"]["storage_bytes"]
    assert rows["dense"]["batch1"]["speedup"] == 1.0
    inference.write(report, tmp_path, "test", batches=(1,))
    assert "| structured |" in (tmp_path / "pruning_inference.md").read_text()
