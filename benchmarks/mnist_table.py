"""Run examples/mnist.py under torchrun for several hook configurations and print a Markdown table.

    python benchmarks/mnist_table.py --seeds 0 1 2         # the README's headline table (2 ranks, 5 epochs)
    python benchmarks/mnist_table.py --configs ddp topk    # a subset
    python benchmarks/mnist_table.py --seeds 0 1 2         # mean over seeds

Every configuration uses the same model, data order, seeds and number of steps. The figures are measured in
this run; nothing is cached. Ratios are ``bytes_dense / bytes_sent`` from ``state.stats()`` (cumulative, and per
step after DGC's warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS: dict[str, list[str]] = {
    "ddp": ["--compressor", "ddp"],
    "topk": ["--compressor", "topk", "--density", "0.01"],
    "topk-noef": ["--compressor", "topk", "--density", "0.01", "--no-error-feedback"],
    "dgc": ["--compressor", "dgc", "--density", "0.001", "--warmup-epochs", "1"],
    "threshold": ["--compressor", "threshold", "--threshold", "0.005"],
    "randk": ["--compressor", "randk", "--density", "0.01"],
    "randk-wangni": ["--compressor", "randk", "--density", "0.01", "--wangni"],
    "variance": ["--compressor", "variance", "--alpha", "1.0", "--zeta", "0.999"],
}
HEADLINE = ["ddp", "topk", "topk-noef", "dgc"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: str, seed: int, nproc: int, extra: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(ROOT / "examples" / "mnist.py"), *CONFIGS[config],
               "--seed", str(seed), "--quiet", "--json", str(out), *extra]
        env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{config} (seed {seed}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=HEADLINE, choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5, help="training epochs, the same for every configuration")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", type=Path, help="also write all runs here")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: passed to examples/mnist.py")
    args = p.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    runs: dict[str, list[dict]] = {}
    for config in args.configs:
        for seed in args.seeds:
            r = run(config, seed, args.nproc, ["--epochs", str(args.epochs), *extra], args.timeout)
            runs.setdefault(config, []).append(r)
            print(f"# {config} seed {seed}: {json.dumps(r)}", flush=True)

    base = statistics.mean(r["test_accuracy"] for r in runs.get("ddp", [])) if "ddp" in runs else None
    print()
    print("| configuration | test accuracy (%) | vs plain DDP (points) | bytes_dense / bytes_sent | "
          "per-step ratio after warm-up | density | wall-clock (s) |")
    print("|---|---|---|---|---|---|---|")
    for config, rs in runs.items():
        acc = statistics.mean(r["test_accuracy"] for r in rs)
        delta = f"{acc - base:+.2f}" if base is not None and config != "ddp" else "—"
        ratio = statistics.mean(r["compression_ratio"] for r in rs) if "compression_ratio" in rs[0] else None
        after = statistics.mean(r["ratio_after_warmup"] for r in rs) if "ratio_after_warmup" in rs[0] else None
        dens = statistics.mean(r["density"] for r in rs) if "density" in rs[0] else None
        secs = statistics.mean(r["seconds"] for r in rs)
        print(f"| {config} `{' '.join(CONFIGS[config])}` | {acc:.2f} | {delta} | "
              f"{'—' if ratio is None else f'{ratio:.1f}'} | {'—' if after is None else f'{after:.1f}'} | "
              f"{'—' if dens is None else f'{dens:.4f}'} | {secs:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
