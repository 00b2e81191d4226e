"""Will sparse gradient exchange pay on this cluster? Predicted communication time per training step.

``python -m sparsedist estimate --params 124M --ranks 16 --link 25gbit`` prints, from the alpha-beta model of
:mod:`sparsedist.collectives` (:class:`~sparsedist.collectives.CostModel`, :func:`~sparsedist.collectives.predict`),
the seconds per step that one rank spends exchanging a model's gradients: dense ring allreduce (plain DDP), fp16
allreduce (PyTorch's ``fp16_compress_hook``), and every compressor with every collective at a few densities. It
then says plainly whether compression can help.

The exchange of a compressor is fixed by its wire format (:mod:`sparsedist.collectives.wire`):

* ``topk``, ``dgc``, ``variance``, ``randk`` with ``variant="wangni"``: an int32 index and a value per entry,
  through any sparse collective (allgather, SparCML's SSAR/DSAR, and for top-k and DGC Ok-Topk's global top-k);
* ``threshold`` (Strom): the packed 4-byte word (31-bit index + sign), through the allgather;
* ``randk`` (uniform, shared indices): a ring allreduce of the ``k`` values alone.

Gradients are split into DDP's buckets (``bucket_mb``, 25 MB by default), each exchanged on its own (a message
latency per bucket). Supports of different ranks are taken as independent and uniform (the model's default;
real gradients overlap more, which favours SparCML's algorithms). The selection is charged as passes over the
gradient (:data:`SELECT_PASSES`, docs/selection.md). With a compute time, the verdict accounts for overlap with
the backward pass: DDP's dense allreduce overlaps it, and so do the fixed-count exchanges (top-k and DGC through
the allgather, rand-k's values allreduce; :attr:`Row.overlap`), while variable counts (threshold, variance,
Wangni's rand-k), SparCML's algorithms and the global top-k run synchronously in the hook (docs/architecture.md).
Not modelled: the extra steps error feedback may need to reach the same loss.

``--probe`` replaces the configured link by a measured model (:func:`probe_model`: ``alpha``/``beta``, each
primitive's seconds per call at several sizes, local work at the bucket's size; a collective call under a
launcher); ``--measure`` times the same exchanges on the running process group, so the model can be checked
against the cluster (docs/estimate.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

import torch

from .collectives import Backend, CostModel, probe, sparse_allreduce
from .collectives.allgather import Allgather
from .collectives.dense import ValuesAllreduce
from .collectives.measure import mean_seconds

__all__ = ["Row", "parse_count", "parse_rate", "parse_seconds", "link_model", "probe_model", "estimate", "measure",
           "verdict", "format_rows", "format_curves", "as_dicts", "buckets", "SPARSE_COLLECTIVES", "SELECT_PASSES",
           "DEFAULT_DENSITIES", "PROBE_SIZES", "CALL_SIZES"]

#: Collectives of index-carrying payloads (the hook's ``collective=`` values besides ``"auto"`` and ``"dense"``).
SPARSE_COLLECTIVES = ("allgather", "ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather")
DEFAULT_DENSITIES = (0.001, 0.01, 0.1)
#: Passes over the gradient a selection costs (docs/selection.md, 25M fp32 on one core): top-k, DGC and threshold
#: 1.3-2.1, rand-k's shared k-subset 0.1-0.4 (the middle of each range).
SELECT_PASSES = {"indexed": 1.7, "shared": 0.25}
#: fp32 elements per timed allreduce of ``--probe`` (:func:`probe_model` caps them at the largest bucket, keeping at
#: least 4 MB): an emulated link's token bucket lets the first ~10 ms of traffic through at full speed, so small
#: messages alone would overstate the bandwidth.
PROBE_SIZES = (1, 2**12, 2**16, 2**20, 2**22)
#: fp32 elements per call of the per-primitive curves of ``--probe`` (a call of ``n`` elements moves ``(P-1)/P * 4n``
#: bytes in an allgather, a send/recv or an all-to-all, e.g. 32 kB to 8 MB at 2 ranks): from a 0.1 % row's
#: allgather up to the largest probe size, which :func:`probe_model` caps as :data:`PROBE_SIZES`.
CALL_SIZES = (2**14, 2**16, 2**18, 2**20, 2**22)
#: Seconds of timed repeats (the ranks' mean) that :func:`measure` spends at least on each row: a latency-bound
#: exchange of a few milliseconds gets up to 200 repeats, a long one ``repeats`` (``mean_seconds``).
MEASURE_BUDGET_S = 1.0
#: TCP payload per byte of link rate: 1448 payload bytes per 1514-byte Ethernet frame (IPv4, TCP timestamps).
WIRE_EFFICIENCY = 1448 / 1514

INDEXED = "topk, dgc, variance, randk-wangni"
PACKED = "threshold (packed)"
SHARED = "randk (shared indices)"

_COUNT = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
_RATE = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def parse_count(text: str | int) -> int:
    """``"124M"`` -> 124000000; ``k``, ``M``, ``B``/``G`` (powers of 1000) or a plain integer."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmbg]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"a parameter count looks like 124M, 1.5B, 350k or 124000000, got {text!r}")
    n = int(round(float(m.group(1)) * _COUNT[m.group(2).lower()]))
    if n < 1:
        raise ValueError(f"the parameter count must be >= 1, got {text!r}")
    return n


