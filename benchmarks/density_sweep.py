"""Accuracy against bytes on MNIST, per compressor (issue 7, item 4).

    nice -n 19 python benchmarks/density_sweep.py                # the default sweep, one seed
    python benchmarks/density_sweep.py --compressors topk dgc --densities 0.001 0.01 --seeds 0 1
    python benchmarks/density_sweep.py --compressors topk --densities 0.01 --steps 30 --out /tmp/sweep   # smoke
    python benchmarks/density_sweep.py --compressors topk randk -- --momentum 0     # plain SGD for every run

Sweeps examples/mnist.py (MLP 784-512-256-10, 2 ranks over gloo, batch 64 per rank, SGD lr 0.05 cosine, momentum
0.9, error feedback on) over each compressor's knob: the density of top-k, rand-k (uniform, shared seed) and DGC
(warm-up over the first epoch), the threshold tau of Strom's threshold, alpha of variance-based selection. x is
the bytes rank 0 sent over the whole run (``bytes_sent`` of ``state.stats()``), y the final test accuracy. DDP and
PyTorch's fp16_compress_hook are the references; they have no byte counter, so their bytes are those a dense ring
allreduce of the same gradients moves (the sweep's ``bytes_dense``; half of it for fp16). Writes
OUT/density_sweep.json, OUT/density_sweep.md and a log-x plot OUT/density_sweep_mnist.png (default OUT:
runs/density_sweep). The write-up: docs/density_sweep.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_claims import ROOT, Runner, length_args, measure

KNOBS = {"topk": "--density", "randk": "--density", "dgc": "--density", "threshold": "--threshold",
         "variance": "--alpha"}
LABELS = {"topk": "top-k", "randk": "rand-k", "dgc": "DGC", "threshold": "threshold (Strom)",
          "variance": "variance (Tsuzuku)", "ddp": "DDP (fp32 allreduce)", "fp16": "fp16_compress_hook"}
REFERENCES = ("ddp", "fp16")
DIVERGED = 50.0  # % test accuracy: points below are drawn on the plot's bottom edge (the y axis zooms on the rest)


def knob_values(s: argparse.Namespace, compressor: str) -> list[float]:
    return {"threshold": s.thresholds, "variance": s.alphas}.get(compressor, s.densities)


def point_args(s: argparse.Namespace, compressor: str, value: float | None = None) -> list[str]:
    args = ["--compressor", compressor]
    if value is not None:
        args += [KNOBS[compressor], f"{value:g}"]
    if compressor == "dgc":
        args += ["--warmup-epochs", str(s.dgc_warmup_epochs)]
    return [*args, "--model", "mlp", *length_args(s), *s.extra]


def sweep(run: Runner, s: argparse.Namespace) -> list[dict]:
    """Every (compressor, knob value) point, then the references with their bytes filled in."""
    points = []
    for c in s.compressors:
        for v in knob_values(s, c):
            row = measure(run, LABELS[c], "mnist.py", point_args(s, c, v), s.seeds)
            points.append({**row, "compressor": c, "knob": KNOBS[c].lstrip("-"), "value": v})
    dense = next((p["runs"][0]["bytes_dense"] for p in points), None)
    if dense is None:
        raise SystemExit("no sparse compressor in the sweep: the references' bytes come from its bytes_dense")
    for c in s.references:
        row = measure(run, LABELS[c], "mnist.py", point_args(s, c), s.seeds)
        points.append({**row, "compressor": c, "knob": None, "value": None, "bytes_sent": dense / (2 if c == "fp16" else 1),
                       "compression_ratio": 2.0 if c == "fp16" else 1.0})
    return points


def markdown(points: list[dict], cmd: str, run: Runner, minutes: float) -> list[str]:
    header = ("| compressor | setting | bytes sent per rank | bytes_dense / bytes_sent | density sent | "
              "test accuracy (%) per seed | mean ± sd |")
    lines = [(f"`{cmd}`: {len(run.commands)} runs, {minutes:.1f} min wall-clock, {run.cpu_seconds / 60:.1f} CPU-min "
             "(all processes)."), "", header, "|---|---|---|---|---|---|---|"]
    for p in points:
        setting = f"{p['knob']} {p['value']:g}" if p["knob"] else "—"
        dens = f"{p['density']:.5f}" if "density" in p else "—"
        accs = " / ".join(f"{a:.2f}" for a in p["accuracy"])
        lines.append(f"| {p['label']} | {setting} | {p['bytes_sent'] / 1e6:.2f} MB | {p['compression_ratio']:.1f} | "
                     f"{dens} | {accs} | {p['mean']:.2f} ± {p['sd']:.2f} |")
    return lines


def plot(points: list[dict], path: Path, title: str) -> None:
    """Accuracy against log bytes; points below DIVERGED are drawn as triangles on the bottom edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [p["mean"] for p in points if p["mean"] >= DIVERGED]
    floor = min(good, default=DIVERGED) - 1.0
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for c in dict.fromkeys(p["compressor"] for p in points if p["knob"]):
        ps = sorted((p for p in points if p["compressor"] == c), key=lambda p: p["bytes_sent"])
        x, y = [p["bytes_sent"] for p in ps], [max(p["mean"], floor + 0.15) for p in ps]
        line = ax.errorbar(x, y, yerr=[p["sd"] if p["mean"] >= DIVERGED else 0 for p in ps], marker="o", capsize=2,
                           label=LABELS[c])
        for p, xi, yi in zip(ps, x, y):
            low = p["mean"] < DIVERGED
            if low:
                ax.plot([xi], [yi], "v", color=line[0].get_color(), markersize=9)
            ax.annotate(f"{p['value']:g}" + (f" ({p['mean']:.0f}%)" if low else ""), (xi, yi),
                        textcoords="offset points", xytext=(3, 4 if low else -9), fontsize=6)
    for p, style in zip((p for p in points if not p["knob"]), ("k*--", "gs:")):
        ax.axhline(p["mean"], color=style[0], linestyle=style[2:], linewidth=0.8)
        ax.plot([p["bytes_sent"]], [p["mean"]], style[:2], markersize=9, label=p["label"])
    ax.set_xscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("bytes sent per rank over the run (log scale)")
    ax.set_ylabel("final test accuracy (%)")
    if len(good) < len(points):
        ax.text(0.01, 0.02, f"\u25bc: below {DIVERGED:g}% (diverged), drawn on the bottom edge", fontsize=7,
                transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressors", nargs="+", default=list(KNOBS), choices=list(KNOBS), help="compressors to sweep")
    p.add_argument("--densities", nargs="+", type=float, default=[0.001, 0.003, 0.01, 0.03, 0.1],
                   help="densities of topk, randk and dgc")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.03, 0.01, 0.005, 0.002, 0.0007],
                   help="thresholds tau of threshold")
    p.add_argument("--alphas", nargs="+", type=float, default=[16.0, 8.0, 4.0, 2.0, 1.0],
                   help="alphas of variance (r^2 > alpha * v; larger sends less)")
    p.add_argument("--references", nargs="*", default=list(REFERENCES), choices=list(REFERENCES),
                   help="dense reference runs (none: --references with no value)")
    p.add_argument("--dgc-warmup-epochs", type=int, default=1, help="DGC's density warm-up, in epochs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds; every point runs each")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every run")
    p.add_argument("--steps", type=int, default=0, help="if > 0: steps of every run (overrides --epochs)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "density_sweep",
                   help="directory for density_sweep.json, density_sweep.md and density_sweep_mnist.png")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after --: passed to every examples/mnist.py run (e.g. -- --momentum 0)")
    s = p.parse_args(argv)
    s.extra = s.extra[1:] if s.extra[:1] == ["--"] else s.extra
    return s


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    s = parse_args(argv)
    run = Runner(s.nproc, s.timeout)
    start = time.perf_counter()
    points = sweep(run, s)
    minutes = (time.perf_counter() - start) / 60
    cmd = " ".join(["python benchmarks/density_sweep.py", *argv])
    md = markdown(points, cmd, run, minutes)
    s.out.mkdir(parents=True, exist_ok=True)
    length = f"{s.steps} steps" if s.steps else f"{s.epochs} epochs"
    plot(points, s.out / "density_sweep_mnist.png",
         f"MNIST MLP, {s.nproc} ranks, {length}, seeds {' '.join(map(str, s.seeds))} {' '.join(s.extra)}: "
         "accuracy against bytes")
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()}, "command": cmd,
              "points": points, "commands": run.commands, "seconds": round(minutes * 60, 1),
              "cpu_seconds": round(run.cpu_seconds, 1)}
    (s.out / "density_sweep.json").write_text(json.dumps(report, indent=2))
    (s.out / "density_sweep.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md))
    print(f"# wrote {s.out}/density_sweep.json, density_sweep.md, density_sweep_mnist.png")
    return report


if __name__ == "__main__":
    main()
