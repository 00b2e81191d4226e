"""Distributed selection of the exact top-k of a vector whose entries are spread over the ranks (each rank owns a
range of positions and holds the exact sums there), as :class:`~sparsedist.collectives.gtopk.GlobalTopK`'s
estimation calls need it: a bracket of magnitudes is narrowed by allreducing counts, never by moving candidates.
"""

from __future__ import annotations

import math

import torch

from .backend import Backend
from .base import HEADER_BYTES
from .streams import Block, Codec, allgatherv_bytes

__all__ = ["exact_top_k", "gather_counts", "allgatherv_entries", "magnitude", "SPLIT_POINTS", "ESTIMATE_HEAD_BYTES",
           "COUNT_BYTES"]

#: points per round of the distributed selection, and the most rounds it takes
SPLIT_POINTS = 15
_MAX_ROUNDS = 64
ESTIMATE_HEAD_BYTES = 32  # per rank: the head below, 4 float64 (count, largest magnitude, load, k)
COUNT_BYTES = 8  # per rank: int32 count, k


def _split_points(lo: float, hi: float) -> list[float]:
    """Up to ``SPLIT_POINTS`` float64 points strictly inside ``(lo, hi)``, ascending: geometric when ``lo > 0``,
    else ``hi * 16**-j`` (the bracket's floor is 0 until a count says otherwise). Empty only when no float64 lies
    strictly between ``lo`` and ``hi``: every magnitude in ``[lo, hi)`` is then exactly ``lo``."""
    if lo > 0:
        pts = [lo * (hi / lo) ** (i / (SPLIT_POINTS + 1)) for i in range(1, SPLIT_POINTS + 1)]
    else:
        pts = [hi * 16.0 ** -(SPLIT_POINTS + 1 - i) for i in range(1, SPLIT_POINTS + 1)]
    pts = sorted({p for p in pts if lo < p < hi})
    if not pts and math.nextafter(lo, math.inf) < hi:  # a bracket a few ulps wide: split off lo itself
        pts = [math.nextafter(lo, math.inf)]
    return pts


def magnitude(val: torch.Tensor) -> torch.Tensor:
    """``|val|`` in a dtype that sorts exactly (fp32 for half types, the values' own dtype otherwise)."""
    return val.abs().float() if val.dtype in (torch.float16, torch.bfloat16) else val.abs()


