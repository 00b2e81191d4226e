"""Measure the cost model's parameters on the running job: link latency and bandwidth, local work, per-call costs.

Two kinds of timing. The link's ``alpha``/``beta`` fit and the per-call latencies take the fastest of their
repeats (contention only ever adds time; at the first step of a ``collective="auto"`` job the probe must be
cheap and stable). The optional per-primitive curves and bandwidths (``call_sizes``, ``call_beta``) and the local
work at a real bucket's size (``work_numel``) take the mean (:func:`mean_seconds`), as
``sparsedist.estimate.measure`` does for a whole exchange: they are meant to predict what a step costs on average
on this host, load included, and the times of a step's calls add up.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from .allgather import scatter_add
from .backend import Backend, ring_allreduce_bytes
from .base import WORK_KINDS
from .choose import PRIMITIVES, CostModel
from .streams import coalesce
from .wire import decode, encode

__all__ = ["probe", "mean_seconds", "WORK_DENSITY", "CALL_BUDGET_S", "WORK_BUDGET_S"]

#: Entries per element of the decode and scatter-add that ``probe(work_numel=n)`` times: 10 % of ``n``, the densest
#: of the default densities of ``python -m sparsedist estimate`` (where local work is largest).
WORK_DENSITY = 0.1
#: Seconds of timed calls (the ranks' mean) that :func:`probe` spends at least on each point of a per-primitive
#: curve (at most 200 calls): small calls are cheap and their latency varies most (:func:`mean_seconds`).
CALL_BUDGET_S = 0.25
#: Seconds of timed operations that :func:`probe` spends at least on each point of a local-work curve (at most 200).
WORK_BUDGET_S = 0.02


def _times(backend: Backend | None, op, repeats: int, before=None) -> list[float]:
    """Seconds of ``repeats`` calls of ``op``, each started together on every rank (a barrier first), each after
    an untimed call of ``before`` (if given)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        if backend is not None:
            backend.barrier()
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return times


def mean_seconds(backend: Backend | None, op, repeats: int, budget_s: float = 0.0, max_repeats: int = 200,
                 device: torch.device | str | None = None, before=None) -> float:
    """Mean seconds of one call of ``op`` on this rank, each call started together on every rank (a barrier first).

    At least ``repeats`` calls, then further rounds of ``repeats`` while the calls so far took less than
    ``budget_s`` in total (the ranks' mean, agreed by an allreduce, so every rank makes the same number of calls)
    and fewer than ``max_repeats`` were made. The mean and not the median: the times of a step's calls add up, and
    so do their means, not their medians. A call's latency can be a mixture of modes -- on a host whose scheduler
    wakes a waiting thread at the next tick, a 0.3 ms call takes 4 ms in a good share of calls -- whose median
    jumps from one mode to the other between runs while the mean moves with the share. ``device``: where the
    ranks' agreement tensor lives (the backend's device, e.g. the GPU for NCCL; default CPU). ``before``: called,
    untimed, before each call (e.g. to put its operands in the state an exchange leaves them in).
    """
    times = _times(backend, op, repeats, before)
    while budget_s > 0 and len(times) < max_repeats:
        spent = sum(times)
        if backend is not None and backend.size > 1:  # every rank decides alike, or the collectives deadlock
            total = torch.tensor([spent], dtype=torch.float64, device=device)
            spent = float(backend.allreduce(total)) / backend.size
        if spent >= budget_s:
            break
        times += _times(backend, op, repeats, before)
    return statistics.fmean(times)


def _fit_link(backend: Backend, sizes, repeats: int, dev) -> tuple[float, float, dict]:
    """``alpha``, ``beta`` from the fastest allreduce at each size, fitted to ``2(P-1) alpha + bytes * beta``."""
    P = backend.size
    _times(backend, lambda: backend.allreduce(torch.zeros(max(sizes), device=dev)), 1)  # warm-up
    xs, ys, fastest = [], [], {}
    for n in sizes:
        t = torch.zeros(int(n), device=dev)
        fastest[int(n)] = min(_times(backend, lambda: backend.allreduce(t), repeats))
        xs.append(ring_allreduce_bytes(int(n), 4, P))
        ys.append(fastest[int(n)])
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    beta = max(slope, 1e-13)
    intercept = my - beta * mx
    if intercept <= 0:  # noisy fit: take the smallest allreduce as pure latency
        intercept = min(ys)
    return max(intercept / (2 * (P - 1)), 1e-8), beta, fastest