def parse_rate(text: str) -> float:
    """``"25gbit"`` -> 2.5e10 bits per second (tc's units bit, kbit, mbit, gbit, tbit; also ``Gbit/s``, ``gbps``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:bit(?:/s|ps)?|bps)\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"a link rate looks like 100mbit, 1gbit or 25gbit (bits per second, each way), got {text!r}")
    return float(m.group(1)) * _RATE[m.group(2).lower() + "bit"]


def parse_seconds(text: str | float) -> float:
    """``"20us"`` -> 2e-05; units s, ms, us, ns (a bare number is seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e-?\d+)?)\s*(s|ms|us|ns)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"a latency looks like 20us, 0.1ms or 2e-5 (seconds), got {text!r}")
    return float(m.group(1)) * _TIME[(m.group(2) or "s").lower()]


def link_model(rate_bps: float, latency_s: float = 20e-6, efficiency: float = WIRE_EFFICIENCY) -> CostModel:
    """A :class:`CostModel` for a link of ``rate_bps`` bits per second each way and ``latency_s`` per message.

    ``beta = 8 / (rate * efficiency)`` seconds per payload byte: the link rate counts Ethernet/IP/TCP headers too.
    """
    if not rate_bps > 0 or not 0 < efficiency <= 1 or latency_s < 0:
        raise ValueError(f"need rate > 0, 0 < efficiency <= 1 and latency >= 0; got {rate_bps}, {efficiency}, "
                         f"{latency_s}")
    return CostModel(alpha=latency_s, beta=8.0 / (rate_bps * efficiency))


def probe_model(backend: Backend, numel: int, *, bucket_mb: float = 25.0, repeats: int = 3,
                densities=DEFAULT_DENSITIES, ranks: int | None = None) -> CostModel:
    """The model of ``--probe``, measured on ``backend`` (a collective call: every rank, same arguments).

    :func:`sparsedist.collectives.probe` with allreduces of :data:`PROBE_SIZES` up to the largest bucket (at least
    ``2**20`` elements), each primitive's curve of seconds against bytes per call at :data:`CALL_SIZES` up to the
    same size (``call_sizes``; its largest call also gives ``call_beta``), and the local work timed at the largest
    bucket's length (``work_numel``), its curves also at the size of every local operation that :func:`estimate`
    will price for ``densities`` at ``ranks`` (default: this job's size; ``work_counts``): gloo's allgather and
    its concurrent send/recv need not reach the link rate its ring allreduce reaches, the rate a call reaches
    depends on its size, a scatter-add into a real bucket misses caches that small kernels hit, and the cost of a
    kernel need not grow smoothly with its size (docs/estimate.md).
    """
    largest = max(buckets(numel, 4, bucket_mb))
    top = min(PROBE_SIZES[-1], max(2**20, largest))
    sizes = tuple(sorted({s for s in PROBE_SIZES if s < top} | {top}))
    calls = tuple(sorted({s for s in CALL_SIZES if s < top} | {top}))
    planned: dict = {}
    for row in estimate(numel, ranks or backend.size, CostModel(), densities, bucket_mb=bucket_mb):
        for kind, _, count in row.work:
            planned.setdefault(kind, set()).add(count)
    return probe(backend, sizes=sizes, repeats=repeats, call_beta=True, work_numel=largest, call_sizes=calls,
                 work_counts={kind: sorted(ms) for kind, ms in planned.items()})


