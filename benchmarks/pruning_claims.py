"""The pruning literature's claims (issue 19, item 6), checked on MNIST (MLP, CNN) and a small char-GPT.

    nice -n 10 python benchmarks/pruning_claims.py --data data/mnist.npz              # everything, 3 seeds
    python benchmarks/pruning_claims.py --data data/mnist.npz --claims a f --seeds 0  # a subset
    python benchmarks/pruning_claims.py --data tests/data/mnist_small.npz --scale 0.02 --seeds 0 --gpt-steps 20 \\
        --no-inference --out /tmp/claims                                              # smoke run

Claims: (a) at high sparsity, magnitude pruning beats random pruning; (b) global or ERK layer budgets beat
uniform; (c) gradual pruning during training beats pruning after training at the same final sparsity and total
steps; (d) retraining recovers accuracy, and keeping the surviving weights beats re-initialising them; (e) a
large sparse model beats a small dense one with as many non-zero weights (Zhu & Gupta); (f) the test-error
against sparsity curve, with the sparsity at which accuracy starts to fall; (g) structured pruning gives
measured CPU inference speed-ups where unstructured pruning at the same sparsity does not.

Each claim's expected outcome and numeric criterion (``EXPECTED``) were written into this script before the
runs and are printed before they start; the verdict is computed from the measurements. MNIST runs are
``examples/mnist_prune.py`` in one process (batch 128, SGD momentum 0.9, lr 0.05 cosine, weight decay 1e-4;
MLP 3000 steps, CNN 1500), at most ``--jobs`` at a time, each with one thread. The char-GPT runs use
``examples/char_gpt.py``'s model (``--gpt-width``/``--gpt-layers``, AdamW, warm-up + cosine), pruning the
transformer blocks' Linear weights. Every finished run is appended to OUT/runs.jsonl, and a re-run reuses
them (delete the file to start over). Writes docs/pruning_claims.{md,json} and PNGs (``--out``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

SPARSITIES = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99)
HIGH = 0.95            # "high sparsity" of claims a and b
MAIN = 0.9             # sparsity of claims c, d, e and of the done-means check
GPT_SPARSITIES = (0.5, 0.75, 0.9, 0.95)
STEPS = {"mlp": 3000, "cnn": 1500}

# Written before the runs. Accuracies are 3-seed means in points (%); GPT figures are validation losses (nats).
EXPECTED = {
    "a": "Magnitude pruning beats random pruning at 95 % sparsity: GMP by |w| above GMP by random scores by at "
         "least 1 point on the MLP and the CNN (and one-shot magnitude above one-shot random by at least 5 points "
         "at 90 %); on the char-GPT at 90 %, magnitude's validation loss at least 0.05 below random's.",
    "b": "Global or ERK budgets beat uniform layer-wise pruning at 95 % sparsity: the better of the two above "
         "uniform by more than 0.2 points (MLP and CNN; on the char-GPT at 90 % a loss lower by more than 0.01).",
    "c": "Gradual pruning during training (GMP) beats pruning after training (train half the steps dense, prune "
         "once to the same sparsity, retrain the other half with the learning rate rewound) at 90 %: GMP higher "
         "by more than 0.1 points (MLP, CNN; on the char-GPT a loss lower by more than 0.01).",
    "d": "Retraining recovers accuracy: after one-shot pruning to 90 % the accuracy before retraining is at least "
         "1 point below the retrained one, which is within 1 point of dense; keeping the surviving weights beats "
         "re-initialising them by more than 0.1 points (MLP, CNN). Weight rewinding is reported beside them.",
    "e": "A large sparse model beats a small dense one with as many non-zero weights: GMP at 90 % above a dense "
         "model whose hidden widths are scaled to hold the same number of weights, by more than 0.1 points.",
    "f": "Test error against sparsity (GMP, global budget, 0-99 %): accuracy stays within 0.5 points of dense up "
         "to at least 90 % sparsity and falls by more than 0.5 points at 99 % (MLP, CNN); the char-GPT's loss "
         "starts to rise earlier (a small model has less redundancy). One-shot pruning without retraining "
         "falls much earlier.",
    "g": "Structured pruning that halves the CNN's FLOPs runs at least 1.6x faster than dense at batch 256 on one "
         "CPU thread, while unstructured pruning at the same weight sparsity exported as CSR is not faster than "
         "dense (speed-up below 1.0); for the MLP at batch 256, structured faster than dense (above 1.0x) and CSR "
         "at the same sparsity below 1.0x.",
}
DONE = ("GMP at 90 % within 0.5 points of dense (3-seed mean) and above one-shot pruning without retraining, "
        "MLP and CNN; structured pruning of the CNN that halves its FLOPs within 1 point of dense after "
        "retraining and at least 1.6x faster at inference.")


# --------------------------------------------------------------------------------------------------- the runs

def mnist_task(model: str, seed: int, *extra: str) -> tuple:
    return ("mnist", model, seed, tuple(str(e) for e in extra))


def small_width(model: str, target: int) -> float:
    """The width scale whose dense model holds about ``target`` Linear/Conv weights (bisection)."""
    from mnist_prune import build_model, weight_stats
    lo, hi = 0.01, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if weight_stats(build_model(model, mid))["weights"] < target:
            lo = mid
        else:
            hi = mid
    return round(hi, 4)


def mnist_tasks(model: str, seed: int, claims: set[str]) -> dict[str, tuple]:
    """label -> task of one model and seed, for the claims asked for."""
    gmp = ("--method", "gmp")
    t = {"dense": mnist_task(model, seed, "--method", "dense", "--oneshot", *SPARSITIES)}
    if claims & {"a", "b", "c", "e", "f"}:
        for s in (SPARSITIES if "f" in claims else (MAIN, HIGH)):
            t[f"gmp {s}"] = mnist_task(model, seed, *gmp, "--sparsity", s, "--budget", "global")
    if claims & {"a"}:
        t["gmp random 0.95"] = mnist_task(model, seed, *gmp, "--sparsity", HIGH, "--score", "random",
                                          "--budget", "uniform")
    if claims & {"b"}:
        for b in ("uniform", "erk"):
            t[f"gmp {b} 0.95"] = mnist_task(model, seed, *gmp, "--sparsity", HIGH, "--budget", b)
    pr = ("--method", "prune-retrain", "--sparsity", MAIN)
    if claims & {"c", "d"}:
        t["prune-retrain"] = mnist_task(model, seed, *pr)
    if claims & {"d"}:
        t["prune-retrain reinit"] = mnist_task(model, seed, *pr, "--weights", "reinit")
        t["prune-retrain rewind"] = mnist_task(model, seed, *pr, "--weights", "rewind", "--rewind-at", 0.05)
        t["prune-retrain x3"] = mnist_task(model, seed, *pr, "--rounds", 3)
    if claims & {"e"}:
        from mnist_prune import build_model, weight_stats
        target = round((1 - MAIN) * weight_stats(build_model(model))["weights"])
        t["small dense"] = mnist_task(model, seed, "--method", "dense", "--width", small_width(model, target))
    if claims & {"g"}:
        t["structured"] = mnist_task(model, seed, "--method", "structured", "--flops", 0.5)
    return t


def gpt_tasks(seed: int, claims: set[str]) -> dict[str, tuple]:
    t = {"dense": ("gpt", seed, "dense", 0.0, "global", "magnitude")}
    if claims & {"a", "b", "c", "f"}:
        for s in (GPT_SPARSITIES if "f" in claims else (MAIN,)):
            t[f"gmp {s}"] = ("gpt", seed, "gmp", s, "global", "magnitude")
    if "a" in claims:
        t["gmp random 0.9"] = ("gpt", seed, "gmp", MAIN, "uniform", "random")
    if "b" in claims:
        for b in ("uniform", "erk"):
            t[f"gmp {b} 0.9"] = ("gpt", seed, "gmp", MAIN, b, "magnitude")
    if "c" in claims:
        t["prune-retrain"] = ("gpt", seed, "prune-retrain", MAIN, "global", "magnitude")
    return t


def run_mnist(task: tuple, data: str, scale: float) -> dict:
    from mnist_prune import parse_args, run
    _, model, seed, extra = task
    steps = max(20, int(STEPS[model] * scale))
    args = ["--model", model, "--seed", str(seed), "--steps", str(steps), "--data", data, *extra]
    if scale != 1.0:
        args += ["--frequency", str(max(1, int(50 * scale)))]
    result = run(parse_args(args))
    result["command"] = "python examples/mnist_prune.py " + " ".join(a if a != data else "DATA" for a in args)
    return result


def run_gpt(task: tuple, cfg: dict) -> dict:
    import torch
    from char_gpt import CharData, CharGPT, estimate_val_loss, lr_factor

    import sparsedist.sparsity as sp
    from sparsedist.datasets import tinyshakespeare
    _, seed, method, sparsity, budget, score = task
    torch.set_num_threads(1)
    steps, width, layers, batch, block = cfg["steps"], cfg["width"], cfg["layers"], 32, 64
    data = CharData(tinyshakespeare())
    torch.manual_seed(seed)
    model = CharGPT(data.vocab_size, width, layers, 4, block)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    include = lambda n, p: n.startswith("blocks.") and n.endswith(".weight") and p.dim() == 2  # noqa: E731
    pruner, lr = None, (lambda t: lr_factor(t + 1, steps, "cosine"))
    if method == "gmp":
        pruner = sp.GradualMagnitudePruning(model, opt, sparsity, begin_step=int(0.1 * steps),
                                            end_step=int(0.6 * steps), frequency=max(1, steps // 60),
                                            budget=budget, score=score, include=include, seed=seed)
    elif method == "prune-retrain":
        half = steps // 2
        pruner = sp.PruneRetrain(model, opt, sparsity, train_steps=steps - half, retrain_steps=half, budget=budget,
                                 score=score, include=include, seed=seed,
                                 lr_schedule=lambda t: lr_factor(t + 1, half, "cosine"))
        lr = None
    gen = torch.Generator().manual_seed(seed * 100)
    started = time.time()
    for t in range(steps):
        if lr is not None:
            for g in opt.param_groups:
                g["lr"] = 3e-3 * lr(t)
        x, y = data.batch("train", batch, block, gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        if pruner is not None:
            pruner.step()
    out = {"val_loss": estimate_val_loss(model, data, 24, batch, block, "cpu"), "seconds": round(time.time() - started),
           "sparsity": 0.0 if pruner is None else 1 - pruner.active_fraction,
           "parameters": sum(p.numel() for p in model.parameters())}
    if method == "dense":  # one-shot pruning of the trained model, no retraining
        out["oneshot"] = {}
        for s in GPT_SPARSITIES:
            for label, b, sc in (("global", "global", "magnitude"), ("random", "uniform", "random")):
                pruned = copy.deepcopy(model)
                sp.prune_model(pruned, 1 - s, budget=b, score=sc, include=include, seed=seed)
                out["oneshot"].setdefault(str(s), {})[label] = estimate_val_loss(pruned, data, 24, batch, block, "cpu")
    return out


def execute(task: tuple, data: str, scale: float, gpt: dict) -> dict:
    return run_mnist(task, data, scale) if task[0] == "mnist" else run_gpt(task, gpt)


class Store:
    """Finished runs, keyed by the task, kept in OUT/runs.jsonl so that an interrupted benchmark resumes."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path, self.fingerprint, self.results = path, fingerprint, {}
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["fingerprint"] == fingerprint:
                    self.results[json.dumps(row["task"])] = row["result"]

    def __contains__(self, task) -> bool:
        return json.dumps(list(task)) in self.results

    def get(self, task) -> dict:
        return self.results[json.dumps(list(task))]

    def add(self, task, result: dict) -> None:
        self.results[json.dumps(list(task))] = result
        with self.path.open("a") as f:
            f.write(json.dumps({"fingerprint": self.fingerprint, "task": list(task), "result": result}) + "\n")


