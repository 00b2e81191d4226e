"""Alpha-beta cost model that picks the collective for one bucket.

A message of ``m`` bytes costs ``alpha + m * beta`` (Hockney). Steps that run one after the other add up; the
``P - 1`` messages of a ring or pairwise-exchange step count ``P - 1`` alphas. Two local-work terms can be
added: ``gamma`` seconds per sparse entry a rank handles (sort/merge/scatter) and ``gamma_dense`` seconds per
dense element it touches (zero-fill, add, copy) -- on a fast link these decide, on a slow one the network does.

Per algorithm, for one rank, with ``n`` elements, ``k`` entries per rank, ``b_v``/``b_i`` value/index bytes,
``s = b_i + b_v``, ``h = 8`` header bytes and ``U(c)`` the expected support of the sum of ``c`` ranks' vectors
(the *fill-in*), the byte counts follow the code in :mod:`sparsedist.collectives.sparcml` and
:mod:`sparsedist.collectives.gtopk` exactly, so that the benchmark can put predicted and counted bytes side by
side:

=======================  =========================  ==================================================================
algorithm                latency (alphas)           bytes on the critical path of one rank
=======================  =========================  ==================================================================
dense (ring allreduce)   ``2(P-1)``                 ``2(P-1)/P * n * b_v``
allgather                ``2(P-1)``                 ``(P-1)*16 + (P-1)*(h + k_max*s)``: a 16-byte header allgather, then
                                                    the payloads padded to the largest (``Backend.allgather``, a ring)
ssar_recursive_double    ``2 log2 P' (+4)``         sum over rounds r of ``8 + block(U(c_r))``, ``c_r = min(P, f 2^r)``
                                                    inputs per stream (``f = 2`` when ``P`` is not a power of two:
                                                    the fold-in doubles the busiest streams); a block costs
                                                    ``h + m*s`` or ``h + n*b_v`` once ``m > delta*n``; plus fold-in
                                                    ``8 + block(k)`` and fold-out ``8 + block(U(P))`` when ``P != P'``
ssar_split_allgather     ``4(P-1)``                 ``(P-1)*8 + (P-1)*block(k/P)`` (reduce-scatter, sizes first), then
                                                    ``(P-1)*8 + (P-1)*block(U(P)/P)`` (ring allgatherv)
dsar_split_allgather     ``3(P-1)``                 the same first phase, then ``(P-1) * ceil(n/P) * b_v``
gtopk (Ok-Topk)          ``4(P-1)`` (+ amortised)   ``(P-1)*8 + (P-1)*block(k/P)``, then ``(P-1)*72 + (P-1)*(h + (k/P)*s)``
                                                    on threshold-reuse steps (72: the count histogram); one step in
                                                    ``threshold_interval`` estimates instead: a 32-byte head
                                                    allgather, ``ceil(log16(U(P)/c))`` allreduces of 15 int64
                                                    counts, the ``c = max(64, k/16)`` entries of the last bracket,
                                                    then the kept ``k/P`` per rank; the boundary allreduce every
                                                    ``repartition_interval`` steps is amortised too
=======================  =========================  ==================================================================

Fill-in: with no better knowledge the supports are taken as independent uniform random k-subsets, so
``U(c) = n (1 - (1 - k/n)^c)``. Real gradients overlap more (the same coordinates are large on every rank);
pass the measured support of last step's sum as ``union_nnz`` and the model fits an *effective universe*
``n_eff`` with ``n_eff (1 - (1 - k/n_eff)^P) = union_nnz`` and uses ``U(c) = n_eff (1 - (1 - k/n_eff)^c)``.

Assumptions: full-duplex links (a sendrecv costs one message), one message at a time per rank, ring
allgather and pairwise alltoall (``P - 1`` alphas each), perfectly balanced ranges (``k/P`` entries per range),
no overlap of communication and computation. Every rank must call :func:`choose` with the same arguments (use
a probed model averaged over ranks -- :func:`probe` does that -- and per-rank counts agreed by a collective),
otherwise ranks pick different algorithms and deadlock.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .backend import Backend, ring_allreduce_bytes

__all__ = [
    "ALGORITHMS",
    "EXACT_ALGORITHMS",
    "CostModel",
    "AutoTuner",
    "Prediction",
    "Choice",
    "predict",
    "choose",
    "probe",
    "expected_union",
    "effective_universe",
    "extrapolate",
    "format_table",
]

EXACT_ALGORITHMS = ("dense", "allgather", "ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather")
ALGORITHMS = EXACT_ALGORITHMS + ("gtopk",)

_H = 8  # block header bytes
_SIZE = 8  # one int64 size message
_GTOPK_REUSE_HEAD = 72  # gtopk.COUNT_HEADER_BYTES: 16 int32 counts of the threshold grid, the load, k
_GTOPK_EST_HEAD = 32  # float64 count, largest magnitude, load, k
_GTOPK_SPLIT_POINTS = 15  # gtopk._SPLIT_POINTS: int64 counts per selection round
_GTOPK_COUNT = 8  # int32 count, k


@dataclass(frozen=True)
class Prediction:
    """Predicted cost of one algorithm for one bucket on one rank.

    Attributes:
        algorithm: the algorithm's name.
        time: predicted seconds, ``alpha*latency + beta*bytes + gamma*sparse_work + gamma_dense*dense_work``.
        latency: number of message latencies (alphas) on the critical path.
        bytes: bytes on the critical path of the busiest rank (per step the larger of sent and received).
        sparse_work: sparse entries the rank handles locally.
        dense_work: dense elements the rank touches locally.
    """

    algorithm: str
    time: float
    latency: float
    bytes: float
    sparse_work: float = 0.0
    dense_work: float = 0.0


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


class _Acc:
    def __init__(self):
        self.latency = self.bytes = self.sparse = self.dense = 0.0
        self.calls: dict = {}

    def step(self, messages: float, nbytes: float, kind: str, calls: float = 1.0) -> None:
        """``calls`` calls of primitive ``kind`` costing ``messages`` alphas and ``nbytes`` bytes together."""
        self.latency += messages
        self.bytes += nbytes
        self.calls[kind] = self.calls.get(kind, 0.0) + calls

    def add(self, other: "_Acc", weight: float) -> None:
        self.latency += weight * other.latency
        self.bytes += weight * other.bytes
        self.sparse += weight * other.sparse
        self.dense += weight * other.dense
        for kind, c in other.calls.items():
            self.calls[kind] = self.calls.get(kind, 0.0) + weight * c

    def done(self, name: str, alpha: float, beta: float, gamma: float, gamma_dense: float,
             call_latency: dict | None) -> Prediction:
        if call_latency:
            lat = sum(c * call_latency[kind] for kind, c in self.calls.items())
        else:
            lat = alpha * self.latency
        t = lat + beta * self.bytes + gamma * self.sparse + gamma_dense * self.dense
        return Prediction(name, t, self.latency, self.bytes, self.sparse, self.dense)


def predict(numel: int, nnz: float, world_size: int, *, alpha: float, beta: float, gamma: float = 0.0,
            gamma_dense: float = 0.0, value_bytes: int = 4, index_bytes: int | None = None,
            nnz_max: float | None = None, union_nnz: float | None = None, dense_threshold: float | None = None,
            gtopk_k: float | None = None, threshold_interval: int = 32, repartition_interval: int = 64,
            algorithms=ALGORITHMS, call_latency: dict | None = None) -> dict:
    """Predicted cost of each algorithm for one bucket.

    Args:
        numel: length of the bucket (elements).
        nnz: entries per rank (the mean when counts differ).
        world_size: number of ranks ``P``.
        alpha: seconds per message (latency).
        beta: seconds per byte (inverse bandwidth).
        gamma: seconds per sparse entry handled locally (0: ignore local work).
        gamma_dense: seconds per dense element touched locally (0: ignore).
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

    Returns:
        ``{algorithm: Prediction}``.
    """
    n, P = int(numel), int(world_size)
    if n < 0 or P < 1:
        raise ValueError(f"need numel >= 0 and world_size >= 1, got numel={numel}, world_size={world_size}")
    if nnz < 0 or alpha < 0 or beta < 0 or gamma < 0 or gamma_dense < 0:
        raise ValueError("nnz, alpha, beta, gamma and gamma_dense must be >= 0")
    unknown = set(algorithms) - set(ALGORITHMS)
    if unknown:
        raise ValueError(f"unknown algorithm(s) {sorted(unknown)}; choose from {ALGORITHMS}")
    bv = int(value_bytes)
    bi = int(index_bytes) if index_bytes is not None else (4 if n <= 2**31 - 1 else 8)
    s = bi + bv
    k = float(min(nnz, n))
    kmax = float(min(n, nnz_max if nnz_max is not None else nnz))
    delta = bv / (bi + bv) if dense_threshold is None else float(dense_threshold)
    n_eff = None
    if union_nnz is not None and P > 1:
        n_eff = effective_universe(n, k, P, float(union_nnz))

    def U(c: int) -> float:
        return expected_union(n, k, c, n_eff)

    def block(m: float, length: float) -> float:
        if m <= 0:
            return 0.0
        if m > delta * length:
            return _H + length * bv
        return _H + m * s

    def sparse_msg(m: float) -> float:
        return 0.0 if m <= 0 else _H + m * s

    out = {}
    if call_latency is not None:
        missing = {"allreduce", "allgather", "sendrecv", "alltoall"} - set(call_latency)
        if missing:
            raise ValueError(f"call_latency needs seconds for {sorted(missing)}")
    args = (alpha, beta, gamma, gamma_dense, call_latency)
    for name in algorithms:
        a = _Acc()
        if P == 1:
            out[name] = a.done(name, *args)
            continue
        if name == "dense":
            a.step(2 * (P - 1), ring_allreduce_bytes(n, bv, P), "allreduce")
            a.dense += n + k  # zero-fill and scatter: element-wise work, no sort
        elif name == "allgather":
            a.step(P - 1, (P - 1) * 16, "allgather")
            if kmax > 0:
                a.step(P - 1, (P - 1) * sparse_msg(kmax), "allgather")
            a.sparse += P * k
            a.dense += n
        elif name == "ssar_recursive_double":
            p2 = 1 << (P.bit_length() - 1)
            f = 1 if p2 == P else 2
            if p2 != P:
                a.step(2, _SIZE + block(k, n), "sendrecv", 2)
                a.sparse += 2 * k
            r = 0
            while (1 << r) < p2:
                c = min(P, f << r)
                m = U(c)
                a.step(2, _SIZE + block(m, n), "sendrecv", 2)
                merged = U(min(P, 2 * c))
                if merged > delta * n or m > delta * n:
                    a.dense += 2 * n
                else:
                    a.sparse += 2 * m
                r += 1
            if p2 != P:
                a.step(2, _SIZE + block(U(P), n), "sendrecv", 2)
            a.dense += n
        elif name in ("ssar_split_allgather", "dsar_split_allgather"):
            a.step(P - 1, (P - 1) * _SIZE, "alltoall")
            a.step(P - 1, (P - 1) * block(k / P, n / P), "alltoall")
            a.sparse += 2 * k
            a.dense += n / P + n
            if name == "ssar_split_allgather":
                a.step(P - 1, (P - 1) * _SIZE, "allgather")
                a.step(P - 1, (P - 1) * block(U(P) / P, n / P), "sendrecv", P - 1)
                a.sparse += U(P)
            else:
                a.step(P - 1, (P - 1) * math.ceil(n / P) * bv, "allgather")
                a.dense += n
        elif name == "gtopk":
            kg = float(min(n, gtopk_k if gtopk_k is not None else k))
            a.step(P - 1, (P - 1) * _SIZE, "alltoall")
            a.step(P - 1, (P - 1) * block(k / P, n / P), "alltoall")
            a.sparse += 2 * k
            a.dense += n / P + n
            reuse, exact = _Acc(), _Acc()
            reuse.step(P - 1, (P - 1) * _GTOPK_REUSE_HEAD, "allgather")
            reuse.step(P - 1, (P - 1) * sparse_msg(kg / P), "sendrecv", P - 1)
            reuse.sparse += kg
            # estimation: distributed selection (gtopk.GlobalTopK._estimate): a head allgather, rounds of count
            # allreduces (each ~16x fewer entries left in the bracket), the bracket's entries, then as on reuse
            cap = max(64.0, kg / 16)
            rounds = max(1, math.ceil(math.log(max(U(P), cap + 1) / cap, 16)))
            exact.step(P - 1, (P - 1) * _GTOPK_EST_HEAD, "allgather")
            for _ in range(rounds):
                exact.step(2 * (P - 1), ring_allreduce_bytes(_GTOPK_SPLIT_POINTS, 8, P), "allreduce")
            exact.step(P - 1, (P - 1) * _GTOPK_COUNT, "allgather")
            exact.step(P - 1, (P - 1) * sparse_msg(cap / P), "sendrecv", P - 1)
            exact.step(P - 1, (P - 1) * _GTOPK_COUNT, "allgather")
            exact.step(P - 1, (P - 1) * sparse_msg(kg / P), "sendrecv", P - 1)
            exact.sparse += kg + cap
            w = 1.0 / max(1, threshold_interval)
            a.add(reuse, 1 - w)
            a.add(exact, w)
            wr = 1.0 / max(1, repartition_interval)
            a.step(wr * 2 * (P - 1), wr * ring_allreduce_bytes(P, 8, P), "allreduce", wr)
        out[name] = a.done(name, *args)
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
        call_latency: optional measured seconds per call of each primitive (``"allreduce"``, ``"allgather"``,
            ``"sendrecv"``, ``"alltoall"``) at ``world_size`` ranks; used instead of ``alpha`` when predicting for
            that world size (other world sizes use ``alpha``).
        world_size: the world size ``call_latency`` was measured at.
        measured: raw probe timings, for reports.
    """

    alpha: float = 20e-6
    beta: float = 8e-10
    gamma: float = 0.0
    gamma_dense: float = 0.0
    call_latency: dict | None = None
    world_size: int | None = None
    measured: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("alpha", "beta", "gamma", "gamma_dense"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or math.isinf(v):
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {v!r}")
        if self.call_latency is not None:
            if self.world_size is None:
                raise ValueError("CostModel.call_latency needs the world_size it was measured at")
            for kind in ("allreduce", "allgather", "sendrecv", "alltoall"):
                v = self.call_latency.get(kind)
                if not isinstance(v, (int, float)) or not v >= 0 or math.isinf(v):
                    raise ValueError(f"CostModel.call_latency[{kind!r}] must be seconds >= 0, got {v!r}")

    def _kw(self, world_size: int) -> dict:
        cl = self.call_latency if self.call_latency and world_size == self.world_size else None
        return dict(alpha=self.alpha, beta=self.beta, gamma=self.gamma, gamma_dense=self.gamma_dense,
                    call_latency=cl)

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
        cl = state.get("call_latency")
        self.call_latency = None if cl is None else {k: float(v) for k, v in cl.items()}
        self.world_size = state.get("world_size")
        self.measured = dict(state.get("measured", {}))
        self.__post_init__()


class AutoTuner:
    """The per-bucket choice of ``collective="auto"``: the cost model's prediction, corrected by measured times.

    An alpha-beta model fitted to allreduce timings misses fixed costs of each algorithm on a real host (its
    Python-level calls, densifying the result, merges); measured on loopback the sparse algorithms took 2-6x
    their predicted time while dense took 1.3-2x, enough to pick a collective 1.7-3x slower than the best one.
    The tuner measures instead of trusting: the first ``trials * len(plausible)`` calls of each bucket run every
    *plausible* candidate (predicted within ``explore_factor`` of the best prediction) ``trials`` times,
    interleaved; each rank keeps, per candidate, the smallest ratio of measured to predicted time (the fastest
    of the trials: warm-up and contention only add time); one allreduce averages the ratios over ranks. Once,
    candidates left out are then tried too if even their bare prediction is within ``explore_factor`` of the
    best *measured* time (the model underprices sparse collectives, so dense can be left out at first on a fast
    link); their ratios are agreed the same way. From then on the bucket uses the candidate with the smallest
    ``ratio * predicted time``. The model keeps the
    scaling with the count (a density schedule, a changing union), the ratios supply what it misses; candidates
    never tried take the largest measured ratio. Every rank calls in the same order with the same arguments and
    ends with the same ratios, so choices are identical everywhere.

    Args:
        trials: calls of each plausible candidate per bucket before choosing (0: the model alone).
        explore_factor: candidates predicted more than this many times slower than the best are not tried.
        dense_margin: a *measured* dense sum is chosen when it is at most this fraction slower than the best
            candidate (default 0.25). The trials time each bucket's exchange synchronously, but in the hook an
            uncompressed bucket runs plain DDP's allreduce, overlapped with the rest of the backward pass, and
            leaves no residual behind; neither shows in a per-bucket measurement. (Measured on loopback, P = 2,
            0.1 %, without the margin: one bucket kept allgather and the step took 1.59x plain DDP's.)
        refresh_every: after the trials, every this many calls of a bucket the ratio of each collective that ran
            is replaced by the median of its recent measured ratios (its last ``max(4, refresh_every // 2)``
            calls, which may span several periods), averaged over ranks (one small allreduce), and the choice is
            made again (0: never). Two trials per candidate are noisy; measured at 100 Mbit/s with 4 ranks on 2
            cores, a bucket once kept a collective 1.23x slower than the best without this. A runner-up whose
            estimate is within 25 % of the best runs once per period, so that it is re-measured as well.

    ``state_dict()``/``load_state_dict()`` carry the trials and the agreed ratios (a resumed run chooses as the
    uninterrupted one would).
    """

    def __init__(self, trials: int = 2, explore_factor: float = 4.0, dense_margin: float = 0.25,
                 refresh_every: int = 16):
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
            raise ValueError(f"AutoTuner: trials must be an int >= 0, got {trials!r}")
        if isinstance(explore_factor, bool) or not isinstance(explore_factor, (int, float)) or not explore_factor >= 1:
            raise ValueError(f"AutoTuner: explore_factor must be a number >= 1, got {explore_factor!r}")
        if isinstance(dense_margin, bool) or not isinstance(dense_margin, (int, float)) or not dense_margin >= 0:
            raise ValueError(f"AutoTuner: dense_margin must be a number >= 0, got {dense_margin!r}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 0:
            raise ValueError(f"AutoTuner: refresh_every must be an int >= 0, got {refresh_every!r}")
        self.trials = trials
        self.explore_factor = float(explore_factor)
        self.dense_margin = float(dense_margin)
        self.refresh_every = refresh_every
        self.explore_margin = 0.25  # a runner-up within this fraction of the best is re-measured once per refresh
        self._buckets: dict[str, dict] = {}

    @property
    def history(self) -> int:
        """Measured ratios per collective kept from one refresh to the next."""
        return max(4, self.refresh_every // 2)

    @staticmethod
    def _key(bucket) -> str:
        return ":".join(str(x) for x in bucket) if isinstance(bucket, tuple) else str(bucket)

    def tuning(self, bucket) -> bool:
        """True while ``bucket``'s trials are running (its next call will be measured)."""
        st = self._buckets.get(self._key(bucket))
        return self.trials > 0 and (st is None or st["ratios"] is None)

    def choose(self, bucket, choice: Choice, backend: Backend) -> str:
        """The collective for this call of ``bucket``, given the model's :class:`Choice` over the candidates.

        A collective call (one small allreduce) on the call after the bucket's last trial; otherwise local.
        """
        if self.trials == 0:
            return choice.algorithm
        preds = choice.predictions
        key = self._key(bucket)
        st = self._buckets.get(key)
        if st is None:
            best = min(p.time for p in preds.values())
            plausible = [a for a in preds if preds[a].time <= self.explore_factor * best] or [choice.algorithm]
            st = {"plan": [a for _ in range(self.trials) for a in plausible], "next": 0, "best": {}, "agreed": {},
                  "extended": False, "ratios": None, "calls": 0, "recent": {}}
            self._buckets[key] = st
        while st["ratios"] is None:
            if st["next"] < len(st["plan"]):
                st["next"] += 1
                return st["plan"][st["next"] - 1]
            tried = [a for a in dict.fromkeys(st["plan"]) if a not in st["agreed"]]
            local = torch.tensor([st["best"].get(a, math.nan) for a in tried], dtype=torch.float64)
            agreed = backend.allreduce(local) / backend.size
            st["agreed"].update({a: float(r) for a, r in zip(tried, agreed.tolist()) if math.isfinite(r)})
            if not st["agreed"]:  # nothing was measured (e.g. no prediction): trust the model
                st["agreed"] = {choice.algorithm: 1.0}
            # A second look, once: a candidate not tried because the model priced it far above the best
            # *prediction* is tried if even its bare prediction is within explore_factor of the best *measured*
            # time (e.g. dense, whose prediction is honest, against sparse collectives that cost far more than
            # predicted once selection and densifying are counted).
            best = min(r * preds[a].time for a, r in st["agreed"].items() if a in preds)
            extra = [a for a in preds if a not in st["agreed"] and preds[a].time <= self.explore_factor * best]
            if extra and not st["extended"]:
                st["extended"] = True
                st["plan"] += [a for _ in range(self.trials) for a in extra]
            else:
                st["ratios"] = dict(st["agreed"])
        st["calls"] = st.get("calls", 0) + 1
        if self.refresh_every and st["calls"] % self.refresh_every == 0:
            # keep measuring: the ratio of what actually ran is refreshed from its recent calls (median per rank,
            # averaged over ranks), so a choice made on a few noisy trials is corrected once it proves slower
            # than a competitor's estimate (which then runs and is refined in turn)
            names = list(preds)  # the same candidates in the same order on every rank
            recent = st["recent"]
            local = [statistics.median(recent[a]) if recent.get(a) else 0.0 for a in names]
            seen = [1.0 if recent.get(a) else 0.0 for a in names]
            both = backend.allreduce(torch.tensor(local + seen, dtype=torch.float64)).tolist()
            for a, total, n in zip(names, both[:len(names)], both[len(names):]):
                if n == backend.size:  # every rank measured it
                    st["ratios"][a] = total / n
            # each collective keeps its last few samples across periods: the runner-up runs once per period, so
            # its estimate is the median of its last runs, not one sample (one lucky call flipped the choice:
            # 41 of 138 calls at 100 Mbit/s went to a collective 8 % slower than the best)
            st["recent"] = {a: r[-self.history:] for a, r in recent.items()}
            # ... and the runner-up, if close, runs once in the next period, so that its estimate is refreshed
            # too (otherwise a competitor misjudged by its trials would never be measured again)
            tried = sorted(st["ratios"], key=lambda a: st["ratios"][a] * preds[a].time if a in preds else math.inf)
            if len(tried) > 1 and tried[1] in preds and tried[0] in preds and (
                    st["ratios"][tried[1]] * preds[tried[1]].time
                    <= (1.0 + self.explore_margin) * st["ratios"][tried[0]] * preds[tried[0]].time):
                st["explore"] = tried[1]
        if st.get("explore"):
            return st.pop("explore")
        ratios = st["ratios"]
        worst = max(ratios.values())
        order = list(preds)
        est = {a: ratios.get(a, worst) * preds[a].time for a in order}
        best = min(order, key=lambda a: (est[a], a != "dense", order.index(a)))
        if "dense" in ratios and est["dense"] <= (1.0 + self.dense_margin) * est[best]:
            return "dense"  # measured as close as makes no difference: the uncompressed, overlappable sum
        return best

    def observe(self, bucket, algorithm: str, predicted_s: float | None, measured_s: float) -> None:
        """Record one measured call of ``algorithm`` on ``bucket`` (trials, then the refresh of what runs)."""
        st = self._buckets.get(self._key(bucket))
        if st is None or predicted_s is None or not predicted_s > 0 or not math.isfinite(measured_s):
            return
        ratio = measured_s / predicted_s
        if st["ratios"] is None:
            st["best"][algorithm] = min(ratio, st["best"].get(algorithm, math.inf))
        else:
            st.setdefault("recent", {}).setdefault(algorithm, []).append(ratio)

    def ratios(self) -> dict:
        """``{bucket: {algorithm: measured/predicted}}`` for the buckets whose trials are done."""
        return {k: dict(v["ratios"]) for k, v in self._buckets.items() if v["ratios"] is not None}

    def state_dict(self) -> dict:
        return {"trials": self.trials, "explore_factor": self.explore_factor, "dense_margin": self.dense_margin,
                "refresh_every": self.refresh_every,
                "buckets": {k: {"plan": list(v["plan"]), "next": v["next"], "best": dict(v["best"]),
                                "agreed": dict(v["agreed"]), "extended": v["extended"], "calls": v.get("calls", 0),
                                "recent": {a: list(r) for a, r in v.get("recent", {}).items()},
                                "ratios": None if v["ratios"] is None else dict(v["ratios"])}
                            for k, v in self._buckets.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.trials = int(state.get("trials", self.trials))
        self.explore_factor = float(state.get("explore_factor", self.explore_factor))
        self.dense_margin = float(state.get("dense_margin", self.dense_margin))
        self.refresh_every = int(state.get("refresh_every", self.refresh_every))
        self._buckets = {k: {"plan": list(v["plan"]), "next": int(v["next"]), "best": dict(v["best"]),
                             "agreed": dict(v.get("agreed", {})), "extended": bool(v.get("extended", False)),
                             "calls": int(v.get("calls", 0)),
                             "recent": {a: list(r) for a, r in v.get("recent", {}).items()},
                             "ratios": None if v["ratios"] is None else dict(v["ratios"])}
                         for k, v in state.get("buckets", {}).items()}


def _time_allreduce(backend: Backend, t: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        backend.barrier()
        t0 = time.perf_counter()
        backend.allreduce(t)
        times.append(time.perf_counter() - t0)
    return min(times)  # contention only ever adds time: the fastest repeat is the link's cost


def probe(backend: Backend, *, sizes=(1, 2**12, 2**16, 2**20), repeats: int = 5, local_work: bool = True,
          call_latency: bool = True, device: torch.device | str | None = None) -> CostModel:
    """Measure ``alpha`` and ``beta`` (and the local-work terms) at start-up; a collective call.

    Times ``repeats`` fp32 allreduces at each of ``sizes`` elements (the fastest of each), fits
    ``t = 2(P-1) alpha + 2(P-1)/P * bytes * beta`` by least squares, times ``torch.unique`` on 65536 entries
    (``gamma``) and an add of ``2**20`` elements (``gamma_dense``), times one tiny call of each primitive
    (``call_latency``), and averages everything over ranks with an allreduce so that every rank gets the same
    model (identical choices). Every timing is the fastest of ``repeats`` (contention only adds time). The
    backend's byte counters are left as they were. About 0.1-0.5 s on loopback.

    Args:
        backend: the communicator (every rank must call).
        sizes: allreduce sizes in elements (at least two distinct).
        repeats: timings per size.
        local_work: also measure ``gamma`` and ``gamma_dense`` (else they are 0).
        call_latency: also measure the per-call cost of each primitive (for predictions at this world size).
        device: where the probe tensors live (default CPU; pass the GPU for NCCL).

    Returns:
        A :class:`CostModel`; ``measured`` holds this rank's fastest time per size (``allreduce_s``).
    """
    if len(set(sizes)) < 2 or repeats < 1:
        raise ValueError("probe() needs at least two distinct sizes and repeats >= 1")
    counters = (backend.bytes_sent, backend.bytes_received)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    P = backend.size
    alpha = beta = 0.0
    fastest = {}
    if P > 1:
        _time_allreduce(backend, torch.zeros(max(sizes), device=dev), 1)  # warm-up
        xs, ys = [], []
        for n in sizes:
            t = _time_allreduce(backend, torch.zeros(int(n), device=dev), repeats)
            fastest[int(n)] = t
            xs.append(ring_allreduce_bytes(int(n), 4, P))
            ys.append(t)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        beta = max(slope, 1e-13)
        intercept = my - beta * mx
        if intercept <= 0:  # noisy fit: take the smallest allreduce as pure latency
            intercept = min(ys)
        alpha = max(intercept / (2 * (P - 1)), 1e-8)
    gamma = gamma_dense = 0.0
    if local_work:
        g = torch.Generator().manual_seed(0)
        m = 65536
        idx = torch.randint(0, 64 * m, (2 * m,), generator=g).to(dev)
        val = torch.randn(2 * m, generator=g).to(dev)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
            torch.zeros(uniq.numel(), device=dev).index_add_(0, inv, val)
            ts.append(time.perf_counter() - t0)
        gamma = min(ts) / (2 * m)
        a = torch.ones(2**20, device=dev)
        b = torch.ones(2**20, device=dev)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            a.add_(b)
            ts.append(time.perf_counter() - t0)
        gamma_dense = min(ts) / 2**20
    calls = [0.0, 0.0, 0.0, 0.0]
    if P > 1 and call_latency:
        tiny = torch.zeros(2, device=dev)
        right, left = (backend.rank + 1) % P, (backend.rank - 1) % P
        ops = (lambda: backend.allreduce(tiny), lambda: backend.allgather(tiny),
               lambda: backend.sendrecv(tiny, right, torch.empty(2, device=dev), left),
               lambda: backend.alltoall_v([tiny[:1]] * P, [1] * P))
        for j, op in enumerate(ops):
            ts = []
            for _ in range(repeats):
                backend.barrier()
                t0 = time.perf_counter()
                op()
                ts.append(time.perf_counter() - t0)
            calls[j] = min(ts)
    params = torch.tensor([alpha, beta, gamma, gamma_dense] + calls, dtype=torch.float64, device=dev)
    if P > 1:
        backend.allreduce(params)
        params /= P
    backend.bytes_sent, backend.bytes_received = counters
    vals = [float(v) for v in params.tolist()]
    cl = dict(zip(("allreduce", "allgather", "sendrecv", "alltoall"), vals[4:])) if P > 1 and call_latency \
        else None
    return CostModel(*vals[:4], call_latency=cl, world_size=P if cl else None,
                     measured={"allreduce_s": fastest, "world_size": P})


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
