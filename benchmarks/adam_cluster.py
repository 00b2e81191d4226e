"""Time to DDP's final validation loss on an emulated cluster: plain DDP, PyTorch's ``fp16_compress_hook`` and
``sparsedist.optim.AdamW`` through sparsedist's DDP hook (top-k 1 %, fp16 values), all in one command::

    sudo python benchmarks/adam_cluster.py --rate 20mbit          # docs/adam_exchange_cluster.{json,md,png}

Every job is ``benchmarks/adam_exchange.py run --mode dist`` (the char-GPT, AdamW, the figures' hyper-parameters
and seed) on 2 ranks under ``launch/emulate_cluster.py`` (one network namespace per rank, tc-tbf links of
``--rate`` each way). In order:

1. DDP on loopback for ``--probe-steps`` steps (``torchrun --standalone``): its seconds per step are the compute
   (and loopback communication) a step needs;
2. DDP on the emulated links for ``--steps`` steps: its final loss is the target, its seconds per step against
   (1) give the share of the step spent communicating, ``1 - t_loopback / t_link``;
3. fp16_compress_hook for ``--steps`` steps and the sparse AdamW for ``--sparse-factor`` x ``--steps`` steps (its
   cosine schedule that long), both stopping at the first evaluation at or below DDP's final loss.

Time is rank 0's training wall-clock with the evaluations left out (``train_seconds`` of the records). The
speed-ups are DDP's whole run (the time to its final loss) over each method's time to the same loss, and also
to DDP's final loss + ``--tolerance`` (DDP's own time to that looser target is reported with it). Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

from emulate_cluster import emulate_cluster  # noqa: E402  (launch/emulate_cluster.py)

BENCH = str(ROOT / "benchmarks" / "adam_exchange.py")


def _config(method: str, steps: int, args, target: float | None = None) -> dict:
    cfg = {"model": "chargpt", "method": method, "density": 0.01, "steps": steps, "seed": args.seed, "workers": 2,
           "value_dtype": "float16", "warmup": 1, "eval_every": args.eval_every, "eval_batches": 16,
           "mode": "dist"}
    return cfg if target is None else {**cfg, "target": target}


def _job(cfg: dict, args, rate: str | None) -> dict:
    """One 2-rank run; ``rate=None``: loopback (torchrun). Returns rank 0's record (+ the links' counters)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        cmd = [BENCH, "run", "--config", json.dumps(cfg), "--out", str(out)]
        env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        print(f"[{cfg['method']} @ {rate or 'loopback'}] {cfg['steps']} steps", flush=True)
        links = None
        if rate is None:
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            *cmd], check=True, timeout=args.timeout, cwd=ROOT, env={**os.environ, **env},
                           capture_output=True)
        else:
            res = emulate_cluster([sys.executable, *cmd], 2, rate, timeout=args.timeout, env=env, cwd=str(ROOT))
            links = {"tx_bytes_per_rank": sum(li.tx_bytes for li in res.links) / 2, "wall_s": res.wall_s}
        rec = json.loads(out.read_text().strip().splitlines()[-1])
    return {**rec, "links": links}


def first_at(rec: dict, target: float) -> tuple[int, float] | None:
    """(step, training seconds) of the first evaluation at or below ``target``."""
    for (step, loss, _), secs in zip(rec["history"], rec["train_seconds"]):
        if loss <= target + 1e-12:
            return step, secs
    return None


def report(res: dict) -> str:
    ddp, probe, target, tol = res["ddp"], res["probe"], res["target"], res["tolerance"]
    per_link = ddp["train_seconds"][-1] / ddp["history"][-1][0]
    per_loop = probe["train_seconds"][-1] / probe["history"][-1][0]
    ddp_total = ddp["train_seconds"][-1]
    loose = first_at(ddp, target + tol)
    lines = [f"2 ranks on 2 shared CPU cores, {res['rate']} links each way (emulated), char-GPT, seed {res['seed']}. "
             f"DDP: {per_link:.3f} s/step on the links, {per_loop:.3f} s/step on loopback: "
             f"**{100 * (1 - per_loop / per_link):.0f} %** of its step is communication. Target: DDP's final "
             f"validation loss **{target:.4f}** (after {ddp_total:.0f} s); looser target {target + tol:.4f} "
             f"(DDP reached it at step {loose[0]}, {loose[1]:.0f} s).", "",
             "| method | steps run (schedule) | final loss | DDP's final loss reached at | s to it | speed-up vs DDP | "
             f"+{tol} reached at | s | speed-up vs DDP's {loose[1]:.0f} s | s/step | MB/rank/step on the wire |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("ddp", "fp16", "sparse-adamw-hook"):
        r = res[name]
        cells = []
        for goal, base in ((target, ddp_total), (target + tol, loose[1])):
            hit = first_at(r, goal)
            cells += [f"step {hit[0]}", f"{hit[1]:.0f}", f"**{base / hit[1]:.2f}x**"] if hit else ["not reached",
                                                                                                     "-", "-"]
        steps = r["history"][-1][0]
        lines.append(f"| {name} | {steps} ({r['steps']}) | {r['final']:.4f} | " + " | ".join(cells) +
                     f" | {r['train_seconds'][-1] / steps:.3f} | {r['links']['tx_bytes_per_rank'] / steps / 1e6:.3f} |")
    ratios = []
    for goal in (target, target + tol):
        hits = [first_at(res[name], goal) for name in ("fp16", "sparse-adamw-hook")]
        ratios.append(f"{hits[0][1] / hits[1][1]:.2f}x" if all(hits) else "-")
    lines += ["", f"sparse-adamw-hook against fp16_compress_hook: **{ratios[0]}** sooner to DDP's final loss, "
              f"{ratios[1]} to it + {tol}."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, style in (("ddp", "k--"), ("fp16", "C7--"), ("sparse-adamw-hook", "C0-")):
        r = res[name]
        ax.plot(r["train_seconds"], [h[1] for h in r["history"]], style, marker=".", label=name)
    ax.axhline(res["target"], color="grey", lw=0.8, ls=":", label="DDP's final loss")
    ax.set_xlabel("training wall-clock of rank 0 (s), evaluations excluded")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_ylim(top=3.0)
    ax.set_title(f"char-GPT, AdamW, 2 ranks, {res['rate']} links (emulated)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="20mbit", help="link rate each way (tc units)")
    p.add_argument("--steps", type=int, default=300, help="DDP's (and fp16's) steps")
    p.add_argument("--sparse-factor", type=float, default=1.5, help="the sparse AdamW's schedule, x --steps")
    p.add_argument("--probe-steps", type=int, default=30, help="DDP's steps on loopback")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per job")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "adam_exchange_cluster")
    args = p.parse_args()
    res = {"rate": args.rate, "seed": args.seed, "tolerance": args.tolerance}
    probe = _config("ddp", args.probe_steps, args)
    res["probe"] = _job({**probe, "eval_every": args.probe_steps}, args, None)
    res["ddp"] = _job(_config("ddp", args.steps, args), args, args.rate)
    res["target"] = res["ddp"]["final"]
    res["fp16"] = _job(_config("fp16", args.steps, args, res["target"]), args, args.rate)
    sparse_steps = round(args.steps * args.sparse_factor)
    res["sparse-adamw-hook"] = _job(_config("sparse-adamw-hook", sparse_steps, args, res["target"]), args, args.rate)
    write(res, args.out)


def write(res: dict, out: Path) -> None:
    """``out``.json, .md and .png from a result (``python -c`` can redo the table and plot from the JSON)."""
    md = report(res)
    print(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(md)
    plot(res, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