@dataclass
class Row:
    """One exchange: what is sent (``exchange``), at which ``density``, by which ``collective``.

    ``bytes``: bytes on the critical path of one rank per step; ``predicted_s`` / ``measured_s``: seconds per
    step of the exchange (all buckets); ``measured_s`` is None until :func:`measure` fills it; ``select_s``: the
    selection's seconds per step, from passes over the gradient at the host's memory bandwidth (not measured);
    ``overlap``: the hook launches this exchange asynchronously, overlapped with the backward pass, for the
    fixed-count compressors of the row (top-k and DGC through the allgather, rand-k's values allreduce; without a
    ``timeout``); every other exchange runs synchronously in the hook; ``work``: the local operations priced, over
    all buckets, ``(kind, operations, count each)`` (``Prediction.work``).
    """

    exchange: str
    density: float
    collective: str
    bytes: float
    predicted_s: float
    select_s: float = 0.0
    measured_s: float | None = None
    overlap: bool = False
    work: tuple = ()


def buckets(numel: int, value_bytes: int = 4, bucket_mb: float = 25.0) -> list[int]:
    """DDP-like bucket lengths (elements): full buckets of ``bucket_mb`` megabytes, then the rest."""
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    cap = max(1, int(bucket_mb * 2**20 / value_bytes))
    return [cap] * (numel // cap) + ([numel % cap] if numel % cap else [])


def _count(n: int, density: float) -> int:
    return min(n, max(1, math.ceil(density * n)))


def _sum(parts: list[int], fn) -> dict:
    """Add ``fn(bucket) -> Prediction`` over the buckets: ``Row`` fields bytes, predicted_s and work."""
    preds = [fn(b) for b in parts]
    return dict(bytes=sum(p.bytes for p in preds), predicted_s=sum(p.time for p in preds),
                work=tuple(op for p in preds for op in p.work))


def estimate(numel: int, world_size: int, model: CostModel, densities=DEFAULT_DENSITIES, *,
             bucket_mb: float = 25.0, gtopk: bool = True, memory_gbps: float = 4.0) -> list[Row]:
    """Predicted exchange time per step for dense, fp16 and every compressor/collective at ``densities``.

    Args:
        numel: gradient elements (fp32 parameters) per rank.
        world_size: ranks ``P``.
        model: link parameters (:func:`link_model`, or :func:`sparsedist.collectives.probe`).
        densities: fractions of elements each rank sends.
        bucket_mb: DDP's bucket size in megabytes (of fp32 gradients).
        gtopk: include Ok-Topk's global top-k (top-k and DGC only).
        memory_gbps: bytes per nanosecond one pass over the gradient runs at (read 4 + write 4 bytes per
            element), for the selection cost: 4 is one CPU core here (``x.abs()`` of 25M fp32 in 58 ms), a GPU
            is hundreds of times faster. Selection takes :data:`SELECT_PASSES` passes (docs/selection.md).

    Returns:
        :class:`Row` list: dense and fp16 first, then per density the index-carrying collectives, the packed
        threshold allgather and rand-k's values-only allreduce.
    """
    if numel < 1 or world_size < 1:
        raise ValueError(f"need numel >= 1 and world_size >= 1, got {numel} and {world_size}")
    if not densities or any(not 0 < d <= 1 for d in densities):
        raise ValueError(f"densities must be fractions in (0, 1], got {list(densities)}")
    if not memory_gbps > 0:
        raise ValueError(f"memory_gbps must be > 0, got {memory_gbps}")
    parts = buckets(numel, 4, bucket_mb)
    P = world_size
    one_pass = numel * 8 / (memory_gbps * 1e9)

    def dense(b: int, vb: int):
        return model.predict(b, b, P, value_bytes=vb, algorithms=("dense",))["dense"]

    def shared(b: int, k: int):  # the allreduce of k values, then their scatter into the zeroed bucket
        pred = dense(k, 4)
        return replace(pred, time=pred.time + model.work_seconds("sparse", k) + model.work_seconds("dense", b),
                       work=pred.work + (("sparse", 1.0, float(k)), ("dense", 1.0, float(b))))

    rows = [Row("dense allreduce (DDP)", 1.0, "ring allreduce", **_sum(parts, lambda b: dense(b, 4))),
            Row("fp16 allreduce", 1.0, "ring allreduce", **_sum(parts, lambda b: dense(b, 2)))]
    names = SPARSE_COLLECTIVES + (("gtopk",) if gtopk else ())
    for d in densities:
        for name in names:
            rows.append(Row(INDEXED if name != "gtopk" else "topk, dgc", d, name, **_sum(
                parts, lambda b: model.predict(b, _count(b, d), P, value_bytes=4, algorithms=(name,))[name]),
                select_s=SELECT_PASSES["indexed"] * one_pass, overlap=name == "allgather"))
        rows.append(Row(PACKED, d, "allgather", **_sum(parts, lambda b: model.predict(
            b, _count(b, d), P, value_bytes=4, index_bytes=0, algorithms=("allgather",))["allgather"]),
            select_s=SELECT_PASSES["indexed"] * one_pass))
        rows.append(Row(SHARED, d, "values allreduce", **_sum(parts, lambda b: shared(b, _count(b, d))),
                        select_s=SELECT_PASSES["shared"] * one_pass, overlap=True))
    return rows


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms:,.0f} ms"


