"""Command line: ``python -m sparsedist estimate``.

::

    python -m sparsedist estimate --params 124M --ranks 16 --link 25gbit            # the model, configured
    torchrun --nnodes 2 --nproc_per_node 1 ... -m sparsedist estimate --params 124M --ranks 16 --probe
    torchrun ... -m sparsedist estimate --params 4M --link 100mbit --measure         # model against this cluster
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import dist as sd_dist
from .collectives import TorchBackend
from .estimate import (DEFAULT_DENSITIES, WIRE_EFFICIENCY, as_dicts, estimate, format_curves, format_rows, link_model,
                       measure, parse_count, parse_rate, parse_seconds, probe_model, verdict)


def _densities(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"densities are comma-separated fractions like 0.001,0.01, got {text!r}")
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"densities must be fractions in (0, 1], got {text!r}")
    return values


def _typed(fn):
    def parse(text: str):
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc))
    parse.__name__ = fn.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparsedist", description="sparsedist command-line tools")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("estimate", help="will sparse gradient exchange pay? predicted communication per step",
                       description="Predicted communication time per training step of dense allreduce, fp16 and "
                                   "each sparsedist compressor and collective, from the alpha-beta cost model "
                                   "(optionally probed live, or checked against measured exchanges).")
    e.add_argument("--params", required=True, type=_typed(parse_count), help="model parameters: 124M, 1.5B, ...")
    e.add_argument("--ranks", type=int, help="data-parallel ranks (default with --probe/--measure: this job's)")
    e.add_argument("--link", type=_typed(parse_rate), help="link rate each way: 100mbit, 1gbit, 25gbit, ...")
    e.add_argument("--latency", type=_typed(parse_seconds), default=20e-6,
                   help="seconds per message: 20us (default), 0.1ms, ...")
    e.add_argument("--efficiency", type=float, default=WIRE_EFFICIENCY,
                   help=f"payload share of the link rate (default {WIRE_EFFICIENCY:.3f}: TCP/IP/Ethernet headers)")
    e.add_argument("--densities", type=_densities, default=list(DEFAULT_DENSITIES),
                   help="comma-separated fractions sent per rank (default 0.001,0.01,0.1)")
    e.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket size in MB (default 25)")
    e.add_argument("--memory-gbps", type=float, default=4.0,
                   help="GB/s of one pass over the gradient, for the selection cost (default 4: one CPU core; "
                        "a GPU: ~1000)")
    e.add_argument("--compute-ms", type=float, help="forward+backward+optimizer ms per step, for a per-step verdict")
    e.add_argument("--probe", action="store_true",
                   help="measure alpha/beta and local-work costs on this job's process group (run under a launcher)")
    e.add_argument("--measure", action="store_true",
                   help="also time every exchange on this job's process group (run under a launcher)")
    e.add_argument("--repeats", type=int, default=3,
                   help="timed repeats per exchange with --measure (at least; more until 1 s per exchange; the mean)")
    e.add_argument("--json", type=Path, help="also write the rows, the model and the verdict here (rank 0)")
    return p


def estimate_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    distributed = args.probe or args.measure
    if not distributed and (args.ranks is None or args.link is None):
        parser.error("estimate needs --ranks and --link (or --probe under a launcher to measure the link)")
    if not args.probe and args.link is None:
        parser.error("--measure compares against the configured model: give --link (or add --probe)")
    if args.ranks is not None and args.ranks < 1:
        parser.error(f"--ranks must be >= 1, got {args.ranks}")
    rank, world = 0, 1
    backend = None
    if distributed:
        rank, world, _ = sd_dist.init(backend="gloo")
        backend = TorchBackend()
        if world < 2:
            parser.error("--probe and --measure need at least 2 ranks: launch with torchrun (e.g. --nnodes 2 "
                         "--nproc_per_node 1 across two machines) or launch/emulate_cluster.py")
        if args.measure and args.ranks not in (None, world):
            parser.error(f"--measure times exchanges among this job's {world} ranks; drop --ranks {args.ranks}")
    ranks = args.ranks or world
    try:
        model = probe_model(backend, args.params, bucket_mb=args.bucket_mb, densities=args.densities,
                            ranks=ranks) if args.probe else \
            link_model(args.link, args.latency, args.efficiency)
        rows = estimate(args.params, ranks, model, args.densities, bucket_mb=args.bucket_mb,
                        memory_gbps=args.memory_gbps)
        if args.measure:
            measure(rows, args.params, backend, repeats=args.repeats, bucket_mb=args.bucket_mb)
        text = verdict(rows, None if args.compute_ms is None else args.compute_ms / 1e3)
    finally:
        if distributed:
            sd_dist.shutdown()
    if rank == 0:
        link = (f"probed: alpha {model.alpha * 1e6:.1f} us, beta {8 / model.beta / 1e9:.3g} Gbit/s payload"
                if args.probe else f"{args.link / 1e9:g} Gbit/s each way, {args.latency * 1e6:g} us per message")
        if args.probe and model.call_beta:
            link += " (per primitive: " + ", ".join(f"{kind} {8e-9 / b if b else float('inf'):.3g}"
                                                    for kind, b in model.call_beta.items()) + " Gbit/s)"
        print(f"{args.params / 1e6:g}M fp32 parameters, {ranks} ranks, {link}; selection at {args.memory_gbps:g} GB/s "
              f"per pass over the gradient (--memory-gbps: 4 is one CPU core, ~1000 a GPU)")
        if args.probe and model.call_curve:
            print(format_curves(model))
        print(format_rows(rows))
        print(text)
        if args.json:
            args.json.write_text(json.dumps({"params": args.params, "ranks": ranks, "link_bps": args.link,
                                             "model": model.state_dict(), "rows": as_dicts(rows), "verdict": text},
                                            indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "estimate":
        return estimate_main(args, parser)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2


if __name__ == "__main__":
    sys.exit(main())