def exact_top_k(backend: Backend, codec: Codec, own_idx: torch.Tensor, own_val: torch.Tensor, k: int,
                load: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]] | None:
    """The exact global top-k of the owners' range sums (ties to the lower index), by distributed selection.

    Every owner holds the exact sums of its range (``own_idx`` ascending, ``own_val``); the k-th largest
    magnitude ``t`` of their union is found without moving candidates: a bracket ``[lo, hi)`` with
    ``count(|v| >= lo) >= k > count(|v| >= hi)`` is narrowed by allreducing the counts above
    ``SPLIT_POINTS`` points inside it (geometric spacing; 16 int64 per round), until at most
    ``max(64, k // 16)`` entries lie inside. Those are allgathered (index and value) and every rank picks the
    same ``k - count(>= hi)`` largest of them; if the bracket cannot be split further (a tie of magnitudes),
    ranks take their tied entries in rank order, which is index order. The kept entries then travel in one
    ring allgatherv, as on a reuse call. Returns None on every rank, after the first collective, if some owner's
    sums are not finite (its largest magnitude, in the head every rank receives, is NaN or inf). Volume: about ``k (P-1)/P`` entries plus ``O(rounds)`` counts, where
    gathering every owner's top ``min(k, m_j)`` candidates would move up to ``(P-1) k`` entries per rank.
    """
    mags = magnitude(own_val).to(torch.float64)
    m = int(mags.numel())
    head = torch.tensor([m, float(mags.max()) if m else 0.0, load, k], dtype=torch.float64, device=mags.device)
    rows = backend.allgather(head).view(-1, 4).tolist()
    if not all(math.isfinite(r[1]) for r in rows):
        return None
    if len({int(r[3]) for r in rows}) != 1:
        raise ValueError(f"GlobalTopK: ranks passed different k ({sorted({int(r[3]) for r in rows})}); "
                         "k must be the same everywhere")
    loads = [int(r[2]) for r in rows]
    total = sum(int(r[0]) for r in rows)
    if total <= k:  # everything survives
        keep = torch.ones(m, dtype=torch.bool, device=mags.device)
    else:
        ordered = mags.sort().values
        lo, hi = 0.0, math.nextafter(max(r[1] for r in rows), math.inf)
        c_lo, c_hi = total, 0
        cap = max(64, k // 16)
        splittable = True
        for _ in range(_MAX_ROUNDS):
            if c_lo - c_hi <= cap:
                break
            points = _split_points(lo, hi)
            if not points:
                splittable = False
                break
            grid = torch.tensor(points, dtype=torch.float64, device=mags.device)
            mine = (m - torch.searchsorted(ordered, grid)).to(torch.int64)
            counts = backend.allreduce(mine).tolist()
            j = sum(1 for c in counts if c >= k)  # counts fall with the point
            if j:
                lo, c_lo = points[j - 1], int(counts[j - 1])
            if j < len(points):
                hi, c_hi = points[j], int(counts[j])
        above = mags >= hi
        inside = (mags >= lo) & ~above
        need = k - c_hi  # entries to take from inside the bracket, 1 <= need <= c_lo - c_hi
        where = inside.nonzero().view(-1)
        if splittable:
            counts = [c[0] for c in gather_counts(backend, [int(where.numel())], k, codec)]
            cidx, cval = allgatherv_entries(backend, codec, own_idx[where], own_val[where], counts)
            pick = torch.sort(magnitude(cval), descending=True, stable=True).indices[:need]
            chosen = torch.zeros(codec.numel, dtype=torch.bool, device=mags.device)
            chosen[cidx[pick]] = True
            take = chosen[own_idx[where]]
        else:  # every entry inside has magnitude lo: the lower indices first, i.e. the lower ranks first
            counts = [c[0] for c in gather_counts(backend, [int(where.numel())], k, codec)]
            before = sum(counts[:backend.rank])
            n_take = min(int(where.numel()), max(0, need - before))
            take = torch.arange(where.numel(), device=mags.device) < n_take
        keep = above
        keep[where[take]] = True
    counts = [c[0] for c in gather_counts(backend, [int(keep.sum())], k, codec)]
    return (*allgatherv_entries(backend, codec, own_idx[keep], own_val[keep], counts), counts, loads)


def gather_counts(backend: Backend, counts: list[int], k: int, codec: Codec) -> list[list[int]]:
    """Allgather ``counts + [k]`` (int32) from every rank; checks that all ranks passed the same k."""
    head = torch.tensor(list(counts) + [k], dtype=torch.int32, device=codec.device)
    rows = backend.allgather(head).tolist()
    ks = {r[-1] for r in rows}
    if len(ks) != 1:
        raise ValueError(f"GlobalTopK: ranks passed different k ({sorted(ks)}); k must be the same everywhere")
    return [r[:-1] for r in rows]

def allgatherv_entries(backend: Backend, codec: Codec, idx: torch.Tensor, val: torch.Tensor,
                counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring allgatherv of sparse entries whose per-rank counts are already known to all (no padding)."""
    buf = codec.encode(Block(0, codec.numel, idx, val))
    nbytes = [0 if c == 0 else HEADER_BYTES + c * (codec.bi + codec.bv) for c in counts]
    blocks = [codec.decode(p, 0, codec.numel) for p in allgatherv_bytes(backend, buf, nbytes)]
    blocks = [b for b in blocks if b.idx.numel()]
    if not blocks:
        return idx[:0], val[:0]
    # ranges ascend with the rank, so concatenating in rank order keeps the indices sorted
    return torch.cat([b.idx for b in blocks]), torch.cat([b.val for b in blocks])

