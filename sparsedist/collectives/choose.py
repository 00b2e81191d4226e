"""Alpha-beta cost model that picks the collective for one bucket.

A message of ``m`` bytes costs ``alpha + m * beta`` (Hockney). Steps that run one after the other add up; the
``P - 1`` messages of a ring or pairwise-exchange step count ``P - 1`` alphas. Local-work terms can be added:
``gamma`` seconds per sparse entry a rank handles (sort/merge/scatter), ``gamma_dense`` seconds per dense element
it touches (zero-fill, add, copy) and ``gamma_sort`` seconds per entry of the sort that coalesces SparCML's
unsorted input into a stream -- on a fast link these decide, on a slow one the network does.

Each algorithm's formula lives beside its code (``cost()`` of its :class:`~sparsedist.collectives.base.Collective`
in :mod:`.allgather`, :mod:`.dense`, :mod:`.sparcml`, :mod:`.gtopk`); its byte counts follow the code exactly,
so that the benchmark can put predicted and counted bytes side by side. :func:`predict` evaluates them for one
bucket; :func:`choose` picks the cheapest; :class:`CostModel` holds the link parameters (configured, or measured
by :func:`sparsedist.collectives.probe`).

Fill-in: with no better knowledge the supports are taken as independent uniform random k-subsets, so
``U(c) = n (1 - (1 - k/n)^c)``. Real gradients overlap more (the same coordinates are large on every rank);
pass the measured support of last step's sum as ``union_nnz`` and the model fits an *effective universe*
``n_eff`` with ``n_eff (1 - (1 - k/n_eff)^P) = union_nnz`` and uses ``U(c) = n_eff (1 - (1 - k/n_eff)^c)``.

Assumptions: full-duplex links (a sendrecv costs one message), one message at a time per rank, ring
allgather and pairwise alltoall (``P - 1`` alphas each), perfectly balanced ranges (``k/P`` entries per range),
no overlap of communication and computation. Measured per-primitive costs (``call_latency``, ``call_beta`` of a
probed :class:`CostModel`) replace ``alpha`` and ``beta`` where they were measured: a library's primitives need
not reach the same share of the link (on gloo over TCP, an allgather or a concurrent send/recv in both
directions took 1.3-1.8x the seconds per byte of a ring allreduce, docs/estimate.md), and that share is then
priced from the measurement instead of from the full-duplex assumption. A measured curve per primitive
(``call_curve``: seconds of one call at several sizes) goes further and prices each call at its own size, since
on TCP the share a call reaches depends on its size. Every rank must call :func:`choose`
with the same arguments (use a probed model averaged over ranks -- :func:`~sparsedist.collectives.probe` does
that -- and per-rank counts agreed by a collective), otherwise ranks pick different algorithms and deadlock.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .base import WORK_KINDS, CostSheet, CostTerms, Prediction, work_seconds
from .registry import ALGORITHMS, COLLECTIVES, EXACT_ALGORITHMS

__all__ = ["ALGORITHMS", "EXACT_ALGORITHMS", "PRIMITIVES", "CostModel", "Prediction", "Choice", "predict",
           "choose", "expected_union", "effective_universe"]

#: The primitive kinds the cost formulas charge (``CostSheet.calls``), each with its own measured costs.
PRIMITIVES = ("allreduce", "allgather", "sendrecv", "alltoall")


def _finite_at_least_zero(v) -> bool:
    """A real number (not a bool), finite and >= 0 (NaN fails)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and not math.isinf(v)


def _valid_curve(pts) -> bool:
    """At least two ``(bytes, seconds)`` points of finite numbers >= 0, bytes increasing."""
    return (isinstance(pts, (list, tuple)) and len(pts) >= 2
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_finite_at_least_zero, p)) for p in pts)
            and all(b1 > b0 for (b0, _), (b1, _) in zip(pts, pts[1:])))


