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
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import pruning_inference  # noqa: E402
import torch  # noqa: E402
from char_gpt import CharData, CharGPT, estimate_val_loss, lr_factor  # noqa: E402
from mnist_prune import build_model, parse_args, run, weight_stats  # noqa: E402

import sparsedist.sparsity as sp  # noqa: E402
from sparsedist.datasets import mnist_path, tinyshakespeare  # noqa: E402
from pruning_verdicts import (DONE, EXPECTED, GPT_SPARSITIES, HIGH, MAIN, SPARSITIES, done_means,  # noqa: E402,F401
                              judge, plots, stat, write)

STEPS = {"mlp": 3000, "cnn": 1500}


# --------------------------------------------------------------------------------------------------- the runs

def mnist_task(model: str, seed: int, *extra: str) -> tuple:
    return ("mnist", model, seed, tuple(str(e) for e in extra))


def small_width(model: str, target: int) -> float:
    """The width scale whose dense model holds about ``target`` Linear/Conv weights (bisection)."""
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
        target = round((1 - MAIN) * weight_stats(build_model(model))["weights"])
        t["small dense"] = mnist_task(model, seed, "--method", "dense", "--width", small_width(model, target))
    if claims & {"g"}:
        t["structured"] = mnist_task(model, seed, "--method", "structured", "--flops", 0.5)
        t["structured /8"] = mnist_task(model, seed, "--method", "structured", "--flops", 0.5, "--round-to", 8)
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
    _, model, seed, extra = task
    steps = max(20, int(STEPS[model] * scale))
    args = ["--model", model, "--seed", str(seed), "--steps", str(steps), "--data", data, *extra]
    if scale != 1.0:
        args += ["--frequency", str(max(1, int(50 * scale)))]
    result = run(parse_args(args))
    result["command"] = "python examples/mnist_prune.py " + " ".join(a if a != data else "DATA" for a in args)
    return result


def run_gpt(task: tuple, cfg: dict) -> dict:
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
                if label.startswith("structured"):
                    rows.setdefault(f"{label}: FLOPs ratio", []).append(r["pruned_flops"] / r["flops"])
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