def verdict(rows: list[Row], compute_s: float | None = None, margin: float = 0.1) -> str:
    """A plain sentence: does the fastest sparse exchange, selection included, beat dense allreduce (or fp16) by
    more than ``margin``?

    With ``compute_s`` (forward + backward + optimizer seconds per step) the comparison is per step. DDP overlaps
    its allreduce with the backward pass, so a dense step takes between ``max(compute, comm)`` and
    ``compute + comm``. A sparse step adds the selection to the computation (the hook selects on the autograd
    thread); an overlapped exchange (:attr:`Row.overlap`) then takes between ``max(compute + selection,
    exchange)`` and ``compute + selection + exchange``, a synchronous one ``compute + selection + exchange``.
    Compression pays when the sparse step without overlap beats the dense step with it; it may pay when the sparse
    step at its best beats the dense step at its worst.
    """
    dense, fp16 = rows[0], rows[1]
    best = min(rows[2:], key=lambda r: r.predicted_s + r.select_s)
    cost = best.predicted_s + best.select_s
    baseline = min(dense.predicted_s, fp16.predicted_s)
    what = f"{best.exchange} at density {best.density:g} by {best.collective}"
    if best.exchange == SHARED:
        indexed = min((r for r in rows[2:] if r.exchange != SHARED), key=lambda r: r.predicted_s + r.select_s)
        what += (f" (rand-k converges more slowly than top-k, docs/paper_claims.md; the fastest top-k-style "
                 f"exchange: {indexed.exchange} at density {indexed.density:g} by {indexed.collective}, "
                 f"{_ms(indexed.predicted_s + indexed.select_s)} with selection)")
    spent = f"{_ms(cost)} per step ({_ms(best.predicted_s)} exchange + {_ms(best.select_s)} selection)"
    if compute_s is None:
        if cost < (1 - margin) * baseline:
            return (f"Compression can pay: {what} needs {spent}, {dense.predicted_s / cost:.1f}x less than dense "
                    f"allreduce ({_ms(dense.predicted_s)}) and {fp16.predicted_s / cost:.1f}x less than fp16 "
                    f"({_ms(fp16.predicted_s)}) -- before the extra steps error feedback may need.")
        return (f"Compression will not help: the fastest sparse exchange, {what}, needs {spent}, not "
                f"{margin:.0%} less than dense allreduce ({_ms(dense.predicted_s)}) or fp16 "
                f"({_ms(fp16.predicted_s)}). Use plain DDP (or fp16_compress_hook).")
    overlapped, serial = max(compute_s, baseline), compute_s + baseline
    worst = compute_s + cost
    best_case = max(compute_s + best.select_s, best.predicted_s) if best.overlap else worst
    sparse = (f"{what} {_ms(best_case)} to {_ms(worst)} (with/without overlap)" if best.overlap else
              f"{what} at least {_ms(worst)} (synchronous in the hook)")
    head = f"Per step: dense DDP {_ms(overlapped)} to {_ms(serial)} (with/without overlap), {sparse}. "
    if worst < (1 - margin) * overlapped:
        return head + f"Compression pays: at least {overlapped / worst:.2f}x faster steps."
    if best_case < (1 - margin) * serial:
        if best.overlap:
            return head + ("Compression may pay, depending on how much of each exchange hides behind the backward "
                           "pass: time a few steps of both.")
        return head + ("Compression may pay, if DDP's allreduce overlaps little with the backward pass; "
                       "collective='auto' with its whole-step check measures which.")
    return head + "Compression will not help: the step is bound by computation. Use plain DDP."


