"""Time-to-accuracy on an emulated cluster: plain DDP, PyTorch's ``fp16_compress_hook`` and each sparsedist
compressor (with ``collective="auto"``), on rate-limited links between network namespaces.

    sudo python benchmarks/time_to_accuracy.py --task charlm --rate 100mbit      # docs/tta_charlm_100mbit.*
    sudo python benchmarks/time_to_accuracy.py --task mnist --rate 1gbit
    sudo python benchmarks/time_to_accuracy.py --task charlm --rate 100mbit --configs ddp topk --ddp-steps 100

How it works. Every configuration runs as its own job of ``--nranks`` ranks under ``launch/emulate_cluster.py``
(one network namespace per rank, tc-tbf links of ``--rate`` each way; the interface counters give the bytes on
the wire). Plain DDP runs first for ``--ddp-steps`` steps; its final metric sets the target (validation loss
+ ``--tolerance`` for char-LM, test accuracy - ``--tolerance`` points for MNIST). Every other configuration then
trains with the same model, data order, seed and optimizer for at most ``--max-factor`` times as many steps and
stops at the first evaluation that reaches the target. Time is the training wall-clock of rank 0 with the
evaluations left out (``train_seconds`` in the examples' history). Two speed-ups are reported: against the time
plain DDP needed for its whole run (the time to its final metric), and against the time DDP needed to reach
the same target (the stricter one: DDP also gets the tolerance).

Outputs: ``<out>.json`` (every history and counter), ``<out>.md`` (the table) and ``<out>.png`` (metric
against training wall-clock). Needs root (network namespaces) and ``matplotlib`` for the plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TASKS = {
    "charlm": {
        "script": "examples/char_gpt.py", "metric": "val_loss", "label": "validation loss (nats/char)",
        "lower_is_better": True, "tolerance": 0.05, "target_flag": "--target-val-loss",
        # 8 sequences of 64 characters per rank: a small step, so that communication is a large share of it even
        # with 4 ranks sharing 2 CPU cores
        "args": ["--batch-size", "8", "--eval-every", "25", "--eval-batches", "8", "--quiet"], "ddp_steps": 400,
    },
    "mnist": {
        "script": "examples/mnist.py", "metric": "test_accuracy", "label": "test accuracy (%)",
        "lower_is_better": False, "tolerance": 0.5, "target_flag": "--target-accuracy",
        "args": ["--schedule", "constant", "--eval-every", "25", "--quiet", "--epochs", "100"], "ddp_steps": 300,
    },
}

# Each sparsedist compressor at its usual setting, with the auto collective. The same list for both tasks.
CONFIGS: dict[str, list[str]] = {
    "ddp": ["--compressor", "ddp"],
    "fp16": ["--compressor", "fp16"],
    "topk": ["--compressor", "topk", "--density", "0.01", "--collective", "auto"],
    "topk-bucket": ["--compressor", "topk", "--density", "0.01", "--granularity", "bucket", "--collective", "auto"],
    "dgc": ["--compressor", "dgc", "--density", "0.001", "--collective", "auto"],
    "threshold": ["--compressor", "threshold", "--threshold", "0.001", "--collective", "auto"],
    "variance": ["--compressor", "variance", "--collective", "auto"],
    "randk": ["--compressor", "randk", "--density", "0.01", "--collective", "auto"],
}


def run_config(task: dict, name: str, steps: int, target: float | None, args) -> dict:
    """One job on the emulated cluster; returns rank 0's summary with the link counters added."""
    with tempfile.TemporaryDirectory() as tmp:
        summary, links = Path(tmp) / "summary.json", Path(tmp) / "links.json"
        cmd = [sys.executable, str(ROOT / "launch" / "emulate_cluster.py"), "-n", str(args.nranks), "--rate",
               args.rate, "--timeout", str(args.timeout), "--quiet", "--json", str(links), "--",
               sys.executable, str(ROOT / task["script"]), *CONFIGS[name], *task["args"], "--steps", str(steps),
               "--seed", str(args.seed), "--json", str(summary), *args.extra]
        if target is not None:
            cmd += [task["target_flag"], f"{target:.4f}"]
        print(f"[{name}] {' '.join(cmd[cmd.index('--') + 1:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 120, cwd=ROOT)
        if proc.returncode != 0 or not summary.exists():
            raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out = json.loads(summary.read_text())
        emu = json.loads(links.read_text())
    history = [{"step": h["step"], "metric": h[task["metric"]], "seconds": h["train_seconds"]} for h in out["history"]]
    # char_gpt.py keeps the hook's full figures under ["sparsity"]["gradients"], mnist.py at the top level
    hook = out.get("sparsity", {}).get("gradients", out)
    return {"config": name, "args": CONFIGS[name], "steps": out["steps"], "history": history,
            "final": history[-1]["metric"], "train_seconds": history[-1]["seconds"],
            "wire_bytes_per_rank": emu["total_tx_bytes"] / args.nranks, "links": emu["links"],
            "job_wall_seconds": emu["wall_s"],
            "hook_bytes_sent": hook.get("bytes_sent"), "density": hook.get("density"),
            "collectives": hook.get("collectives"), "step_check": hook.get("step_check")}


def first_reaching(history: list[dict], target: float, lower: bool) -> dict | None:
    for h in history:
        if (h["metric"] <= target) if lower else (h["metric"] >= target):
            return h
    return None


def table(results: list[dict], task: dict, target: float, ddp_total: float, ddp_to_target: float, args) -> str:
    unit = "loss" if task["lower_is_better"] else "acc. %"
    lines = [f"{args.nranks} ranks, {args.rate} links, target {task['metric']} "
             f"{'<=' if task['lower_is_better'] else '>='} {target:.3f} (plain DDP's final "
             f"{'+' if task['lower_is_better'] else '-'} {task['tolerance']}); seed {args.seed}",
             "",
             f"| config | steps run | final {unit} | reached target at | training s to target | speed-up vs DDP's "
             f"whole run ({ddp_total:.0f} s) | vs DDP to the target ({ddp_to_target:.0f} s) | s/step | "
             f"wire MB/rank/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        hit = r["reached"]
        if hit:
            cells = [f"step {hit['step']}", f"{hit['seconds']:.1f}", f"{ddp_total / hit['seconds']:.2f}x",
                     f"{ddp_to_target / hit['seconds']:.2f}x"]
        else:
            cells = ["not reached", "-", "-", "-"]
        lines.append("| " + " | ".join([r["config"], str(r["steps"]), f"{r['final']:.3f}", *cells,
                                         f"{r['train_seconds'] / r['steps']:.3f}",
                                         f"{r['wire_bytes_per_rank'] / r['steps'] / 1e6:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], task: dict, target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        xs = [h["seconds"] for h in r["history"]]
        ys = [h["metric"] for h in r["history"]]
        ax.plot(xs, ys, marker=".", label=r["config"], lw=1.5 if r["config"] in ("ddp", "fp16") else 1.2,
                ls="--" if r["config"] in ("ddp", "fp16") else "-")
    ax.axhline(target, color="grey", lw=0.8, ls=":", label="target")
    ax.set_xlabel("training wall-clock (s), evaluations excluded")
    ax.set_ylabel(task["label"])
    ax.set_title(title, fontsize=10)
    if not task["lower_is_better"]:
        lo = min(h["metric"] for r in results for h in r["history"][1:] or r["history"])
        ax.set_ylim(max(lo - 1, 80), 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), required=True)
    p.add_argument("--rate", default="100mbit", help="link rate each way (tc units)")
    p.add_argument("--nranks", type=int, default=4)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--ddp-steps", type=int, help="steps of the plain DDP run that sets the target")
    p.add_argument("--max-factor", type=float, default=2.0, help="other configs stop after this many times the steps")
    p.add_argument("--tolerance", type=float, help="target = DDP's final metric -/+ this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=1500, help="seconds per job")
    p.add_argument("--out", type=Path, help="output prefix (default docs/tta_<task>_<rate>)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more arguments for the example script")
    args = p.parse_args()
    task = dict(TASKS[args.task])
    if args.tolerance is not None:
        task["tolerance"] = args.tolerance
    ddp_steps = args.ddp_steps or task["ddp_steps"]
    out = args.out or ROOT / "docs" / f"tta_{args.task}_{args.rate}"
    configs = ["ddp"] + [c for c in args.configs if c != "ddp"]

    lower = task["lower_is_better"]
    results = [run_config(task, "ddp", ddp_steps, None, args)]
    ddp = results[0]
    target = ddp["final"] + task["tolerance"] if lower else ddp["final"] - task["tolerance"]
    ddp["reached"] = first_reaching(ddp["history"], target, lower)
    print(f"[ddp] final {ddp['final']:.4f} in {ddp['train_seconds']:.1f} s; target {target:.4f}", flush=True)
    for name in configs[1:]:
        r = run_config(task, name, int(ddp_steps * args.max_factor), target, args)
        r["reached"] = first_reaching(r["history"], target, lower)
        results.append(r)
        hit = r["reached"]
        print(f"[{name}] final {r['final']:.4f}; " + (f"target at step {hit['step']}, {hit['seconds']:.1f} s"
                                                         if hit else "target not reached"), flush=True)

    md = table(results, task, target, ddp["train_seconds"], ddp["reached"]["seconds"], args)
    print(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "task": args.task, "rate": args.rate, "nranks": args.nranks, "seed": args.seed, "target": target,
        "tolerance": task["tolerance"], "ddp_steps": ddp_steps, "max_factor": args.max_factor,
        "extra": args.extra, "results": results}, indent=1))
    out.with_suffix(".md").write_text(md)
    try:
        plot(results, task, target, out.with_suffix(".png"),
             f"{args.task}: {args.nranks} ranks, {args.rate} links (emulated), seed {args.seed}")
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")


if __name__ == "__main__":
    main()
