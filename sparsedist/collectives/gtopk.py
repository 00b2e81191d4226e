"""Global top-k sparse allreduce after Ok-Topk (Li & Hoefler, "Near-Optimal Sparse Allreduce for Distributed
Deep Learning", PPoPP 2022).

Every rank contributes its locally selected entries (its local top-k, chosen by a compressor); the result
keeps only the ``k`` largest-magnitude entries of their *sum*. Each call returns, for the calling rank, which
of its own entries did not survive, so the caller puts them back into its residual and nothing is lost.

The algorithm, per call (what Ok-Topk's Algorithm 1 does, on :class:`~sparsedist.collectives.backend.Backend`
primitives):

1. **Balanced ranges** (every ``repartition_interval`` calls, and on the first): each rank takes the ``P - 1``
   split points that cut its own sorted indices into ``P`` equal-count pieces; the split points are averaged
   over ranks (one allreduce of ``P`` float64). Range ``j`` belongs to rank ``j``. Between repartitions the
   ranges are reused. (Ok-Topk computes the split points from the local top-k indices in the same way.)
2. **Split and reduce**: each rank sends its entries in range ``j`` to rank ``j`` (sizes first, then one
   ``alltoall_v``); the owner sums them: it now holds the exact sum restricted to its range.
3. **Global threshold, estimated and reused**: on an estimation call (the first, then every
   ``threshold_interval`` calls) the exact k-th largest magnitude of the sum is found by distributed
   selection over the owners' ranges, without moving candidates: a bracket is narrowed by allreducing the
   counts above 15 points inside it (a few rounds of 16 integers), the at most ``max(64, k/16)`` entries left
   inside the final bracket are allgathered, and every rank picks the same exact global top-k (ties to the
   lower index); the k-th largest magnitude becomes the global threshold. On the other calls each owner keeps
   the entries of its range with ``|sum| >= threshold``: no selection by sorting, and at most ``k`` entries in
   total (see (b) below).
4. **Allgatherv** of the kept entries (sizes first, then a ring allgatherv, no padding).

Deviations from Ok-Topk, stated:

(a) Its data-balancing step before the allgatherv (Sec. 3.1.2) is not done, and the allgatherv is a ring
    (``P - 1`` steps) instead of recursive doubling: a ring moves at most the total per rank whatever the
    imbalance, so the byte volume needs no balancing (its time does, on a real network: the largest block
    paces every step).
(b) The reused threshold is refined on every call by a count histogram: each owner counts its entries above
    ``threshold * 2**(j/5)``, ``j = -5..10`` (16 int32 counts, allgathered), and all ranks take the lowest of
    these thresholds whose total does not exceed ``k``. The threshold thus follows the drift of the sums
    (error feedback makes them grow between estimations) and a reuse call never keeps more than ``k`` entries;
    if no grid threshold keeps between ``k / count_tolerance`` and ``k`` entries, the threshold is
    re-estimated in the same call. (Ok-Topk keeps its global threshold until the next periodic estimation,
    and its kept count drifts.)
(c) Besides every ``repartition_interval`` calls, the ranges are recomputed on the call after one whose split
    phase was unbalanced (an owner received more than ``rebalance_factor`` times the mean number of entries;
    each owner's load rides along in the count allgather): with error feedback the positions of the local
    top-k drift, and ranges kept for 64 calls overload one owner.
(d) The split points of step 1 are averaged over the ranks that have at least ``P`` entries (Ok-Topk assumes
    all do).
(e) Ok-Topk's *local* threshold reuse (selecting the local top-k by a reused threshold) is selection: it
    belongs to the compressor, not here.
(f) The estimation selects the exact global top-k by counting (step 3) instead of gathering candidates: an
    estimation call then moves about what a reuse call moves, where gathering every owner's top ``min(k, m_j)``
    would move up to ``(P - 1) k`` entries per rank (measured before this change: 12.2k words at P = 8).

Volume per rank on a threshold-reuse or estimation call, with balanced ranges: ``(P-1)/P * k`` entries sent in
step 2 and about ``(P-1)/P * k`` received in step 4 (plus the estimation's counts), i.e. about ``4k (P-1)/P``
32-bit words with int32 indices and fp32 values, against Ok-Topk's bound of ``6k (P-1)/P`` words (its Eq. 3,
which counts an entry as two words).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..payload import accumulator_dtype, all_finite
from .backend import Backend, TorchBackend, ring_allreduce_bytes
from .allgather import check_out, scatter_add, zeroed
from .base import Collective, CostSheet, CostTerms, Reduced, check_sparse_input
from .kselect import COUNT_BYTES, ESTIMATE_HEAD_BYTES, SPLIT_POINTS, allgatherv_entries, exact_top_k, \
    gather_counts, magnitude
from .sparcml import split_phase_cost
from .streams import Codec, balanced_bounds, coalesce, default_dense_threshold, split_reduce

__all__ = ["GlobalTopK", "GlobalTopKResult", "GlobalTopKSum"]

# threshold multipliers 2**(j/5) tried on a reuse call: 0.5x .. 4x in steps of 15 %
_GRID = tuple(range(-5, 11))
#: bytes per rank of the count allgather on a reuse call (int32: the grid's counts, the split load, the
#: "sums not finite" flag, k)
COUNT_HEADER_BYTES = 4 * (len(_GRID) + 3)



@dataclass
class GlobalTopKResult:
    """What :class:`GlobalTopK` returns on every rank.

    Attributes:
        indices: ``(m,)`` int64, sorted: the kept positions (identical on every rank). ``m == k`` on estimation
            calls (fewer if the sum has fewer than ``k`` non-empty positions); ``k / count_tolerance <= m <= k``
            on threshold-reuse calls.
        values: ``(m,)`` in the input values' dtype: the *sum over ranks* at those positions.
        numel: length of the dense vector.
        kept: ``(nnz,)`` bool, one per entry of this rank's input (input order): True if its position is in the
            result (its value is in the sum), False if it must go back into the residual.
        exact: True if the threshold was (re-)estimated in this call (the result is then the exact top-k).
        threshold: the global magnitude threshold in force after this call (None if not yet known); on a reuse
            call, the one that selected ``indices``.
        bytes_sent, bytes_received: what this rank moved in this call (from the backend's counters).
        finite: False if some rank's input or the sum is not finite (NaN/inf): then nothing is kept (empty
            ``indices``/``values``, ``kept`` all False), every rank says so, and the state is as before the call.
    """

    indices: torch.Tensor
    values: torch.Tensor
    numel: int
    kept: torch.Tensor
    exact: bool
    threshold: float | None
    bytes_sent: int = 0
    bytes_received: int = 0
    finite: bool = True

    @property
    def dropped(self) -> torch.Tensor:
        """``(nnz,)`` bool: this rank's input entries that did not survive (``~kept``)."""
        return ~self.kept

    def to_dense(self) -> torch.Tensor:
        """``(numel,)`` tensor with the kept sums."""
        out = torch.zeros(self.numel, dtype=self.values.dtype, device=self.values.device)
        out[self.indices] = self.values
        return out