def _primitives(backend: Backend, numel: int, dev) -> dict:
    """One call of each primitive kind moving about ``numel`` fp32 elements: ``{kind: (op, modelled bytes)}``.

    Bytes as the cost formulas count them: ring allreduce ``2(P-1)/P * 4n``; the allgather, the send/recv (one
    direction of a concurrent exchange with the neighbours) and the alltoall ``(P-1)/P * 4n`` each.
    """
    P = backend.size
    right, left = (backend.rank + 1) % P, (backend.rank - 1) % P
    part = max(1, numel // P)
    ar, ag = torch.zeros(numel, device=dev), torch.zeros(part, device=dev)
    sr, rv = torch.zeros(part * (P - 1), device=dev), torch.empty(part * (P - 1), device=dev)
    return {"allreduce": (lambda: backend.allreduce(ar), ring_allreduce_bytes(numel, 4, P)),
            "allgather": (lambda: backend.allgather(ag), (P - 1) * part * 4),
            "sendrecv": (lambda: backend.sendrecv(sr, right, rv, left), (P - 1) * part * 4),
            "alltoall": (lambda: backend.alltoall_v([ag] * P, [part] * P), (P - 1) * part * 4)}


def _sized_calls(backend: Backend, numels, repeats: int, dev) -> dict:
    """Mean seconds of one call of each primitive kind at each of ``numels`` fp32 elements (as
    :func:`_primitives` moves them), after a warm-up call: ``{numel: [(modelled bytes, seconds) per kind]}``.
    At least ``repeats`` timings each, more until :data:`CALL_BUDGET_S` (:func:`mean_seconds`)."""
    out = {}
    for n in numels:
        row = []
        for op, b in _primitives(backend, int(n), dev).values():
            _times(backend, op, 1)  # warm-up
            row.append((b, mean_seconds(backend, op, repeats, CALL_BUDGET_S, device=dev)))
        out[int(n)] = row
    return out


def _isotonic(ys: list[float]) -> list[float]:
    """The non-decreasing sequence closest to ``ys`` in least squares (pool adjacent violators): a larger call
    never costs less, and one noisy point is averaged with its neighbours instead of lifting every later point."""
    blocks = []  # [mean, count]
    for y in ys:
        blocks.append([y, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [m for m, c in blocks for _ in range(c)]


def _curves(sized: dict, times: list[float]) -> dict:
    """``{kind: ((bytes, seconds), ...)}`` from :func:`_sized_calls`' bytes and the rank-averaged ``times`` (in
    the same order), made non-decreasing (:func:`_isotonic`); a point with no more bytes than the previous (tiny
    calls at many ranks) is dropped."""
    curves = {}
    for j, kind in enumerate(PRIMITIVES):
        pts = []
        for i, row in enumerate(sized.values()):
            if not pts or row[j][0] > pts[-1][0]:
                pts.append((float(row[j][0]), times[i * len(PRIMITIVES) + j]))
        curves[kind] = tuple(zip([b for b, _ in pts], _isotonic([t for _, t in pts])))
    return curves


def _synced(op, dev: torch.device):
    """``op`` followed by waiting for ``dev`` (an accelerator runs kernels asynchronously: without the wait, a
    timer sees their launch only); ``op`` itself on the CPU."""
    if dev.type == "cpu":
        return op

    def run():
        op()
        torch.accelerator.synchronize(dev)
    return run


def _local_work(work_numel: int | None, repeats: int, dev) -> tuple[float, float, float]:
    """``gamma`` (s per sparse entry), ``gamma_dense`` (s per dense element) and ``gamma_sort`` (s per entry
    sorted; only with ``work_numel``, else 0).

    Without ``work_numel``: ``torch.unique`` and a scatter-add of 131072 entries, an add of ``2**20`` elements, the
    fastest of 3 (small kernels, mostly in cache). With it: the kernels of a sparse sum at that size, the mean
    of ``3 * repeats`` after two warm-up calls -- what the allgather does per received entry: decode a payload of
    ``WORK_DENSITY * work_numel`` distinct random positions (int32 index + fp32 value) and scatter-add it into a
    fresh zeroed vector of ``work_numel``; a zero-fill plus an add of ``work_numel`` elements (two dense passes);
    and the coalescing of the same number of unsorted positions into a sorted stream (what SparCML's algorithms do
    with their input first: :func:`~sparsedist.collectives.streams.coalesce`).
    """
    g = torch.Generator().manual_seed(0)
    if work_numel is None:
        m = 65536
        idx = torch.randint(0, 64 * m, (2 * m,), generator=g).to(dev)
        val = torch.randn(2 * m, generator=g).to(dev)

        def sparse():
            uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
            torch.zeros(uniq.numel(), device=dev).index_add_(0, inv, val)

        a, b = torch.ones(2**20, device=dev), torch.ones(2**20, device=dev)
        return (min(_times(None, _synced(sparse, dev), 3)) / (2 * m),
                min(_times(None, _synced(lambda: a.add_(b), dev), 3)) / 2**20, 0.0)
    n = int(work_numel)
    m = max(1, int(WORK_DENSITY * n))
    idx, val = torch.randperm(n, generator=g)[:m].to(dev), torch.randn(m, generator=g).to(dev)
    payload = encode(idx, val, torch.float32)
    ones = torch.ones(n, device=dev)
    r = 3 * repeats + 2  # cheap kernels, noisy on a loaded host: many timings, the first two warm up
    sparse = _times(None, _synced(lambda: scatter_add(torch.zeros(n, device=dev), *decode(payload, torch.float32)),
                                  dev), r)[2:]
    dense = _times(None, _synced(lambda: torch.zeros(n, device=dev).add_(ones), dev), r)[2:]
    sort = _times(None, _synced(lambda: coalesce(idx, val), dev), r)[2:]
    return statistics.fmean(sparse) / m, statistics.fmean(dense) / (2 * n), statistics.fmean(sort) / m


def _work_curves(work_numel: int, repeats: int, dev, extra: dict | None = None) -> tuple[dict, list[float]]:
    """Mean seconds of one local operation of each kind of :data:`~.base.WORK_KINDS` at several sizes, after two
    warm-ups, at least ``3 * repeats`` timings each and more until :data:`WORK_BUDGET_S`: ``({kind: counts},
    seconds in the same order)``. ``extra``: ``{kind: counts}`` timed too (rounded to whole entries), e.g. the
    operations a prediction will price, so that they are read off the curve exactly.

    The operations work where an exchange works, on vectors of the bucket's length made once (the hook sums into
    its bucket buffer, not into a fresh vector). ``"sparse"``: decode a payload of ``m`` random positions (int32
    index, fp32 value; distinct where the vector has room) and add it into a vector of ``work_numel``, zeroed
    (untimed) before each timing, as every exchange zeroes the vector it then adds into; ``"packed"``: the same with
    Strom's 4-byte words; ``"sort"``: coalesce ``m`` unsorted positions into a sorted stream; for ``m`` from
    ``WORK_DENSITY * work_numel`` (at least 64) down by factors of 4 while at least 64, and 16. ``"dense"``: a
    zero-fill plus an add of ``m`` elements of such a vector (per pass, half of it), for ``m`` from ``work_numel``
    (at least 64) down by factors of 4 while at least 4096, and 16. The smallest operations time what a kernel
    costs however few its entries. The times are kept as measured, not made non-decreasing: a larger operation can
    cost less (PyTorch's CPU sort switches to a radix sort at 32768 int64 entries: coalescing 25000 entries took
    1.2 ms here, 41943 0.55 ms).
    """
    g = torch.Generator().manual_seed(1)
    n = int(work_numel)
    top, dense_top = max(64, int(WORK_DENSITY * n)), max(64, n)
    grid = {kind: {16} | {top >> (2 * j) for j in range(16) if top >> (2 * j) >= 64} for kind in WORK_KINDS}
    grid["dense"] = {16, dense_top} | {dense_top >> (2 * j) for j in range(16) if dense_top >> (2 * j) >= 4096}
    for kind, ms in (extra or {}).items():
        grid[kind] |= {max(1, round(m)) for m in ms}
    pool = max(max(grid[kind]) for kind in WORK_KINDS if kind != "dense")
    pos = torch.randperm(n, generator=g)[:pool] if pool <= n else torch.randint(0, n, (pool,), generator=g)
    perm, vals = pos.to(dev), torch.randn(pool, generator=g).to(dev)
    out, ones = torch.zeros(max(grid["dense"]), device=dev), torch.ones(max(grid["dense"]), device=dev)  # >= n

    def payload_op(m, constant):
        buf = encode(perm[:m], vals[:m], torch.float32, constant)
        return lambda: scatter_add(out, *decode(buf, torch.float32, constant))

    makers = {"sparse": lambda m: payload_op(m, None), "packed": lambda m: payload_op(m, 1.0),
              "sort": lambda m: lambda: coalesce(perm[:m], vals[:m]),
              "dense": lambda m: lambda: out[:m].zero_().add_(ones[:m])}
    zero_out = _synced(out.zero_, dev)
    counts, seconds = {}, []
    for kind in WORK_KINDS:
        counts[kind] = sorted(grid[kind])
        before = zero_out if kind in ("sparse", "packed") else None
        for m in counts[kind]:
            op = _synced(makers[kind](m), dev)
            _times(None, op, 2, before)  # warm-up
            t = mean_seconds(None, op, 3 * repeats, WORK_BUDGET_S, before=before)
            seconds.append(t / 2 if kind == "dense" else t)
    return counts, seconds


def probe(backend: Backend, *, sizes=(1, 2**12, 2**16, 2**20), repeats: int = 5, local_work: bool = True,
          call_latency: bool = True, call_beta: bool = False, work_numel: int | None = None,
          call_sizes=None, device: torch.device | str | None = None, work_counts: dict | None = None) -> CostModel:
    """Measure ``alpha`` and ``beta`` (and the local-work terms) at start-up; a collective call.

    Times ``repeats`` fp32 allreduces at each of ``sizes`` elements (the fastest of each), fits
    ``t = 2(P-1) alpha + 2(P-1)/P * bytes * beta`` by least squares, times ``torch.unique`` on 131072 entries
    (``gamma``) and an add of ``2**20`` elements (``gamma_dense``), times one tiny call of each primitive
    (``call_latency``), and averages everything over ranks with an allreduce so that every rank gets the same
    model (identical choices). These timings are the fastest of ``repeats`` (contention only adds time). The
    backend's byte counters are left as they were. About 0.1-0.5 s on loopback.

    Two optional measurements make the model predict a real exchange more closely (``python -m sparsedist
    estimate --probe`` asks for both; each costs a few calls at ``max(sizes)``, seconds on a slow link):

    * ``call_beta``: one call of each primitive moving about ``max(sizes)`` fp32 elements, the mean of
      ``repeats``; seconds per byte of each kind (the tiny call's latency subtracted), which the model then uses
      instead of ``beta`` at this world size. gloo's allgather and its concurrent send/recv and all-to-all need
      not reach the link rate its ring allreduce reaches (docs/estimate.md).
    * ``work_numel``: ``gamma`` and ``gamma_dense`` timed on kernels of that size (a real bucket's length), the
      mean of ``3 * repeats``, instead of the small kernels: the allgather's decode and scatter-add of received
      entries into a vector of 16 MB misses the caches that the small kernels hit. Also ``gamma_sort``: the
      coalescing sort of as many unsorted positions, which SparCML's algorithms do with their input first (and
      which no other term prices; 0 without ``work_numel``). And ``work_curve``: each kind of local work timed
      at sizes from a few entries to that size (:func:`_work_curves`), which then prices every local operation
      at its own size: an operation on a few thousand entries costs more than its entries at the rate of a
      large one (its kernels' launches and Python), on a GPU by far.
    * ``call_sizes``: each primitive timed at each of these sizes (fp32 elements, as the tiny call and
      ``call_beta`` move them), the mean of at least ``repeats`` and until :data:`CALL_BUDGET_S`
      (:func:`mean_seconds`), and at 2 elements: a
      curve of seconds against bytes per call for each kind (``CostModel.call_curve``), which then prices every
      call at its own size. On a TCP link the rate depends on the size: an allgather or a send/recv of 0.1-0.5 MB
      reached the link rate, one of 8 MB 0.55-0.8 of it (docs/estimate.md), which neither one ``call_beta`` nor
      one line through all sizes describes.

    Args:
        backend: the communicator (every rank must call).
        sizes: allreduce sizes in elements (at least two distinct).
        repeats: timings per size.
        local_work: also measure ``gamma`` and ``gamma_dense`` (else they are 0).
        call_latency: also measure the per-call cost of each primitive (for predictions at this world size).
        call_beta: also measure each primitive's seconds per byte (implies the per-call latencies).
        work_numel: elements of the local-work kernels (default None: the small kernels).
        call_sizes: elements of the calls of the per-primitive curves (default None: no curves).
        work_counts: with ``work_numel``, ``{kind: counts}`` of local operations to time besides the curves' own
            sizes (e.g. every operation a prediction will price: ``Prediction.work``), so that they are read off
            the curve exactly instead of interpolated.
        device: where the probe tensors live (default CPU; pass the GPU for NCCL).

    Returns:
        A :class:`CostModel`; ``measured`` holds this rank's fastest time per size (``allreduce_s``) and, with
        ``call_beta``, each primitive's modelled bytes and mean seconds (``call_s``), averaged over ranks;
        with ``call_sizes``, ``call_curve`` the curves; with ``work_numel``, ``work_curve`` the local-work curves.
    """
    if len(set(sizes)) < 2 or repeats < 1:
        raise ValueError("probe() needs at least two distinct sizes and repeats >= 1")
    if work_numel is not None and (isinstance(work_numel, bool) or not isinstance(work_numel, int)
                                   or work_numel < 1):
        raise ValueError(f"probe(work_numel=...) must be a positive int (a bucket's elements), got {work_numel!r}")
    if call_sizes is not None and (not call_sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                         for n in call_sizes)):
        raise ValueError(f"probe(call_sizes=...) must be positive ints (elements per call), got {call_sizes!r}")
    if work_counts is not None and (not isinstance(work_counts, dict) or set(work_counts) - set(WORK_KINDS) or any(
            isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0 or not math.isfinite(m)
            for ms in work_counts.values() for m in ms)):
        raise ValueError(f"probe(work_counts=...) must map kinds of {WORK_KINDS} to positive counts, got "
                         f"{work_counts!r}")
    counters = (backend.bytes_sent, backend.bytes_received)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    P = backend.size
    alpha = beta = 0.0
    fastest = {}
    if P > 1:
        alpha, beta, fastest = _fit_link(backend, sizes, repeats, dev)
    gamma, gamma_dense, gamma_sort = _local_work(work_numel, repeats, dev) if local_work else (0.0, 0.0, 0.0)
    timed_counts, work_t = _work_curves(work_numel, repeats, dev, work_counts) if local_work and work_numel \
        else ({}, [])
    per_call = P > 1 and (call_latency or call_beta)
    calls = [0.0] * len(PRIMITIVES)
    if per_call:
        for j, (op, _) in enumerate(_primitives(backend, 2, dev).values()):
            calls[j] = min(_times(backend, op, repeats))
    sized = _sized_calls(backend, (2,) + tuple(sorted(set(call_sizes))), repeats, dev) \
        if P > 1 and call_sizes else {}
    big = [0.0] * len(PRIMITIVES)
    nbytes = [0] * len(PRIMITIVES)
    if P > 1 and call_beta:
        if int(max(sizes)) in sized:  # the curve's call at that size serves call_beta too
            nbytes, big = (list(x) for x in zip(*sized[int(max(sizes))]))
        else:
            for j, (op, b) in enumerate(_primitives(backend, int(max(sizes)), dev).values()):
                _times(backend, op, 1)  # warm-up
                big[j] = mean_seconds(backend, op, repeats)
                nbytes[j] = b
    curve_t = [t for row in sized.values() for _, t in row]
    params = torch.tensor([alpha, beta, gamma, gamma_dense] + calls + big + [gamma_sort] + curve_t + work_t,
                          dtype=torch.float64, device=dev)
    if P > 1:
        backend.allreduce(params)
        params /= P
    backend.bytes_sent, backend.bytes_received = counters
    vals = [float(v) for v in params.tolist()]
    cl = dict(zip(PRIMITIVES, vals[4:8])) if per_call else None
    measured = {"allreduce_s": fastest, "world_size": P}
    cb = None
    if P > 1 and call_beta:
        measured["call_s"] = {kind: (nbytes[j], vals[8 + j]) for j, kind in enumerate(PRIMITIVES)}
        cb = {kind: max(vals[8 + j] - cl[kind], 0.0) / nbytes[j] for j, kind in enumerate(PRIMITIVES)}
    cc = _curves(sized, vals[13:13 + len(curve_t)]) if sized else None
    if cc:
        measured["call_curve"] = cc
    wc, at = {}, 13 + len(curve_t)
    for kind, ms in timed_counts.items():  # averaged over ranks; as measured (a larger operation can cost less)
        wc[kind] = tuple(zip(map(float, ms), vals[at:at + len(ms)]))
        at += len(ms)
    return CostModel(*vals[:4], call_latency=cl, world_size=P if per_call or cc else None, measured=measured,
                     call_beta=cb, call_curve=cc, gamma_sort=vals[12], work_curve=wc or None)