def measure(rows: list[Row], numel: int, backend: Backend, *, repeats: int = 3, bucket_mb: float = 25.0,
            seed: int = 0) -> list[Row]:
    """Time each row's exchange on ``backend`` (every rank must call, with the same arguments); fills
    ``measured_s`` with the mean seconds of the whole step (all buckets), averaged over ranks: at least
    ``repeats`` timings, more until :data:`MEASURE_BUDGET_S` (the mean, because that is what adds up over a
    run's steps; :func:`~sparsedist.collectives.measure.mean_seconds`).

    Each row runs the code the hook runs for it, local work included, and sums into a bucket-long vector made
    once per bucket size, as the hook sums into its bucket buffer (``out=``): dense and fp16 a
    ``Backend.allreduce`` of the bucket; the index-carrying rows :func:`sparsedist.collectives.sparse_allreduce`
    with each rank's own random ``k``-subset; the packed threshold row the hook's allgather of Strom's 4-byte
    words (sizes first, then decode and scatter-add); rand-k the values allreduce of a ``k``-subset shared by
    all ranks, scattered into the zeroed bucket. ``gtopk`` is not measured.
    """
    parts = buckets(numel, 4, bucket_mb)
    g = torch.Generator().manual_seed(seed * 1000 + backend.rank)
    common = torch.Generator().manual_seed(seed * 1000 - 1)  # the same on every rank
    supports: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = {}  # made before any clock runs
    shared_idx: dict[tuple[int, float], torch.Tensor] = {}
    for d in {r.density for r in rows}:
        for b in set(parts):
            k = _count(b, d)
            supports[b, d] = torch.randperm(b, generator=g)[:k], torch.randn(k, generator=g)
            shared_idx[b, d] = torch.randperm(b, generator=common)[:k]
    into = {b: torch.zeros(b) for b in set(parts)}  # the bucket buffers (sums of zeros stay zero)
    half = {b: torch.zeros(b, dtype=torch.float16) for b in set(parts)}

    def run(row: Row) -> None:
        for b in parts:
            if row.exchange.startswith("dense"):
                backend.allreduce(into[b])
            elif row.exchange.startswith("fp16"):
                backend.allreduce(half[b])
            elif row.exchange == SHARED:
                ValuesAllreduce().reduce(shared_idx[b, row.density], supports[b, row.density][1], b, backend,
                                         out=into[b])
            elif row.exchange == PACKED:
                Allgather().reduce(*supports[b, row.density], b, backend, constant=1.0, out=into[b])
            else:
                sparse_allreduce(*supports[b, row.density], b, algorithm=row.collective, backend=backend,
                                 out=into[b])

    for row in rows:
        if row.collective == "gtopk" or backend.size == 1:
            continue
        run(row)  # warm-up: connections, allocations
        seconds = torch.tensor([mean_seconds(backend, lambda: run(row), repeats, MEASURE_BUDGET_S)],
                               dtype=torch.float64)
        row.measured_s = float(backend.allreduce(seconds)) / backend.size
    return rows


def format_curves(model: CostModel) -> str:
    """The curves of a probed model as text: per primitive (``model.call_curve``), milliseconds per call at each
    measured size (bytes as the cost formulas count them); per kind of local work (``model.work_curve``),
    milliseconds per operation at each measured count (entries; elements for ``dense``, per pass). Empty without
    curves. These, and not ``call_beta`` or the gammas, price every call and every local operation."""
    lines = []
    if model.call_curve:
        lines.append(f"ms per call at {model.world_size} ranks (interpolated between sizes):")
        for kind, pts in model.call_curve.items():
            lines.append(f"  {kind:<9} " + "  ".join(f"{_size(b)} {t * 1e3:.3g}" for b, t in pts))
    if model.work_curve:
        lines.append("ms per local operation (entries; dense: elements per pass):")
        for kind, pts in model.work_curve.items():
            lines.append(f"  {kind:<9} " + "  ".join(f"{m:.0f} {t * 1e3:.3g}" for m, t in pts))
    return "\n".join(lines)


def _size(nbytes: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def format_rows(rows: list[Row]) -> str:
    """A plain-text table (milliseconds, megabytes), with measured/predicted where measured."""
    measured = any(r.measured_s is not None for r in rows)
    head = f"{'exchange':<34} {'density':>8} {'collective':<22} {'MB/rank':>9} {'exchange ms':>12} {'select ms':>10}"
    head += f" {'measured ms':>12} {'meas/pred':>9}" if measured else f" {'vs dense':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r.exchange:<34} {r.density:>8.4g} {r.collective:<22} {r.bytes / 1e6:>9.3f} "
                f"{r.predicted_s * 1e3:>12.3f} {r.select_s * 1e3:>10.3f}")
        if measured:
            m = r.measured_s
            line += f" {m * 1e3:>12.3f} {m / r.predicted_s:>9.2f}" if m is not None else f" {'-':>12} {'-':>9}"
        else:
            line += f" {rows[0].predicted_s / (r.predicted_s + r.select_s):>8.2f}x"
        lines.append(line)
    return "\n".join(lines)


def as_dicts(rows: list[Row]) -> list[dict]:
    """Rows as plain dicts (for JSON)."""
    return [asdict(r) for r in rows]
