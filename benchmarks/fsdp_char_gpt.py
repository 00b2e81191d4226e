"""char-GPT under FSDP2 at 2 ranks: dense against the sparse reduce-scatter, bf16 residuals, and fully sparse.

    python benchmarks/fsdp_char_gpt.py --json docs/fsdp_char_gpt.json       # every configuration, seed 0
    python benchmarks/fsdp_char_gpt.py --configs dense topk --seeds 0 1     # a subset, two seeds

Each configuration is one ``torchrun --nproc_per_node=2 examples/char_gpt_fsdp.py`` run with the same steps,
data order and initial weights; the table has the validation loss after the last step, the bytes rank 0's
reduce-scatters sent against FSDP2's dense reduce-scatter, and rank 0's memory between backward and step by kind
(:func:`sparsedist.fsdp.training_memory`).

Configurations (AdamW throughout, lr 3e-3 with warm-up and cosine decay):

* ``dense``: FSDP2's own reduce-scatter;
* ``topk``: the sparse reduce-scatter, top-k of 1 % per parameter with error feedback (fp32 residuals);
* ``topk_bf16``: the same with bfloat16 residuals;
* ``dgc``: DGC (Lin et al. 2018) at 1 %: momentum correction inside the exchange, with ``--optimizer sgd`` only;
* ``rigl_dense``: RigL 90 % + packed AdamW, FSDP2's dense reduce-scatter (the dense gradient every step);
* ``sparse``: RigL 90 % + packed AdamW + the sparse reduce-scatter (``--sparse``);
* ``topk_adamx``: the sparse reduce-scatter at 1 % with the exchange-aware :class:`sparsedist.optim.AdamW`
  (each rank sends its own Adam update with error feedback; its defaults: one dense warm-up step, sparse-phase
  beta1 0.5, noise correction), the same learning-rate schedule as ``dense``.

``topk_adamx`` is the example's ``--optimizer adamx`` (run when ``--optimizer`` here is ``adamw``); its rows are
compared with ``dense`` AdamW of the same seed.
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
CONFIGS = {
    "dense": [],
    "topk": ["--exchange", "topk"],
    "topk_bf16": ["--exchange", "topk", "--residual-dtype", "bfloat16"],
    "dgc": ["--exchange", "dgc"],
    "rigl_dense": ["--sparse", "--exchange", "dense"],
    "sparse": ["--sparse"],
    "topk_adamx": ["--exchange", "topk"],
}
ADAMX = {"topk_adamx"}  # configurations with the exchange-aware AdamW (--optimizer adamx in place of adamw)


def run(config: str, seed: int, steps: int, extra: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "examples" / "char_gpt_fsdp.py"), "--steps", str(steps), "--seed", str(seed), "--quiet",
               "--json", str(out), *CONFIGS[config], *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        subprocess.run(cmd, check=True, timeout=timeout, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        summary = json.loads(out.read_text())
    optimizer = summary["config"]["optimizer"]  # adamx is AdamW's rule: compared with dense AdamW
    summary.update(config=config, seed=seed, optimizer="adamw" if optimizer == "adamx" else optimizer,
                   lr=summary["config"]["lr"])
    return summary


def table(rows: list[dict]) -> str:
    mb = 1e6
    dense = {(r["seed"], r["optimizer"]): r for r in rows if r["config"] == "dense"}  # vs dense: same seed
    out = ["| optimizer | config | seed | steps | val loss | vs dense | RS MB sent (busiest rank) | FSDP2 dense RS MB | "
           "RS ratio | density sent | weights MB | grads MB | optimizer MB | residuals MB | masks MB | total MB | s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m, d = r["memory_bytes"], dense.get((r["seed"], r["optimizer"]))
        diff = f"{r['val_loss'] - d['val_loss']:+.3f}" if d else "-"
        density = r.get("exchange", {}).get("density")
        out.append(f"| {r['optimizer']} | {r['config']} | {r['seed']} | {r['steps']} | {r['val_loss']:.3f} | {diff} | "
                   f"{r['reduce_scatter_bytes_sent'] / mb:.2f} | {r['dense_reduce_scatter_bytes'] / mb:.2f} | "
                   f"{r['reduce_scatter_ratio']:.1f}x | {'-' if density is None else f'{density:.4f}'} | "
                   f"{m['weights'] / mb:.2f} | {m['gradients'] / mb:.2f} | {m['optimizer'] / mb:.2f} | "
                   f"{m['residuals'] / mb:.2f} | {m['masks'] / mb:.2f} | {m['total'] / mb:.2f} | {r['seconds']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--extra", default="--eval-every 100 --eval-batches 16",
                   help="more arguments for examples/char_gpt_fsdp.py, one string")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", type=Path)
    p.add_argument("--append", action="store_true", help="add the runs to those already in --json")
    args = p.parse_args(argv)
    rows = json.loads(args.json.read_text())["runs"] if args.append and args.json and args.json.exists() else []
    for seed in args.seeds:
        for config in args.configs:
            if config in ADAMX and args.optimizer != "adamw":
                raise SystemExit(f"{config} runs the exchange-aware AdamW: use it with --optimizer adamw")
            optimizer = "adamx" if config in ADAMX else args.optimizer
            rows.append(run(config, seed, args.steps, [*args.extra.split(), "--optimizer", optimizer], args.timeout))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if args.json:
                args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                                 "runs": rows}, indent=2))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