def _each_kind(costs: dict | None, what: str, shape: str, kinds=PRIMITIVES) -> list[tuple[str, object]]:
    """``(kind, value)`` for every kind of ``kinds`` (the primitives by default) of ``costs`` (none if it is None);
    a TypeError unless a dict."""
    if costs is None:
        return []
    if not isinstance(costs, dict):
        raise TypeError(f"{what} must be a dict {{kind: {shape}}}, got {type(costs).__name__}")
    return [(kind, costs.get(kind)) for kind in kinds]


def _check_per_kind(costs: dict | None, what: str, unit: str) -> None:
    """Every primitive kind needs a finite cost >= 0 in ``costs`` (if given)."""
    for kind, v in _each_kind(costs, what, unit):
        if not _finite_at_least_zero(v):
            raise ValueError(f"{what}[{kind!r}] must be {unit} >= 0 (one for each of {PRIMITIVES}), got {v!r}")


def _check_curve(curve: dict | None, what: str, kinds=PRIMITIVES, unit: str = "bytes") -> None:
    """Every kind needs at least two ``(bytes, seconds)`` points (``(count, seconds)`` for local work), bytes
    increasing, finite values >= 0."""
    for kind, pts in _each_kind(curve, what, f"(({unit}, seconds), ...)", kinds):
        if not _valid_curve(pts):
            raise ValueError(f"{what}[{kind!r}] must be at least two ({unit}, seconds) points with increasing "
                             f"{unit} and finite values >= 0 (one curve for each of {kinds}), got {pts!r}")


@dataclass(frozen=True)
class Choice:
    """The algorithm :func:`choose` picked and the predictions it compared (``algorithm -> Prediction``)."""

    algorithm: str
    predictions: dict

    @property
    def predicted_time(self) -> float:
        """Predicted seconds of the chosen algorithm."""
        return self.predictions[self.algorithm].time


def expected_union(numel: int, nnz: float, count: int, n_eff: float | None = None) -> float:
    """Expected support of the sum of ``count`` sparse vectors with ``nnz`` entries each.

    Independent uniform supports drawn from ``n_eff`` coordinates (default ``numel``):
    ``n_eff * (1 - (1 - nnz/n_eff)**count)``, capped at ``numel``.
    """
    if numel <= 0 or nnz <= 0 or count <= 0:
        return 0.0
    n = float(numel if n_eff is None else n_eff)
    if math.isinf(n):
        return float(min(numel, nnz * count))
    p = min(1.0, nnz / n)
    miss = 0.0 if p >= 1.0 else math.exp(count * math.log1p(-p))
    return float(min(numel, n * (1.0 - miss)))


def effective_universe(numel: int, nnz: float, world_size: int, union_nnz: float) -> float:
    """The ``n_eff`` for which ``expected_union(.., nnz, world_size, n_eff)`` equals the measured ``union_nnz``.

    ``union_nnz <= nnz`` (identical supports) gives ``nnz``; ``union_nnz >= world_size * nnz`` (disjoint
    supports) gives ``inf``.
    """
    if nnz <= 0 or world_size <= 1:
        return float(numel)
    if union_nnz <= nnz:
        return float(nnz)
    if union_nnz >= world_size * nnz * (1 - 1e-9):
        return math.inf

    def f(n_eff: float) -> float:
        return n_eff * (1.0 - math.exp(world_size * math.log1p(-min(1.0, nnz / n_eff))))

    lo, hi = float(nnz), float(max(numel, nnz) * 2)
    while f(hi) < union_nnz:
        hi *= 2.0
        if hi > 1e30:
            return math.inf
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if f(mid) < union_nnz:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return hi


