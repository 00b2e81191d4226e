"""Inference latency and size of pruned models on this CPU: dense vs structured vs CSR vs 2:4, in one run.

    nice -n 10 python benchmarks/pruning_inference.py                    # docs/pruning_inference.{md,json,png}
    python benchmarks/pruning_inference.py --reps 3 --calls 5 --out /tmp/inf   # smoke run

For the MNIST models of examples/mnist_prune.py (LeNet-300-100 MLP; the CNN conv16-BN-conv32-BN-fc128), each
with freshly initialised weights (latency does not depend on the values; the masks are those of magnitude
pruning of these weights). Every variant is the exported inference form (``sparsedist.sparsity.export_dense``
or ``to_sparse_csr``): eval mode, BatchNorm folded into the convolution before it. The variants:

* ``dense``: the model itself;
* ``structured``: :func:`sparsedist.sparsity.structured_prune`, per-layer L1 ranking, the removal fraction
  that keeps at most half of the forward FLOPs (``fraction_for_flops(..., 0.5)``): a smaller dense model;
* ``structured /8``: the same with every layer keeping a multiple of 8 (``round_to=8``), which the FLOPs
  search then takes below half;
* ``csr@S``: unstructured global magnitude pruning to sparsity S, exported with ``to_sparse_csr`` (every
  pruned Linear / Conv2d runs as a CSR matrix product; convolutions through im2col); S = the structured
  model's weight sparsity ("same sparsity"), 0.9 and 0.95;
* ``2:4``: 2:4 (N:M) pruning of every layer whose rows allow it; PyTorch's 2:4 kernels are CUDA-only, so on
  this CPU it can only run dense (``2:4 dense``) or as CSR (``2:4 csr``).

Latency: one thread (``torch.set_num_threads(1)``), batch 1 and batch 256, eval mode, no autograd. The
variants are timed in interleaved rounds: every round times ``--calls`` forward calls of each variant in a
fresh random order; the figure is the median over ``--reps`` rounds of the per-call time, and the speed-up is
dense's median over the variant's. Size: bytes of the parameters and buffers as stored (CSR: values, int32
column indices and row pointers) and of the TorchScript file.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))
import sparsedist.sparsity as sp  # noqa: E402
from mnist_prune import build_model  # noqa: E402

# Written before the first run (the expected outcome; docs/pruning_inference.md reports what happened):
EXPECTED = (
    "structured pruning that halves the CNN's FLOPs runs at least 1.6x faster than dense at batch 256 (ordinary "
    "dense kernels on smaller layers); unstructured CSR at the same sparsity is not faster than dense (sparse "
    "kernels need ~90% sparsity or more to pay on a CPU, and the convolutions go through im2col); at 90-95% "
    "CSR may win on the MLP's large fc layer at batch 1 but not on the CNN; 2:4 brings no speed-up on this CPU "
    "(no CPU kernels); CSR at 90% stores the weights in about a fifth of dense's bytes.")


def variants(kind: str, seed: int = 0) -> dict[str, nn.Module]:
    """name -> eval-mode module for one model kind (see the module documentation)."""
    torch.manual_seed(seed)
    dense = build_model(kind).eval()
    example = torch.zeros(1, 1, 28, 28)
    out = {"dense": sp.export_dense(dense)}
    fraction = sp.fraction_for_flops(dense, example, 0.5)
    structured, _ = sp.structured_prune(dense, fraction)
    out["structured"] = sp.export_dense(structured)
    fraction = sp.fraction_for_flops(dense, example, 0.5, round_to=8)
    out["structured /8"] = sp.export_dense(sp.structured_prune(dense, fraction, round_to=8)[0])
    same = 1.0 - sum(m.weight.numel() for m in structured.modules() if isinstance(m, (nn.Linear, nn.Conv2d))) / \
        sum(m.weight.numel() for m in dense.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    for s in (same, 0.9, 0.95):
        pruned = copy.deepcopy(dense)
        sp.prune_model(pruned, 1.0 - s, budget="global")
        out[f"csr@{s:.2f}"] = sp.to_sparse_csr(pruned)
    nm = copy.deepcopy(dense)
    with torch.no_grad():
        for m in nm.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight[0].numel() % 4 == 0:
                m.weight.mul_(sp.nm_mask(m.weight))
    out["2:4 dense"] = sp.export_dense(nm)
    out["2:4 csr"] = sp.to_sparse_csr(nm, min_sparsity=0.4)
    return out


def weight_sparsity(model: nn.Module, reference: nn.Module) -> float:
    """Fraction of the reference's Linear/Conv weights that this model does not store or holds as zero."""
    def nonzero(m):
        w = m.weight
        return int(w._nnz()) if w.layout == torch.sparse_csr else int((w != 0).sum())
    ref = sum(m.weight.numel() for m in reference.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    mods = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, sp.CSRLinear, sp.CSRConv2d))]
    return 1.0 - sum(nonzero(m) for m in mods) / ref


