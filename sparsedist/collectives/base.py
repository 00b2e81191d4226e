"""The :class:`Collective` interface that every summation algorithm implements, and the alpha-beta cost terms.

A collective sums one sparse vector per rank. The hook calls :meth:`Collective.reduce` with this rank's entries
(bucket-level positions and values in the wire dtype) and gets a :class:`Reduced`: the dense sum, which of its
own entries survived (only a global top-k drops any), and whether every rank's input and the sum were finite.
Each algorithm also states its cost for the model in :mod:`sparsedist.collectives.choose`, beside its code
(:meth:`Collective.cost`), in terms of a :class:`CostTerms` and a :class:`CostSheet`.

Notation of the cost formulas: ``n`` elements, ``P`` ranks, ``k`` entries per rank (``k_max`` the largest),
``b_v``/``b_i`` value/index bytes, ``s = b_i + b_v``, ``h = 8`` header bytes, ``delta`` SparCML's density at
which a block goes dense, ``U(c)`` the expected support of the sum of ``c`` ranks' vectors (the fill-in).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from .backend import Backend

__all__ = ["Collective", "Reduced", "CostTerms", "CostSheet", "Prediction", "HEADER_BYTES", "SIZE_BYTES",
           "check_sparse_input", "curve_seconds", "work_seconds", "WORK_KINDS"]

HEADER_BYTES = 8  # a sparse block's header (streams.HEADER_BYTES)
SIZE_BYTES = 8    # one int64 size message
#: The kinds of local work the cost formulas charge (:meth:`CostSheet.local`): ``"sparse"`` decoding received
#: (index, value) entries and adding them into a vector, ``"packed"`` the same for Strom's 4-byte words (index and
#: sign), ``"sort"`` coalescing entries into a sorted stream, ``"dense"`` one pass over a vector's elements.
WORK_KINDS = ("sparse", "packed", "sort", "dense")


@dataclass
class Reduced:
    """What a collective returns on every rank.

    Attributes:
        total: ``(numel,)`` the sum over ranks, in the accumulation dtype (fp32 for fp16/bf16 values).
        finite: every rank's input and the sum were finite (False: some rank overflowed; the sum is not usable).
        kept: ``(nnz,)`` bool, one per entry of this rank's input: whether it is in ``total`` (None: all are).
        max_count: the largest number of entries any rank sent (for the cost model's padding), when known.
        support: int64 positions outside which ``total`` is zero (duplicates allowed), when known: averaging
            then divides only these instead of the whole vector.
    """

    total: torch.Tensor
    finite: bool
    kept: torch.Tensor | None = None
    max_count: int | None = None
    support: torch.Tensor | None = None


@dataclass(frozen=True)
class Prediction:
    """Predicted cost of one algorithm for one bucket on one rank.

    Attributes:
        algorithm: the algorithm's name.
        time: predicted seconds, ``alpha*latency + beta*bytes + gamma*sparse_work + gamma_dense*dense_work +
            gamma_sort*sort_work`` (with measured per-primitive costs, the latency and bytes of each primitive kind
            priced by its own; with measured local-work curves, each local operation by its kind's curve).
        latency: number of message latencies (alphas) on the critical path.
        bytes: bytes on the critical path of the busiest rank (per step the larger of sent and received).
        sparse_work: sparse entries the rank handles locally.
        dense_work: dense elements the rank touches locally.
        sort_work: entries the rank sorts to coalesce its unsorted input (SparCML's streams).
        work: every local operation priced, ``(kind, operations, count each)`` (:meth:`CostSheet.local`).
    """

    algorithm: str
    time: float
    latency: float
    bytes: float
    sparse_work: float = 0.0
    dense_work: float = 0.0
    sort_work: float = 0.0
    work: tuple = ()


@dataclass
class CostTerms:
    """The inputs of every algorithm's cost formula for one bucket (see the module docstring for the symbols)."""

    n: int
    P: int
    k: float
    k_max: float
    b_v: int
    b_i: int
    delta: float
    fill_in: Callable[[int], float]
    gtopk_k: float
    threshold_interval: int = 32
    repartition_interval: int = 64

    @property
    def s(self) -> int:
        """Bytes of one sparse entry."""
        return self.b_i + self.b_v

    def U(self, c: int) -> float:
        """Expected support of the sum of ``c`` ranks' vectors."""
        return self.fill_in(c)

    def block(self, m: float, length: float) -> float:
        """Bytes of a block of ``m`` entries over ``length`` elements: sparse, or dense once ``m > delta*length``."""
        if m <= 0:
            return 0.0
        if m > self.delta * length:
            return HEADER_BYTES + length * self.b_v
        return HEADER_BYTES + m * self.s

    def sparse_msg(self, m: float) -> float:
        """Bytes of a sparse block of ``m`` entries (never dense)."""
        return 0.0 if m <= 0 else HEADER_BYTES + m * self.s


def curve_seconds(points, nbytes: float) -> float:
    """Seconds of one call moving ``nbytes`` (as the cost formulas count them), read off a measured curve.

    ``points``: ``((bytes, seconds), ...)`` with increasing bytes, the first a tiny call (its latency). Between two
    points the time is interpolated linearly (an alpha-beta model per segment); below the first it is the first
    point's time; above the last it grows at the last segment's seconds per byte. A local-work curve
    (:func:`work_seconds`) is read the same way, with entries or elements for bytes.
    """
    b0, t0 = points[0]
    if nbytes <= b0:
        return t0
    for (b_lo, t_lo), (b_hi, t_hi) in zip(points, points[1:]):
        if nbytes <= b_hi:
            return t_lo + (t_hi - t_lo) * (nbytes - b_lo) / (b_hi - b_lo)
    return t_hi + (t_hi - t_lo) / (b_hi - b_lo) * (nbytes - b_hi)


def work_seconds(curves: dict, kind: str, count: float) -> float:
    """Seconds of one local operation of ``kind`` (:data:`WORK_KINDS`) on ``count`` entries (elements for
    ``"dense"``), read off measured curves ``{kind: ((count, seconds), ...)}`` (:func:`curve_seconds`): the first
    point is a small operation, so what a kernel costs however few its entries (its launch, its Python) is
    priced. ``"packed"`` falls back to the ``"sparse"`` curve. Nothing to do costs nothing."""
    if count <= 0:
        return 0.0
    return curve_seconds(curves.get(kind) or curves["sparse"], count)


@dataclass
class CostSheet:
    """Accumulates one algorithm's messages, bytes and local work; :meth:`done` prices them.

    ``calls`` and ``kind_bytes`` keep, per primitive kind (``"allreduce"``, ``"allgather"``, ``"sendrecv"``,
    ``"alltoall"``), the number of calls and the bytes on the critical path, so that measured per-kind costs can
    price them (``call_latency``, ``call_beta`` of :meth:`done`); ``sized`` keeps every step's ``(kind, calls,
    bytes per call)``, so that a measured curve of seconds against bytes per call can (``call_curve``). Local work
    goes through :meth:`local`, which keeps the totals (``sparse``, ``dense``, ``sort``) that the per-entry gammas
    price and every operation's ``(kind, operations, count each)`` in ``work``, which measured curves of seconds
    against entries price (``work_curve``).
    """

    latency: float = 0.0
    bytes: float = 0.0
    sparse: float = 0.0
    dense: float = 0.0
    sort: float = 0.0
    calls: dict = field(default_factory=dict)
    kind_bytes: dict = field(default_factory=dict)
    sized: list = field(default_factory=list)
    work: list = field(default_factory=list)

    def step(self, messages: float, nbytes: float, kind: str, calls: float = 1.0, parts=None) -> None:
        """``calls`` calls of primitive ``kind`` costing ``messages`` alphas and ``nbytes`` bytes together, of
        ``nbytes / calls`` bytes each, or of ``parts`` bytes each (one entry per call) when their sizes differ."""
        self.latency += messages
        self.bytes += nbytes
        self.calls[kind] = self.calls.get(kind, 0.0) + calls
        self.kind_bytes[kind] = self.kind_bytes.get(kind, 0.0) + nbytes
        if parts is not None:
            self.sized.extend((kind, 1.0, float(b)) for b in parts)
        elif calls > 0:
            self.sized.append((kind, calls, nbytes / calls))

    def local(self, kind: str, count: float, ops: float = 1.0) -> None:
        """``ops`` local operations of ``kind`` (:data:`WORK_KINDS`) on ``count`` entries each (elements for
        ``"dense"``): a sort adds to ``sort``, a dense pass to ``dense``, a decode-and-add (sparse or packed) to
        ``sparse``."""
        if kind not in WORK_KINDS:
            raise ValueError(f"unknown kind of local work {kind!r}; one of {WORK_KINDS}")
        total = ops * count
        if kind == "dense":
            self.dense += total
        elif kind == "sort":
            self.sort += total
        else:
            self.sparse += total
        if ops > 0 and count > 0:
            self.work.append((kind, float(ops), float(count)))

    def add(self, other: "CostSheet", weight: float) -> None:
        """Add ``weight`` times another sheet (an amortised alternative, e.g. a periodic estimation)."""
        self.latency += weight * other.latency
        self.bytes += weight * other.bytes
        self.sparse += weight * other.sparse
        self.dense += weight * other.dense
        self.sort += weight * other.sort
        for kind, c in other.calls.items():
            self.calls[kind] = self.calls.get(kind, 0.0) + weight * c
        for kind, b in other.kind_bytes.items():
            self.kind_bytes[kind] = self.kind_bytes.get(kind, 0.0) + weight * b
        self.sized.extend((kind, weight * c, b) for kind, c, b in other.sized)
        self.work.extend((kind, weight * ops, m) for kind, ops, m in other.work)

    def done(self, name: str, alpha: float, beta: float, gamma: float, gamma_dense: float,
             call_latency: dict | None, call_beta: dict | None = None, call_curve: dict | None = None,
             gamma_sort: float = 0.0, work_curve: dict | None = None) -> Prediction:
        """Price the sheet: ``alpha`` per message (or ``call_latency[kind]`` per call), ``beta`` per byte (or
        ``call_beta[kind]`` per byte of that kind), ``gamma`` per sparse entry, ``gamma_dense`` per dense element.
        ``gamma_sort`` per entry sorted (0 for a configured model: then the time is exactly what it was before
        this term existed). With ``call_curve`` (``{kind: ((bytes, seconds), ...)}``, measured) each call costs
        what the curve of its kind says for its bytes (:func:`curve_seconds`), latency and bytes together,
        instead; with ``work_curve`` (``{kind: ((count, seconds), ...)}``, measured) each local operation costs what
        its kind's curve says for its count (:func:`work_seconds`), instead of the gammas."""
        if call_curve:
            lat, wire = 0.0, sum(c * curve_seconds(call_curve[kind], b) for kind, c, b in self.sized)
        else:
            lat = sum(c * call_latency[kind] for kind, c in self.calls.items()) if call_latency else \
                alpha * self.latency
            wire = sum(b * call_beta[kind] for kind, b in self.kind_bytes.items()) if call_beta else \
                beta * self.bytes
        if work_curve:
            local = sum(ops * work_seconds(work_curve, kind, m) for kind, ops, m in self.work)
        else:
            local = gamma * self.sparse + gamma_dense * self.dense + gamma_sort * self.sort
        t = lat + wire + local
        return Prediction(name, t, self.latency, self.bytes, self.sparse, self.dense, self.sort, tuple(self.work))


class Collective:
    """One algorithm that sums a sparse vector per rank. Subclasses set the class attributes and implement
    :meth:`reduce` and :meth:`cost`.

    Class attributes:
        name: the registry name (``collective=`` in :func:`sparsedist.register`).
        exact: True if ``total`` is the exact sum of every entry (False for a global top-k).
        stateful: True if an instance keeps state between calls of one bucket (one instance per bucket then).
    """

    name: ClassVar[str] = "base"
    exact: ClassVar[bool] = True
    stateful: ClassVar[bool] = False

    def reduce(self, indices: torch.Tensor, values: torch.Tensor, numel: int, backend: Backend, *,
               finite: bool = True, **kw: Any) -> Reduced:
        """Sum over ranks.

        Args:
            indices: ``(nnz,)`` int64 positions in ``[0, numel)`` of this rank's entries (ignored if not finite).
            values: ``(nnz,)`` values in the wire dtype.
            numel: length of the vector, the same on every rank.
            backend: the communicator; every rank calls with the same ``numel`` and algorithm.
            finite: False if this rank's gradient is not finite: it takes part without payload and every rank's
                result says ``finite=False``.
            **kw: algorithm-specific (``constant`` for Strom-packed allgather payloads, ``k`` for a global top-k).
        """
        raise NotImplementedError

    @staticmethod
    def cost(c: CostTerms, sheet: CostSheet) -> None:
        """Add this algorithm's messages, bytes and local work for one bucket to ``sheet``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def check_sparse_input(indices, values, numel, *, where: str = "sparse_allreduce") -> int:
    """Validate one rank's sparse vector; returns ``numel`` as an int. Raises ``TypeError``/``ValueError``."""
    if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError(f"{where}: indices and values must be torch.Tensors, got {type(indices).__name__} "
                        f"and {type(values).__name__}")
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"{where}: indices must be an integer tensor (int32 or int64), got {indices.dtype}")
    if not values.is_floating_point():
        raise TypeError(f"{where}: values must be floating point (fp32, fp64, fp16, bf16), got {values.dtype}; "
                        f"cast them with values.float()")
    if indices.dim() != 1 or values.dim() != 1:
        raise ValueError(f"{where}: indices and values must be 1-D, got shapes {tuple(indices.shape)} and "
                         f"{tuple(values.shape)}; flatten them (and offset the indices) first")
    if indices.numel() != values.numel():
        raise ValueError(f"{where}: {indices.numel()} indices but {values.numel()} values; they must pair up")
    if indices.device != values.device:
        raise ValueError(f"{where}: indices are on {indices.device} but values on {values.device}; move them "
                         f"to one device")
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral):  # (numpy integers are fine)
        raise TypeError(f"{where}: numel must be an int, got {type(numel).__name__}")
    numel = int(numel)
    if numel < 0:
        raise ValueError(f"{where}: numel must be >= 0, got {numel}")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= numel:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{where}: index {bad} is outside [0, numel={numel}); every index must address an "
                             f"element of the dense vector")
    return numel
