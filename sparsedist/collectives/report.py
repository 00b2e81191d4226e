"""Model predictions over grids of densities and world sizes, and their plain-text tables (benchmarks, docs)."""

from __future__ import annotations

from .choose import CostModel, expected_union
from .registry import ALGORITHMS, EXACT_ALGORITHMS

__all__ = ["extrapolate", "format_table"]


def extrapolate(numel: int, densities, world_sizes, model: CostModel, *, value_bytes: int = 4,
                overlap: str = "random", algorithms=ALGORITHMS) -> list[dict]:
    """Model predictions over a grid of densities and world sizes (e.g. up to P = 1024).

    Args:
        numel: bucket length.
        densities: fractions ``k / numel`` per rank.
        world_sizes: values of ``P``.
        model: the link parameters.
        value_bytes: bytes per value.
        overlap: ``"random"`` (independent supports, the module's default) or ``"identical"`` (every rank picks
            the same coordinates: no fill-in, the best case for the SparCML algorithms).
        algorithms: which algorithms to include.

    Returns:
        One dict per (density, P): ``density``, ``P``, ``k``, ``union`` and per algorithm its ``time`` and ``bytes``,
        plus ``best`` (the fastest exact algorithm).
    """
    if overlap not in ("random", "identical"):
        raise ValueError(f"overlap must be 'random' or 'identical', got {overlap!r}")
    rows = []
    for d in densities:
        k = max(1, int(round(d * numel)))
        for P in world_sizes:
            union = k if overlap == "identical" else expected_union(numel, k, P)
            preds = model.predict(numel, k, P, value_bytes=value_bytes, algorithms=algorithms,
                                  union_nnz=union if overlap == "identical" else None)
            exact = [a for a in algorithms if a in EXACT_ALGORITHMS]
            best = min(exact, key=lambda a: (preds[a].time, a != "dense")) if exact else None
            rows.append({"density": d, "P": P, "k": k, "union": union, "best": best,
                         **{a: {"time": preds[a].time, "bytes": preds[a].bytes} for a in algorithms}})
    return rows


def format_table(rows: list[dict], algorithms=ALGORITHMS, what: str = "time") -> str:
    """Plain-text table of :func:`extrapolate`'s rows: ``what`` = ``"time"`` (ms) or ``"bytes"`` (MB)."""
    scale, unit = (1e3, "ms") if what == "time" else (1e-6, "MB")
    names = {"dense": "dense", "allgather": "allgather", "ssar_recursive_double": "ssar_rd",
             "ssar_split_allgather": "ssar_split", "dsar_split_allgather": "dsar_split", "gtopk": "gtopk"}
    head = f"{'density':>8} {'P':>5} {'k':>9} {'union':>10} " + " ".join(
        f"{names.get(a, a) + '[' + unit + ']':>15}" for a in algorithms) + "  best"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r[a][what] * scale:>15.3f}" for a in algorithms)
        lines.append(f"{r['density']:>8.4f} {r['P']:>5d} {r['k']:>9d} {r['union']:>10.0f} {cells}  {r['best']}")
    return "\n".join(lines)