class GlobalTopK:
    """Ok-Topk's global top-k sparse allreduce for one vector (one bucket or tensor); holds the reused state.

    Args:
        threshold_interval: re-estimate the global threshold every this many calls (Ok-Topk: 32). 1 makes every
            call exact.
        repartition_interval: recompute the balanced ranges every this many calls (Ok-Topk: 64).
        rebalance_factor: also recompute them on the next call when, in this one, the most loaded owner received
            more than this many times the mean number of entries (``float("inf")``: only periodically).
        count_tolerance: re-estimate at once when no threshold of the refinement grid keeps between
            ``k / count_tolerance`` and ``k`` entries (``float("inf")``: only when every grid threshold keeps
            more than ``k``).
        dense_threshold: SparCML's delta for the blocks of the split phase (default: where sparse outgrows dense).

    Call it on every rank with the same ``numel`` and ``k``; keep one instance per vector (state is per vector).
    """

    def __init__(self, threshold_interval: int = 32, repartition_interval: int = 64, count_tolerance: float = 2.0,
                 rebalance_factor: float = 1.5, dense_threshold: float | None = None):
        for name, v in (("threshold_interval", threshold_interval), ("repartition_interval", repartition_interval)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GlobalTopK: {name} must be an int >= 1, got {v!r}")
        if not (isinstance(count_tolerance, (int, float)) and count_tolerance >= 1):
            raise ValueError(f"GlobalTopK: count_tolerance must be >= 1, got {count_tolerance!r}")
        if not (isinstance(rebalance_factor, (int, float)) and rebalance_factor >= 1):
            raise ValueError(f"GlobalTopK: rebalance_factor must be >= 1, got {rebalance_factor!r}")
        if dense_threshold is not None and not dense_threshold >= 0:
            raise ValueError(f"GlobalTopK: dense_threshold must be >= 0, got {dense_threshold!r}")
        self.threshold_interval = threshold_interval
        self.repartition_interval = repartition_interval
        self.count_tolerance = float(count_tolerance)
        self.rebalance_factor = float(rebalance_factor)
        self.dense_threshold = dense_threshold
        self.reset()

    def reset(self) -> None:
        """Forget the threshold and the ranges (the next call estimates both)."""
        self.step = 0
        self.threshold: float | None = None
        self.bounds: list[int] | None = None
        self._rebalance = False
        self._numel: int | None = None
        self._world: int | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "threshold": self.threshold, "bounds": None if self.bounds is None
                else list(self.bounds), "numel": self._numel, "world_size": self._world,
                "threshold_interval": self.threshold_interval, "repartition_interval": self.repartition_interval,
                "count_tolerance": self.count_tolerance, "rebalance_factor": self.rebalance_factor,
                "rebalance": self._rebalance, "dense_threshold": self.dense_threshold}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.threshold = None if state["threshold"] is None else float(state["threshold"])
        self.bounds = None if state["bounds"] is None else [int(b) for b in state["bounds"]]
        self._numel = state["numel"]
        self._world = state["world_size"]
        self.threshold_interval = int(state.get("threshold_interval", self.threshold_interval))
        self.repartition_interval = int(state.get("repartition_interval", self.repartition_interval))
        self.count_tolerance = float(state.get("count_tolerance", self.count_tolerance))
        self.rebalance_factor = float(state.get("rebalance_factor", self.rebalance_factor))
        self._rebalance = bool(state.get("rebalance", False))
        self.dense_threshold = state.get("dense_threshold", self.dense_threshold)

    # ---------------------------------------------------------------------------------------------------
    def __call__(self, indices: torch.Tensor, values: torch.Tensor, numel: int, k: int, backend: Backend | None = None,
                 group=None) -> GlobalTopKResult:
        """Global top-k of the sum of every rank's sparse vector.

        Args:
            indices: ``(nnz,)`` int32/int64 positions in ``[0, numel)``, any order (duplicates are summed).
            values: ``(nnz,)`` floating values.
            numel: length of the dense vector (same on every rank).
            k: how many entries of the sum to keep (same on every rank; checked).
            backend: the communicator (default ``TorchBackend(group)``).
            group: process group when ``backend`` is None.

        Returns:
            A :class:`GlobalTopKResult`.
        """
        numel = check_sparse_input(indices, values, numel, where="GlobalTopK")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"GlobalTopK: k must be an int >= 0, got {k!r}")
        if backend is None:
            backend = TorchBackend(group)
        sent0, recv0 = backend.bytes_sent, backend.bytes_received
        before = self.state_dict()  # restored if the sum turns out not to be finite
        idx, val, inverse = coalesce(indices, values)
        codec = Codec(numel, values.dtype, values.device)
        size = backend.size
        if self._numel != numel or self._world != size:
            self.reset()
            self._numel, self._world = numel, size
        exact = True
        if k == 0 or numel == 0:
            res_idx, res_val = idx[:0], val[:0]
        elif size == 1:
            res_idx, res_val = self._select_top(idx, val, k)
        else:
            if self.bounds is None or self.step % self.repartition_interval == 0 or self._rebalance:
                self._repartition(backend, idx, numel)
                self._rebalance = False
            delta = default_dense_threshold(codec.bv, codec.bi) if self.dense_threshold is None \
                else float(self.dense_threshold)
            start, _, sums, touched, load = split_reduce(backend, codec, idx, val, self.bounds, delta)
            rel = touched.nonzero().view(-1)
            own_idx, own_val = rel + start, sums[rel].to(codec.dtype)
            exact = self.threshold is None or self.step % self.threshold_interval == 0
            # a non-finite sum (some rank's input was not finite) is known to its owner only: the owner says so in
            # the next collective every rank takes part in (the counts below, or the estimation's head)
            bad = not all_finite(own_val)
            res = None
            if not exact:
                # the reused threshold, refined by a count histogram: every owner counts its entries above
                # threshold * 2**(j/5) for the grid below; all ranks take the lowest threshold whose total
                # does not exceed k (identical counts everywhere, so an identical choice)
                mags = own_val.abs().to(torch.float64).sort().values
                grid = torch.tensor([self.threshold * 2.0 ** (j / 5) for j in _GRID], dtype=torch.float64,
                                    device=mags.device)
                mine = mags.numel() - torch.searchsorted(mags, grid)
                rows = gather_counts(backend, mine.tolist() + [load, int(bad)], k, codec)
                if any(r[-1] for r in rows):
                    return self._not_finite(before, indices, values, numel, backend, sent0, recv0)
                rows = [r[:-1] for r in rows]
                self._watch_load(rows)
                totals = [c[:-1] for c in rows]
                fits = [j for j in range(len(_GRID)) if sum(c[j] for c in totals) <= k]
                total = sum(c[fits[0]] for c in totals) if fits else None
                if total is None or total * self.count_tolerance < k:
                    exact = True  # every rank saw the same counts: all take this branch together
                else:
                    self.threshold = float(grid[fits[0]])
                    keep = own_val.abs().to(torch.float64) >= self.threshold
                    res = allgatherv_entries(backend, codec, own_idx[keep], own_val[keep],
                                           [c[fits[0]] for c in totals])
            if exact:
                res = self._estimate(backend, codec, own_idx, own_val, k, load)
                if res is None:
                    return self._not_finite(before, indices, values, numel, backend, sent0, recv0)
                if sum(self._last_counts) >= k:
                    self.threshold = float(magnitude(res[1]).double().min())
                else:
                    self.threshold = None
            res_idx, res_val = res
        if idx.numel():
            hit = torch.zeros(numel, dtype=torch.bool, device=idx.device)
            hit[res_idx] = True
            kept = hit[idx]
            if inverse is not None:
                kept = kept[inverse]
        else:
            kept = torch.zeros(indices.numel(), dtype=torch.bool, device=values.device)
        self.step += 1
        return GlobalTopKResult(res_idx, res_val, numel, kept, exact, self.threshold,
                                backend.bytes_sent - sent0, backend.bytes_received - recv0)

    # ---------------------------------------------------------------------------------------------------

    def _estimate(self, backend: Backend, codec: Codec, own_idx: torch.Tensor, own_val: torch.Tensor, k: int,
                  load: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The exact global top-k (:func:`~sparsedist.collectives.kselect.exact_top_k`); notes the counts and loads.
        None if the sum is not finite."""
        found = exact_top_k(backend, codec, own_idx, own_val, k, load)
        if found is None:
            return None
        idx, val, self._last_counts, loads = found
        self._watch_load([[x] for x in loads])
        return idx, val

    def _not_finite(self, before: dict, indices: torch.Tensor, values: torch.Tensor, numel: int, backend: Backend,
                    sent0: int, recv0: int) -> GlobalTopKResult:
        """Every rank learnt that the sum is not finite: nothing is kept, the state goes back to ``before``."""
        self.load_state_dict(before)
        empty = torch.empty(0, dtype=torch.int64, device=values.device)
        return GlobalTopKResult(empty, values[:0], numel, torch.zeros(indices.numel(), dtype=torch.bool,
                                                                      device=values.device), False, self.threshold,
                                backend.bytes_sent - sent0, backend.bytes_received - recv0, finite=False)

    # ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _select_top(idx: torch.Tensor, val: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest ``|val|`` (ties to the lower index, since ``idx`` is ascending), sorted by index."""
        if idx.numel() <= k:
            return idx, val
        top = torch.sort(magnitude(val), descending=True, stable=True).indices[:k].sort().values
        return idx[top], val[top]

    def _watch_load(self, rows: list[list[int]]) -> None:
        """Schedule a repartition when the split phase's load (last column: entries each owner received) is
        unbalanced: the most loaded owner got more than ``rebalance_factor`` times the mean."""
        loads = [r[-1] for r in rows]
        total = sum(loads)
        if total and max(loads) > self.rebalance_factor * total / len(loads):
            self._rebalance = True

    def _repartition(self, backend: Backend, idx: torch.Tensor, numel: int) -> None:
        """Ok-Topk's region repartition: :func:`~sparsedist.collectives.sparcml.balanced_bounds`."""
        self.bounds = balanced_bounds(backend, idx, numel)

class GlobalTopKSum(Collective):
    """The hook's view of :class:`GlobalTopK`: only the ``k`` largest sums survive (``k``: the count each rank
    selected, Ok-Topk's choice); ``kept`` says which of this rank's entries did, the rest return to the residual.
    One instance per bucket (it reuses its threshold and ranges). A rank whose gradient is not finite sends one
    NaN entry, so the sum is not finite on every rank.

    Cost: the split phase, then on a threshold-reuse call the count allgather (``(P-1)*72`` bytes) and a ring
    allgatherv of ``k/P`` entries per rank; one call in ``threshold_interval`` estimates instead (a 32-byte head
    allgather, ``ceil(log16(U(P)/c))`` allreduces of 15 int64 counts, the ``c = max(64, k/16)`` entries of the
    last bracket, then the kept ``k/P`` per rank); the range repartition every ``repartition_interval`` calls is
    amortised too.
    """

    name = "gtopk"
    exact = False
    stateful = True

    def __init__(self) -> None:
        self.topk = GlobalTopK()

    def reduce(self, indices: torch.Tensor, values: torch.Tensor, numel: int, backend: Backend, *,
               finite: bool = True, k: int = 0, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
               **kw) -> Reduced:
        """See :meth:`Collective.reduce`; ``k``: the entries kept globally; ``dtype``: the sum's (default: fp32
        for half values, else theirs); ``out``: a ``(numel,)`` tensor of that dtype to write the sum into (e.g. the
        bucket buffer), else a new one."""
        dtype = dtype or accumulator_dtype(values.dtype)
        check_out(out, numel, dtype, values.device)
        if not finite:
            indices = torch.zeros(1, dtype=torch.int64, device=values.device)
            values = torch.full((1,), float("nan"), dtype=values.dtype, device=values.device)
        result = self.topk(indices, values, numel, k, backend=backend)
        out = zeroed(out, numel, dtype, values.device)
        if not result.finite:  # every rank learnt it inside the algorithm: all skip the step together
            return Reduced(out.fill_(float("nan")), False)
        scatter_add(out, result.indices, result.values)
        return Reduced(out, all_finite(out), kept=result.kept if finite else None)

    def state_dict(self) -> dict:
        return self.topk.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.topk.load_state_dict(state)

    @staticmethod
    def cost(c: CostTerms, sheet: CostSheet) -> None:
        P = c.P
        kg = float(min(c.n, c.gtopk_k))
        split_phase_cost(c, sheet)
        reuse, exact = CostSheet(), CostSheet()
        reuse.step(P - 1, (P - 1) * COUNT_HEADER_BYTES, "allgather")
        reuse.step(P - 1, (P - 1) * c.sparse_msg(kg / P), "sendrecv", P - 1)
        reuse.local("sparse", kg)  # the kept entries written
        cap = max(64.0, kg / 16)
        rounds = max(1, math.ceil(math.log(max(c.U(P), cap + 1) / cap, 16)))
        exact.step(P - 1, (P - 1) * ESTIMATE_HEAD_BYTES, "allgather")
        for _ in range(rounds):
            exact.step(2 * (P - 1), ring_allreduce_bytes(SPLIT_POINTS, 8, P), "allreduce")
        for m in (cap, kg):  # the bracket's entries, then the kept ones: counts first each time
            exact.step(P - 1, (P - 1) * COUNT_BYTES, "allgather")
            exact.step(P - 1, (P - 1) * c.sparse_msg(m / P), "sendrecv", P - 1)
        exact.local("sparse", cap)
        exact.local("sparse", kg)
        w = 1.0 / max(1, c.threshold_interval)
        sheet.add(reuse, 1 - w)
        sheet.add(exact, w)
        wr = 1.0 / max(1, c.repartition_interval)
        sheet.step(wr * 2 * (P - 1), wr * ring_allreduce_bytes(P, 8, P), "allreduce", wr)