def run_all(tasks: list[tuple], store: Store, jobs: int, data: str, scale: float, gpt: dict, log=print) -> None:
    todo = [t for t in dict.fromkeys(tasks) if t not in store]
    log(f"{len(tasks) - len(todo)} runs reused, {len(todo)} to run ({jobs} at a time)")
    if not todo:
        return
    if jobs == 0:  # in this process, one after the other
        for i, task in enumerate(todo, 1):
            store.add(task, execute(task, data, scale, gpt))
            log(f"  [{i}/{len(todo)}] {task}")
        return
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {pool.submit(execute, t, data, scale, gpt): t for t in todo}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            task = futures[fut]
            result = fut.result()
            store.add(task, result)
            metric = result.get("test_accuracy", result.get("val_loss"))
            log(f"  [{i}/{len(todo)}] {task}: {metric:.3f}")


# ------------------------------------------------------------------------------------------ measuring, judging

def stat(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def collect(store: Store, models: list[str], seeds: list[int], claims: set[str], gpt_seeds: list[int]) -> dict:
    """label -> metric statistics over seeds, per model; plus derived one-shot and before-retraining figures."""
    table: dict[str, dict] = {}
    for model in models:
        rows: dict[str, list[float]] = {}
        for seed in seeds:
            for label, task in mnist_tasks(model, seed, claims).items():
                r = store.get(task)
                rows.setdefault(label, []).append(r["test_accuracy"])
                if label == "dense":
                    for s, row in r.get("oneshot", {}).items():
                        for rule, acc in row.items():
                            rows.setdefault(f"oneshot {rule} {s}", []).append(acc)
                if "after_pruning" in r:
                    rows.setdefault(f"{label}: before retraining", []).append(r["after_pruning"][0])
                    rows.setdefault(f"{label}: dense before pruning", []).append(r["dense_before_pruning"])
                if label == "small dense":
                    rows.setdefault("small dense: weights", []).append(r["weights"])
                if label == "gmp 0.9":
                    rows.setdefault("gmp 0.9: non-zero weights", []).append(r["nonzero_weights"])
                if label == "structured":
                    rows.setdefault("structured: FLOPs ratio", []).append(r["pruned_flops"] / r["flops"])
        table[model] = {k: stat(v) for k, v in rows.items()}
    if gpt_seeds:
        rows = {}
        for seed in gpt_seeds:
            for label, task in gpt_tasks(seed, claims).items():
                r = store.get(task)
                rows.setdefault(label, []).append(r["val_loss"])
                for s, row in r.get("oneshot", {}).items():
                    for rule, loss in row.items():
                        rows.setdefault(f"oneshot {rule} {s}", []).append(loss)
        table["gpt"] = {k: stat(v) for k, v in rows.items()}
    return table


def m(table, model, label) -> float:
    return table[model][label]["mean"]


def judge(claim: str, table: dict, inference: dict | None) -> dict:
    """The criteria of EXPECTED[claim] applied to the measured means: findings and a verdict."""
    found, ok = [], []
    mnist = [k for k in ("mlp", "cnn") if k in table]
    gpt = "gpt" in table
    if claim == "a":
        for k in mnist:
            d1 = m(table, k, "gmp 0.95") - m(table, k, "gmp random 0.95")
            d2 = m(table, k, "oneshot global 0.9") - m(table, k, "oneshot random 0.9")
            ok += [d1 >= 1.0, d2 >= 5.0]
            found.append(f"{k}: GMP magnitude {m(table, k, 'gmp 0.95'):.2f} vs random "
                         f"{m(table, k, 'gmp random 0.95'):.2f}"
                         f" ({d1:+.2f}); one-shot at 90 %: {m(table, k, 'oneshot global 0.9'):.2f} vs "
                         f"{m(table, k, 'oneshot random 0.9'):.2f} ({d2:+.2f})")
        if gpt:
            d = m(table, "gpt", "gmp random 0.9") - m(table, "gpt", "gmp 0.9")
            ok.append(d >= 0.05)
            found.append(f"char-GPT loss: magnitude {m(table, 'gpt', 'gmp 0.9'):.3f} vs random "
                         f"{m(table, 'gpt', 'gmp random 0.9'):.3f} ({-d:+.3f})")
    elif claim == "b":
        for k in mnist:
            best = max(m(table, k, "gmp 0.95"), m(table, k, "gmp erk 0.95"))
            ok.append(best - m(table, k, "gmp uniform 0.95") > 0.2)
            found.append(f"{k}: global {m(table, k, 'gmp 0.95'):.2f}, ERK {m(table, k, 'gmp erk 0.95'):.2f}, "
                         f"uniform {m(table, k, 'gmp uniform 0.95'):.2f} (best - uniform "
                         f"{best - m(table, k, 'gmp uniform 0.95'):+.2f})")
        if gpt:
            best = min(m(table, "gpt", "gmp 0.9"), m(table, "gpt", "gmp erk 0.9"))
            ok.append(m(table, "gpt", "gmp uniform 0.9") - best > 0.01)
            found.append(f"char-GPT loss: global {m(table, 'gpt', 'gmp 0.9'):.3f}, ERK "
                         f"{m(table, 'gpt', 'gmp erk 0.9'):.3f}, uniform {m(table, 'gpt', 'gmp uniform 0.9'):.3f}")
    elif claim == "c":
        for k in mnist:
            d = m(table, k, "gmp 0.9") - m(table, k, "prune-retrain")
            ok.append(d > 0.1)
            iterative = (f"; iterative x3 {m(table, k, 'prune-retrain x3'):.2f}"
                         if "prune-retrain x3" in table[k] else "")
            found.append(f"{k}: GMP {m(table, k, 'gmp 0.9'):.2f} vs prune-retrain {m(table, k, 'prune-retrain'):.2f}"
                         f" ({d:+.2f}){iterative}")
        if gpt:
            d = m(table, "gpt", "prune-retrain") - m(table, "gpt", "gmp 0.9")
            ok.append(d > 0.01)
            found.append(f"char-GPT loss: GMP {m(table, 'gpt', 'gmp 0.9'):.3f} vs prune-retrain "
                         f"{m(table, 'gpt', 'prune-retrain'):.3f}")
    elif claim == "d":
        for k in mnist:
            before, after = m(table, k, "prune-retrain: before retraining"), m(table, k, "prune-retrain")
            keep_gain = after - m(table, k, "prune-retrain reinit")
            ok += [after - before >= 1.0, m(table, k, "dense") - after <= 1.0, keep_gain > 0.1]
            found.append(f"{k}: before retraining {before:.2f}, retrained {after:.2f} "
                         f"(dense {m(table, k, 'dense'):.2f});"
                         f" kept weights {after:.2f} vs re-initialised {m(table, k, 'prune-retrain reinit'):.2f} "
                         f"({keep_gain:+.2f}); weights rewound {m(table, k, 'prune-retrain rewind'):.2f}")
    elif claim == "e":
        for k in mnist:
            d = m(table, k, "gmp 0.9") - m(table, k, "small dense")
            ok.append(d > 0.1)
            found.append(f"{k}: sparse (90 %, {m(table, k, 'gmp 0.9: non-zero weights'):.0f} non-zero) "
                         f"{m(table, k, 'gmp 0.9'):.2f} vs small dense ({m(table, k, 'small dense: weights'):.0f} "
                         f"weights) {m(table, k, 'small dense'):.2f} ({d:+.2f})")
    elif claim == "f":
        for k in mnist:
            dense = m(table, k, "dense")
            keeps = [s for s in SPARSITIES if m(table, k, f"gmp {s}") >= dense - 0.5]
            knee = max([s for s in SPARSITIES if all(m(table, k, f"gmp {x}") >= dense - 0.5
                                                     for x in SPARSITIES if x <= s)], default=0.0)
            ok += [knee >= 0.9, dense - m(table, k, f"gmp {SPARSITIES[-1]}") > 0.5]
            curve = ", ".join(f"{100 * s:g}%: {m(table, k, f'gmp {s}'):.2f}" for s in SPARSITIES)
            shot = ", ".join(f"{100 * s:g}%: {m(table, k, f'oneshot global {s}'):.2f}" for s in SPARSITIES)
            found.append(f"{k}: dense {dense:.2f}; GMP {curve}; within 0.5 of dense up to {100 * knee:g} % "
                         f"(every point within: {[100 * s for s in keeps]}); one-shot {shot}")
        if gpt:
            curve = ", ".join(f"{100 * s:g}%: {m(table, 'gpt', f'gmp {s}'):.3f}" for s in GPT_SPARSITIES)
            found.append(f"char-GPT loss: dense {m(table, 'gpt', 'dense'):.3f}; GMP {curve}")
    elif claim == "g":
        if inference is None:
            return {"claim": claim, "expected": EXPECTED[claim], "found": ["not measured"], "verdict": "not run"}
        for k, rows in inference["models"].items():
            same = next(n for n in rows if n.startswith("csr@") and n not in ("csr@0.90", "csr@0.95"))
            s, c = rows["structured"]["batch256"]["speedup"], rows[same]["batch256"]["speedup"]
            ok += [s >= 1.6 if k == "cnn" else s > 1.0, c < 1.0]
            found.append(f"{k}, batch 256: structured {s:.2f}x, {same} {c:.2f}x (at 90 %: "
                         f"{rows['csr@0.90']['batch256']['speedup']:.2f}x); batch 1: structured "
                         f"{rows['structured']['batch1']['speedup']:.2f}x, {same} "
                         f"{rows[same]['batch1']['speedup']:.2f}x")
    verdict = "reproduced" if ok and all(ok) else ("partly reproduced" if any(ok) else "not reproduced")
    return {"claim": claim, "expected": EXPECTED[claim], "found": found, "criteria_met": ok, "verdict": verdict}


def done_means(table: dict, inference: dict | None) -> list[str]:
    out = []
    for k in ("mlp", "cnn"):
        if k not in table or "gmp 0.9" not in table[k]:
            continue
        gap = m(table, k, "dense") - m(table, k, "gmp 0.9")
        shot = m(table, k, "oneshot global 0.9")
        out.append(f"{k}: GMP 90 % {m(table, k, 'gmp 0.9'):.2f} vs dense {m(table, k, 'dense'):.2f} (gap {gap:+.2f}, "
                   f"target <= 0.5: {'met' if gap <= 0.5 else 'missed'}); one-shot without retraining {shot:.2f} "
                   f"({'below' if shot < m(table, k, 'gmp 0.9') else 'NOT below'} GMP)")
    if "cnn" in table and "structured" in table["cnn"]:
        gap = m(table, "cnn", "dense") - m(table, "cnn", "structured")
        speed = inference["models"]["cnn"]["structured"]["batch256"]["speedup"] if inference else float("nan")
        out.append(f"cnn structured ({m(table, 'cnn', 'structured: FLOPs ratio'):.3f} of the FLOPs): "
                   f"{m(table, 'cnn', 'structured'):.2f} vs dense {m(table, 'cnn', 'dense'):.2f} (gap {gap:+.2f}, "
                   f"target <= 1: {'met' if gap <= 1.0 else 'missed'}); inference {speed:.2f}x at batch 256 "
                   f"(target >= 1.6: {'met' if speed >= 1.6 else 'missed'})")
    return out


# --------------------------------------------------------------------------------------------------- reporting

def plots(table: dict, out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    panels = [k for k in ("mlp", "cnn", "gpt") if k in table and "gmp 0.9" in table[k]]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
        for ax, k in zip(axes if len(panels) > 1 else [axes], panels):
            ss = [s for s in (GPT_SPARSITIES if k == "gpt" else SPARSITIES) if f"gmp {s}" in table[k]]
            for label, key, style in (("GMP (global)", "gmp {}", "o-"), ("one-shot, no retraining", "oneshot global {}",
                                                                          "s--"),
                                      ("one-shot random", "oneshot random {}", "x:")):
                pts = [(s, table[k][key.format(s)]) for s in ss if key.format(s) in table[k]]
                if not pts:
                    continue
                y = [(100 - p["mean"]) if k != "gpt" else p["mean"] for _, p in pts]
                err = [p["sd"] for _, p in pts]
                ax.errorbar([100 * s for s, _ in pts], y, yerr=err, fmt=style, label=label, capsize=3)
            base = table[k]["dense"]["mean"]
            ax.axhline(100 - base if k != "gpt" else base, color="k", lw=0.8, label="dense")
            ax.set_xlabel("sparsity of the pruned weights (%)")
            ax.set_ylabel("test error (%)" if k != "gpt" else "validation loss (nats)")
            ax.set_yscale("log")
            ax.set_title({"mlp": "MNIST MLP", "cnn": "MNIST CNN", "gpt": "char-GPT"}[k])
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "pruning_curve.png", dpi=110)
        names.append("pruning_curve.png")
    bars = [("dense", "dense"), ("GMP 90 %", "gmp 0.9"), ("prune-retrain", "prune-retrain"),
            ("iterative x3", "prune-retrain x3"), ("re-initialised", "prune-retrain reinit"),
            ("rewound", "prune-retrain rewind"), ("small dense", "small dense"), ("one-shot", "oneshot global 0.9"),
            ("structured ½ FLOPs", "structured")]
    models = [k for k in ("mlp", "cnn") if k in table]
    if models:
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4))
        for ax, k in zip(axes if len(models) > 1 else [axes], models):
            present = [(n, key) for n, key in bars if key in table[k]]
            ax.bar([n for n, _ in present], [table[k][key]["mean"] for _, key in present],
                   yerr=[table[k][key]["sd"] for _, key in present], capsize=3)
            ax.set_ylim(max(0, min(table[k][key]["mean"] for _, key in present) - 2), 100)
            ax.set_ylabel("test accuracy (%), mean of seeds")
            ax.set_title(f"MNIST {k.upper()}: 90 % sparsity (structured: half the FLOPs)")
            ax.tick_params(axis="x", rotation=35)
        fig.tight_layout()
        fig.savefig(out / "pruning_methods.png", dpi=110)
        names.append("pruning_methods.png")
    return names


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning_claims.json").write_text(json.dumps(report, indent=1))
    lines = ["# Pruning claims (issue 19, item 6)", "", f"Command: `{report['command']}`", "",
             report["setting"], "", "| claim | expected (written before the runs) | measured | verdict |",
             "|---|---|---|---|"]
    for c in report["claims"]:
        cells = [c["expected"], "<br>".join(c["found"])]
        cells = [x.replace("|", "\\|") for x in cells]
        lines.append(f"| ({c['claim']}) | {cells[0]} | {cells[1]} | **{c['verdict']}** |")
    lines += ["", "## Done means", "", f"Target: {DONE}", ""] + [f"- {x}" for x in report["done_means"]]
    lines += ["", "## Every configuration (mean ± sd over seeds; accuracy %, char-GPT validation loss)", ""]
    for k, rows in report["table"].items():
        lines += [f"### {k}", "", "| configuration | mean | sd | per seed |", "|---|---|---|---|"]
        for label, s in rows.items():
            lines.append(f"| {label} | {s['mean']:.3f} | {s['sd']:.3f} | "
                         f"{' / '.join(f'{v:.3f}' for v in s['values'])} |")
        lines.append("")
    lines += ["## Commands of the MNIST runs", ""] + [f"    {c}" for c in report["commands"]]
    (out / "pruning_claims.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="MNIST (.npz or IDX folder); default: $SPARSEDIST_MNIST, ./data")
    p.add_argument("--claims", nargs="*", default=list("abcdefg"), choices=list("abcdefg"))
    p.add_argument("--models", nargs="*", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--gpt-seeds", type=int, nargs="*", default=None, help="default: --seeds; none: no char-GPT")
    p.add_argument("--gpt-steps", type=int, default=600)
    p.add_argument("--gpt-width", type=int, default=128)
    p.add_argument("--gpt-layers", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the MNIST steps (smoke runs)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each; 0: in this process)")
    p.add_argument("--no-inference", action="store_true", help="skip claim g's latency measurement")
    p.add_argument("--reuse-inference", action="store_true", help="claim g: read OUT/pruning_inference.json "
                   "(written by an earlier run) instead of measuring again")
    p.add_argument("--out", default=str(ROOT / "docs"))
    p.add_argument("--runs", default=None, help="the runs file (default: OUT/pruning_runs.jsonl)")
    args = p.parse_args(argv)
    from sparsedist.datasets import mnist_path
    data = str(mnist_path(args.data))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    claims = set(args.claims)
    gpt_seeds = args.seeds if args.gpt_seeds is None else args.gpt_seeds
    if not claims & set("abcf"):
        gpt_seeds = []
    gpt = {"steps": args.gpt_steps, "width": args.gpt_width, "layers": args.gpt_layers}
    for c in sorted(claims):
        print(f"({c}) expected: {EXPECTED[c]}")
    print(f"done means: {DONE}")
    fingerprint = {"scale": args.scale, "gpt": gpt, "data": Path(data).name}
    store = Store(Path(args.runs) if args.runs else out / "pruning_runs.jsonl", fingerprint)
    tasks = [t for k in args.models for s in args.seeds for t in mnist_tasks(k, s, claims).values()]
    tasks += [t for s in gpt_seeds for t in gpt_tasks(s, claims).values()]
    run_all(tasks, store, args.jobs, data, args.scale, gpt)
    inference = None
    if "g" in claims and args.reuse_inference:
        inference = json.loads((out / "pruning_inference.json").read_text())
    elif "g" in claims and not args.no_inference:
        import pruning_inference
        inference = pruning_inference.measure()
        pruning_inference.write(inference, out, "python benchmarks/pruning_claims.py (claim g)")
    table = collect(store, args.models, args.seeds, claims, gpt_seeds)
    report = {
        "command": "python benchmarks/pruning_claims.py " + " ".join(a for a in (argv or sys.argv[1:])),
        "setting": (f"MNIST: seeds {args.seeds}, {STEPS['mlp']} (MLP) / {STEPS['cnn']} (CNN) steps x {args.scale}, "
                    f"batch 128, one process per run, {args.jobs} runs at a time on this 2-core machine (other "
                    f"sessions' jobs shared it). char-GPT: width {args.gpt_width}, {args.gpt_layers} layers, "
                    f"4 heads, block 64, batch 32, {args.gpt_steps} steps, AdamW 3e-3, seeds {gpt_seeds}; the "
                    f"blocks' Linear weights are pruned."),
        "claims": [judge(c, table, inference) for c in sorted(claims)],
        "done_means": done_means(table, inference),
        "table": table,
        "inference": inference,
        "commands": sorted({store.get(t)["command"] for t in tasks if t[0] == "mnist"}),
    }
    report["plots"] = plots(table, out)
    write(report, out)
    for c in report["claims"]:
        print(f"({c['claim']}) {c['verdict']}: " + "; ".join(c["found"]))
    for line in report["done_means"]:
        print("done means: " + line)
    return report


if __name__ == "__main__":
    main()