def predict(numel: int, nnz: float, world_size: int, *, alpha: float, beta: float, gamma: float = 0.0,
            gamma_dense: float = 0.0, gamma_sort: float = 0.0, value_bytes: int = 4, index_bytes: int | None = None,
            nnz_max: float | None = None, union_nnz: float | None = None, dense_threshold: float | None = None,
            gtopk_k: float | None = None, threshold_interval: int = 32, repartition_interval: int = 64,
            algorithms=ALGORITHMS, call_latency: dict | None = None, call_beta: dict | None = None,
            call_curve: dict | None = None, work_curve: dict | None = None) -> dict:
    """Predicted cost of each algorithm for one bucket.

    Args:
        numel: length of the bucket (elements).
        nnz: entries per rank (the mean when counts differ).
        world_size: number of ranks ``P``.
        alpha: seconds per message (latency).
        beta: seconds per byte (inverse bandwidth).
        gamma: seconds per sparse entry handled locally (0: ignore local work).
        gamma_dense: seconds per dense element touched locally (0: ignore).
        gamma_sort: seconds per entry of the sort that coalesces an unsorted input into a SparCML stream (0:
            ignore, as before this term existed).
        value_bytes: bytes per value on the wire (4 fp32, 2 fp16/bf16).
        index_bytes: bytes per index (default 4 below ``2**31`` elements, else 8).
        nnz_max: the largest count over ranks (padding of the allgather; default ``nnz``).
        union_nnz: measured support of the sum over all ranks (default: random supports, see module doc).
        dense_threshold: SparCML's delta (default ``value_bytes / (index_bytes + value_bytes)``).
        gtopk_k: entries global top-k keeps (default ``nnz``, Ok-Topk's choice of the same k as locally).
        threshold_interval, repartition_interval: Ok-Topk's re-estimation periods (steps).
        algorithms: which algorithms to predict.
        call_latency: measured seconds per call of each primitive (``"allreduce"``, ``"allgather"``,
            ``"sendrecv"``, ``"alltoall"``) at this world size; when given it replaces ``alpha * latency`` (a
            Python-level call has a fixed cost that ``alpha`` from an allreduce fit does not capture).
        call_beta: measured seconds per byte of each primitive kind at this world size, per byte as the cost
            formulas count them (one direction of a send/recv); when given it replaces ``beta`` (e.g. gloo's
            allgather and concurrent send/recv run below the link rate that its ring allreduce reaches).
        call_curve: measured seconds of one call of each primitive kind at several sizes at this world size,
            ``{kind: ((bytes, seconds), ...)}`` (bytes as the cost formulas count them, increasing); when given,
            every call is priced by its kind's curve at its own size (interpolated linearly between the measured
            sizes), replacing ``call_latency``, ``call_beta``, ``alpha`` and ``beta``: on a TCP link the rate a call
            reaches depends on its size (docs/estimate.md).
        work_curve: measured seconds of one local operation of each kind (:data:`~.base.WORK_KINDS`: ``"sparse"``,
            ``"packed"``, ``"sort"``, ``"dense"``) at several sizes, ``{kind: ((count, seconds), ...)}`` (entries,
            or elements for ``"dense"``, increasing); when given, every local operation is priced by its kind's
            curve at its own size, replacing ``gamma``, ``gamma_dense`` and ``gamma_sort``: a kernel of a few
            thousand entries costs its launch and Python more than its entries, which a per-entry rate timed on
            hundreds of thousands does not see.

    Returns:
        ``{algorithm: Prediction}``.
    """
    n, P = int(numel), int(world_size)
    if n < 0 or P < 1:
        raise ValueError(f"need numel >= 0 and world_size >= 1, got numel={numel}, world_size={world_size}")
    if nnz < 0 or alpha < 0 or beta < 0 or gamma < 0 or gamma_dense < 0 or gamma_sort < 0:
        raise ValueError("nnz, alpha, beta, gamma, gamma_dense and gamma_sort must be >= 0")
    unknown = set(algorithms) - set(ALGORITHMS)
    if unknown:
        raise ValueError(f"unknown algorithm(s) {sorted(unknown)}; choose from {ALGORITHMS}")
    _check_per_kind(call_latency, "call_latency", "seconds per call")
    _check_per_kind(call_beta, "call_beta", "seconds per byte")
    _check_curve(call_curve, "call_curve")
    _check_curve(work_curve, "work_curve", WORK_KINDS, "count")
    bv = int(value_bytes)
    bi = int(index_bytes) if index_bytes is not None else (4 if n <= 2**31 - 1 else 8)
    k = float(min(nnz, n))
    n_eff = effective_universe(n, k, P, float(union_nnz)) if union_nnz is not None and P > 1 else None
    terms = CostTerms(n=n, P=P, k=k, k_max=float(min(n, nnz_max if nnz_max is not None else nnz)), b_v=bv, b_i=bi,
                      delta=bv / (bi + bv) if dense_threshold is None else float(dense_threshold),
                      fill_in=lambda c: expected_union(n, k, c, n_eff),
                      gtopk_k=gtopk_k if gtopk_k is not None else k, threshold_interval=threshold_interval,
                      repartition_interval=repartition_interval)
    out = {}
    for name in algorithms:
        sheet = CostSheet()
        if P > 1:
            COLLECTIVES[name].cost(terms, sheet)
        out[name] = sheet.done(name, alpha, beta, gamma, gamma_dense, call_latency, call_beta, call_curve,
                               gamma_sort, work_curve)
    return out