def script_bytes(model: nn.Module) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(model), buf)
    return buf.getbuffer().nbytes


@torch.no_grad()
def latency(models: dict[str, nn.Module], batch: int, reps: int, calls: int, seed: int = 0) -> dict[str, dict]:
    """Median seconds per forward call of each model, timed in interleaved, shuffled rounds."""
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    times: dict[str, list[float]] = {n: [] for n in models}
    for m in models.values():  # warm-up
        m(x)
    order = list(models)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            for _ in range(calls):
                models[name](x)
            times[name].append((time.perf_counter() - start) / calls)
    base = statistics.median(times["dense"])
    return {n: {"median_s": statistics.median(t), "speedup": base / statistics.median(t),
                "min_s": min(t), "max_s": max(t)} for n, t in times.items()}


def measure(kinds=("mlp", "cnn"), batches=(1, 256), reps: int = 15, calls: int = 20, log=print) -> dict:
    """Every variant of every model: sparsity, FLOPs, sizes, latency per batch size."""
    torch.set_num_threads(1)
    report = {"threads": 1, "reps": reps, "calls": calls, "models": {}}
    for kind in kinds:
        models = variants(kind)
        example = torch.zeros(1, 1, 28, 28)
        rows = {}
        for name, m in models.items():
            flops = sp.count_flops(m, example) if not any(
                isinstance(x, (sp.CSRLinear, sp.CSRConv2d)) for x in m.modules()) else None
            rows[name] = {"weight_sparsity": weight_sparsity(m, models["dense"]), "flops": flops,
                          "storage_bytes": sp.storage_bytes(m), "torchscript_bytes": script_bytes(m)}
        for b in batches:
            for name, t in latency(models, b, reps, calls if b > 1 else calls * 10).items():
                rows[name][f"batch{b}"] = t
        report["models"][kind] = rows
        for name, r in rows.items():
            log(f"{kind:4s} {name:12s} sparsity {r['weight_sparsity']:.3f}  "
                f"{r['storage_bytes'] / 1e3:8.1f} kB  "
                + "  ".join(f"b{b}: {1e3 * r[f'batch{b}']['median_s']:7.3f} ms ({r[f'batch{b}']['speedup']:.2f}x)"
                            for b in batches))
    return report


def write(report: dict, out: Path, command: str, batches=(1, 256)) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning_inference.json").write_text(json.dumps(report, indent=1))
    lines = ["# Pruned models at inference on this CPU", "", f"Command: `{command}`", "",
             f"Expected before the run: {EXPECTED}", "",
             f"One thread; medians of {report['reps']} interleaved rounds of {report['calls']} calls "
             f"(x10 at batch 1); speed-up = dense's median / the variant's.", ""]
    for kind, rows in report["models"].items():
        lines += [f"## {kind.upper()}", "",
                  "| variant | weight sparsity | FLOPs/example | weights stored (kB) | TorchScript file (kB) | "
                  + " | ".join(f"batch {b}: ms (speed-up)" for b in batches) + " |",
                  "|---|---|---|---|---|" + "---|" * len(batches)]
        for name, r in rows.items():
            flops = f"{r['flops']:,}" if r["flops"] is not None else "-"
            lines.append(f"| {name} | {100 * r['weight_sparsity']:.1f} % | {flops} | {r['storage_bytes'] / 1e3:.1f} | "
                         f"{r['torchscript_bytes'] / 1e3:.1f} | "
                         + " | ".join(f"{1e3 * r[f'batch{b}']['median_s']:.3f} ({r[f'batch{b}']['speedup']:.2f}x)"
                                      for b in batches) + " |")
        lines.append("")
    (out / "pruning_inference.md").write_text("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(report["models"]), figsize=(6 * len(report["models"]), 4))
    for ax, (kind, rows) in zip(axes if len(report["models"]) > 1 else [axes], report["models"].items()):
        names = list(rows)
        for i, b in enumerate(batches):
            ax.bar([j + 0.4 * i for j in range(len(names))], [rows[n][f"batch{b}"]["speedup"] for n in names],
                   width=0.4, label=f"batch {b}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.2 for j in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylabel("speed-up over dense (median)")
        ax.set_title(f"MNIST {kind.upper()}, 1 CPU thread")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pruning_inference.png", dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=20, help="forward calls per round and variant (x10 at batch 1)")
    p.add_argument("--out", default=str(ROOT / "docs"))
    args = p.parse_args(argv)
    print(f"expected: {EXPECTED}")
    report = measure(reps=args.reps, calls=args.calls)
    write(report, Path(args.out), "python benchmarks/pruning_inference.py" + (
        f" --reps {args.reps} --calls {args.calls}" if (args.reps, args.calls) != (15, 20) else ""))
    return report


if __name__ == "__main__":
    main()
