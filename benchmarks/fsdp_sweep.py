"""Per-rank memory and bytes against model size and ranks under FSDP2: measured small, modelled to 10B x 1024.

    python benchmarks/fsdp_sweep.py --json docs/fsdp_sweep.json --plot docs/fsdp_sweep.png

Measured: the char-GPT of examples/char_gpt.py (4 blocks, widths ``--widths``) under ``fully_shard`` at ``--ranks``
ranks (gloo, one process per rank), a few AdamW steps on random tokens, three ways:

* ``dense``: FSDP2 as it is (torch AdamW, FSDP's reduce-scatter);
* ``topk``: the sparse reduce-scatter at 1 % (dense weights, fp32 error-feedback residuals);
* ``sparse``: RigL 90 % on the block Linear weights + PackedAdamW + the sparse reduce-scatter at 1 %.

Per rank: :func:`sparsedist.fsdp.training_memory` by kind between backward and step, the allocator's peak over
the last step (PyTorch profiler, CPU allocator events), and the reduce-scatter bytes of one ordinary step.

Modelled (:func:`model`, compared with the measurements in the table): ``n`` parameters, ``P`` ranks, fp32, weight
density ``w`` (RigL, on all weights in the model), gradient density ``g`` (of the active weights), 8 bytes per
sent entry (int32 index + fp32 value), ``(P-1)/P`` of a rank's entries leaving it (owners uniformly spread), per
module 16 bytes of header per peer (ignored below 1 MB), FSDP's transient unsharded layer ignored:

* dense: weights ``4n/P``, gradients ``4n/P``, Adam ``8n/P``; reduce-scatter ``4n (P-1)/P`` bytes/step;
* topk: dense + residuals ``4n`` (``2n`` in bf16) -- full size on every rank: error feedback does not shard;
  reduce-scatter ``8 g n (P-1)/P``;
* sparse: weights ``4n/P``, packed gradients ``4wn/P``, packed Adam ``12wn/P`` (moments + int32 positions), bool
  masks ``n/P``, residuals ``4wn`` + cached active positions ``4wn`` (full size); reduce-scatter ``8 g w n (P-1)/P``.

FSDP's parameter all-gathers (``2 * 4n (P-1)/P`` per step with ``reshard_after_forward``) are dense in all three.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from char_gpt import CharGPT  # noqa: E402

from sparsedist.fsdp import ShardedRigL, register_fsdp, training_memory  # noqa: E402
from sparsedist.optim import PackedAdamW  # noqa: E402
from sparsedist.testing import run_distributed  # noqa: E402

MODES = ("dense", "topk", "sparse")
STEPS = 4
W_DENSITY, G_DENSITY = 0.1, 0.01


def model(n: float, p: int, mode: str, w: float = W_DENSITY, g: float = G_DENSITY, bf16: bool = False) -> dict:
    """Modelled per-rank bytes of one configuration (see the module documentation)."""
    out = {"weights": 4 * n / p}
    if mode == "sparse":
        out.update(gradients=4 * w * n / p, optimizer=12 * w * n / p, masks=n / p, residuals=8 * w * n)
        out["rs_bytes"] = 8 * g * w * n * (p - 1) / p
    else:
        out.update(gradients=4 * n / p, optimizer=8 * n / p, masks=0.0)
        out["residuals"] = (2 if bf16 else 4) * n if mode == "topk" else 0.0
        out["rs_bytes"] = (8 * g if mode == "topk" else 4) * n * (p - 1) / p
    out["total"] = sum(out[k] for k in ("weights", "gradients", "optimizer", "masks", "residuals"))
    out["ag_bytes"] = 8 * n * (p - 1) / p
    return out


def blocks(name: str, p: torch.Tensor) -> bool:
    return name.startswith("blocks.") and name.endswith(".weight") and p.dim() == 2


def measure(rank: int, world: int, width: int, layers: int) -> list[dict]:
    rows = []
    for mode in MODES:
        torch.manual_seed(0)
        m = CharGPT(65, width, layers, heads=4, block=32)
        n = sum(p.numel() for p in m.parameters())
        w_fraction = sum(p.numel() for name, p in m.named_parameters() if blocks(name, p)) / n
        for blk in m.blocks:
            fully_shard(blk)
        fully_shard(m)
        opt = (PackedAdamW(m.parameters(), lr=1e-3, weight_decay=0.0) if mode == "sparse"
               else torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0, foreach=False))
        rigl = state = None
        if mode == "sparse":
            rigl = ShardedRigL(m, opt, density=W_DENSITY, distribution="uniform", include=blocks, update_every=1000,
                               total_steps=2000)
            opt.attach_masks(rigl)
        if mode != "dense":
            state = register_fsdp(m, "topk", density=G_DENSITY, masks=rigl)
        gen = torch.Generator().manual_seed(rank)
        kinds, peak, before = {}, 0, 0
        for step in range(STEPS):
            last = step == STEPS - 1
            prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if last else None
            if prof is not None:
                prof.__enter__()
            x = torch.randint(0, 65, (4, 33), generator=gen)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
            if last:
                kinds = training_memory(m, opt, state, rigl)
            if step == STEPS - 2 and state is not None:
                before = state.stats()["bytes_sent"]
            opt.step()
            if rigl is not None:
                rigl.step()
            if prof is not None:
                prof.__exit__(None, None, None)
                live = 0
                for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                                        if e.name() == "[memory]"):
                    live += nbytes
                    peak = max(peak, live)
        rs = state.stats()["bytes_sent"] - before if state is not None else model(n, world, "dense")["rs_bytes"]
        rows.append({"mode": mode, "width": width, "layers": layers, "ranks": world, "parameters": n,
                     "sparsified_fraction": w_fraction, "memory": kinds, "peak_step_increase": peak,
                     "rs_bytes_per_step": rs})
    return rows


def table(rows: list[dict]) -> str:
    mb = 1e6
    out = ["| parameters | ranks | mode | weights MB | grads MB | optimizer MB | residuals MB | masks MB | total MB "
           "(model) | allocator: step peak above start MB | RS KB/step (model) |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["memory"]
        # the model with RigL on the measured fraction of weights (embeddings, head, norms, biases stay dense)
        w = W_DENSITY * r["sparsified_fraction"] + (1 - r["sparsified_fraction"])
        mod = model(r["parameters"], r["ranks"], r["mode"], w=w)
        out.append(f"| {r['parameters']:,} | {r['ranks']} | {r['mode']} | {m['weights'] / mb:.2f} | "
                   f"{m['gradients'] / mb:.2f} | {m['optimizer'] / mb:.2f} | {m['residuals'] / mb:.2f} | "
                   f"{m['masks'] / mb:.2f} | {m['total'] / mb:.2f} ({mod['total'] / mb:.2f}) | "
                   f"{r['peak_step_increase'] / mb:.2f} | {r['rs_bytes_per_step'] / 1e3:.1f} "
                   f"({mod['rs_bytes'] / 1e3:.1f}) |")
    return "\n".join(out)


def modelled(sizes=(1e8, 1e9, 1e10), ranks=(8, 64, 1024)) -> list[dict]:
    return [{"parameters": n, "ranks": p, "mode": mode, **model(n, p, mode)}
            for n in sizes for p in ranks for mode in MODES]


def model_table(rows: list[dict]) -> str:
    gb = 1e9
    out = ["| parameters | ranks | mode | weights GB | grads GB | optimizer GB | masks GB | residuals GB | total GB "
           "| RS GB/step | all-gather GB/step |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['parameters']:.0e} | {r['ranks']} | {r['mode']} | {r['weights'] / gb:.3f} | "
                   f"{r['gradients'] / gb:.3f} | {r['optimizer'] / gb:.3f} | {r['masks'] / gb:.3f} | "
                   f"{r['residuals'] / gb:.2f} | {r['total'] / gb:.2f} | {r['rs_bytes'] / gb:.3f} | "
                   f"{r['ag_bytes'] / gb:.2f} |")
    return "\n".join(out)


def plot(path: Path, measured: list[dict]) -> None:
    import matplotlib  # optional dependency, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [10 ** (e / 4) for e in range(20, 41)]  # 1e5 .. 1e10
    styles = {"dense": "C0", "topk": "C1", "sparse": "C2"}
    for mode, color in styles.items():
        for p, ls in ((2, ":"), (1024, "-")):
            axes[0].loglog(sizes, [model(n, p, mode)["total"] for n in sizes], ls, color=color,
                           label=f"{mode}, P={p} (model)")
        pts = [r for r in measured if r["mode"] == mode and r["ranks"] == 2]
        axes[0].loglog([r["parameters"] for r in pts], [r["memory"]["total"] for r in pts], "o", color=color,
                       label=f"{mode}, P=2 (measured)")
        for p, ls in ((2, ":"), (1024, "-")):
            axes[1].loglog(sizes, [model(n, p, mode)["rs_bytes"] for n in sizes], ls, color=color,
                           label=f"{mode} reduce-scatter, P={p} (model)")
        axes[1].loglog([r["parameters"] for r in pts], [r["rs_bytes_per_step"] for r in pts], "o", color=color,
                       label=f"{mode}, P=2 (measured)")
    axes[1].loglog(sizes, [model(n, 1024, "dense")["ag_bytes"] for n in sizes], "--", color="grey",
                   label="FSDP all-gathers (all modes)")
    axes[0].set(xlabel="parameters", ylabel="bytes per rank", title="memory per rank (weights+grads+opt+EF+masks)")
    axes[1].set(xlabel="parameters", ylabel="bytes per rank per step", title="bytes sent per rank per step")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 384])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--replot", action="store_true", help="only redraw --plot from the measurements in --json")
    args = p.parse_args(argv)
    if args.replot:
        plot(args.plot, json.loads(args.json.read_text())["measured"])
        return {}
    measured = []
    for world in args.ranks:
        for width in args.widths:
            measured += run_distributed(measure, world, args=(width, args.layers), timeout=900)[0]
            print(table(measured[-len(MODES):]).splitlines()[-1], flush=True)
    print(table(measured))
    model_rows = modelled()
    print(model_table(model_rows))
    if args.json:
        args.json.write_text(json.dumps({"measured": measured, "modelled": model_rows,
                                         "assumptions": {"weight_density": W_DENSITY, "grad_density": G_DENSITY}},
                                        indent=2))
    if args.plot:
        plot(args.plot, measured)
    return {"measured": measured, "modelled": model_rows}


if __name__ == "__main__":
    main()