def choose(numel: int, nnz: float, world_size: int, *, alpha: float, beta: float,
           candidates=EXACT_ALGORITHMS, **kwargs) -> Choice:
    """Pick the candidate with the smallest predicted time (ties go to ``"dense"``, then candidate order).

    Args:
        numel, nnz, world_size, alpha, beta: as :func:`predict`.
        candidates: algorithms to choose among (default the exact ones; add ``"gtopk"`` only where a global
            top-k result is acceptable).
        **kwargs: further arguments of :func:`predict` (``value_bytes``, ``index_bytes``, ``union_nnz``,
            ``gamma``, ...).

    Returns:
        A :class:`Choice` with the algorithm and every candidate's :class:`Prediction`.
    """
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("choose() needs at least one candidate algorithm")
    preds = predict(numel, nnz, world_size, alpha=alpha, beta=beta, algorithms=candidates, **kwargs)
    best = min(candidates, key=lambda a: (preds[a].time, a != "dense", candidates.index(a)))
    return Choice(best, preds)


@dataclass
class CostModel:
    """Link and host parameters of the model; configure by hand or measure with :func:`probe`.

    Attributes:
        alpha: seconds per message. Default 20 us (a TCP message on a 10-25 GbE cluster).
        beta: seconds per byte. Default ``8e-10`` (10 Gbit/s).
        gamma: seconds per sparse entry handled locally. Default 0 (ignore).
        gamma_dense: seconds per dense element touched locally. Default 0 (ignore).
        gamma_sort: seconds per entry of the sort that coalesces an unsorted input into a SparCML stream.
            Default 0 (ignore, exactly as before this term existed); measured by ``probe(work_numel=n)``.
        call_latency: optional measured seconds per call of each primitive (``"allreduce"``, ``"allgather"``,
            ``"sendrecv"``, ``"alltoall"``) at ``world_size`` ranks; used instead of ``alpha`` when predicting for
            that world size (other world sizes use ``alpha``).
        call_beta: optional measured seconds per byte of each primitive (the same kinds; bytes as the cost
            formulas count them) at ``world_size`` ranks; used instead of ``beta`` when predicting for that world
            size (other world sizes use ``beta``). ``None`` (the default): every primitive is priced by ``beta``,
            exactly as without it.
        call_curve: optional measured seconds of one call of each primitive at several sizes, ``{kind: ((bytes,
            seconds), ...)}``, at ``world_size`` ranks; when predicting for that world size it prices every call
            by its own size and replaces ``call_latency``, ``call_beta``, ``alpha`` and ``beta`` (:func:`predict`).
        work_curve: optional measured seconds of one local operation of each kind at several sizes,
            ``{kind: ((count, seconds), ...)}`` (:func:`predict`); it prices local work at every world size (it is
            local) and replaces ``gamma``, ``gamma_dense`` and ``gamma_sort``. ``probe(work_numel=n)`` measures it.
        world_size: the world size ``call_latency``, ``call_beta`` and ``call_curve`` were measured at.
        measured: raw probe timings, for reports.
    """

    alpha: float = 20e-6
    beta: float = 8e-10
    gamma: float = 0.0
    gamma_dense: float = 0.0
    call_latency: dict | None = None
    world_size: int | None = None
    measured: dict = field(default_factory=dict)
    call_beta: dict | None = None
    call_curve: dict | None = None
    gamma_sort: float = 0.0
    work_curve: dict | None = None

    def __post_init__(self):
        for name in ("alpha", "beta", "gamma", "gamma_dense", "gamma_sort"):
            v = getattr(self, name)
            if not _finite_at_least_zero(v):
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {v!r}")
        for name, unit in (("call_latency", "seconds per call"), ("call_beta", "seconds per byte")):
            if getattr(self, name) is not None and self.world_size is None:
                raise ValueError(f"CostModel.{name} needs the world_size it was measured at")
            _check_per_kind(getattr(self, name), f"CostModel.{name}", unit)
        if self.call_curve is not None and self.world_size is None:
            raise ValueError("CostModel.call_curve needs the world_size it was measured at")
        _check_curve(self.call_curve, "CostModel.call_curve")
        _check_curve(self.work_curve, "CostModel.work_curve", WORK_KINDS, "count")

    def _kw(self, world_size: int) -> dict:
        here = world_size == self.world_size
        return dict(alpha=self.alpha, beta=self.beta, gamma=self.gamma, gamma_dense=self.gamma_dense,
                    gamma_sort=self.gamma_sort,
                    call_latency=self.call_latency if self.call_latency and here else None,
                    call_beta=self.call_beta if self.call_beta and here else None,
                    call_curve=self.call_curve if self.call_curve and here else None,
                    work_curve=self.work_curve or None)

    def work_seconds(self, kind: str, count: float) -> float:
        """Seconds of one local operation of ``kind`` (:data:`~.base.WORK_KINDS`) on ``count`` entries (elements
        for ``"dense"``): read off ``work_curve`` when measured, else ``count`` times the kind's gamma."""
        if kind not in WORK_KINDS:
            raise ValueError(f"unknown kind of local work {kind!r}; one of {WORK_KINDS}")
        if self.work_curve:
            return work_seconds(self.work_curve, kind, count)
        rate = {"dense": self.gamma_dense, "sort": self.gamma_sort}.get(kind, self.gamma)
        return rate * max(count, 0.0)

    def predict(self, numel: int, nnz: float, world_size: int, **kwargs) -> dict:
        """:func:`predict` with this model's parameters."""
        return predict(numel, nnz, world_size, **self._kw(world_size), **kwargs)

    def choose(self, numel: int, nnz: float, world_size: int, **kwargs) -> Choice:
        """:func:`choose` with this model's parameters."""
        return choose(numel, nnz, world_size, **self._kw(world_size), **kwargs)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in ("alpha", "beta", "gamma", "gamma_dense"):
            setattr(self, key, float(state[key]))
        self.gamma_sort = float(state.get("gamma_sort", 0.0))  # a state saved before gamma_sort existed: 0
        cl, cb = state.get("call_latency"), state.get("call_beta")
        self.call_latency = None if cl is None else {k: float(v) for k, v in cl.items()}
        self.call_beta = None if cb is None else {k: float(v) for k, v in cb.items()}
        cc = state.get("call_curve")
        self.call_curve = None if cc is None else {k: tuple((float(b), float(t)) for b, t in pts)
                                                   for k, pts in cc.items()}
        wc = state.get("work_curve")  # None in a state saved before work curves existed
        self.work_curve = None if wc is None else {k: tuple((float(m), float(t)) for m, t in pts)
                                                   for k, pts in wc.items()}
        self.world_size = state.get("world_size")
        self.measured = dict(state.get("measured", {}))
        self.__post_init__()
