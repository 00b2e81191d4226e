"""SparCML sparse allreduce (Renggli, Ashkboos, Aghagolzadeh, Alistarh & Hoefler, SC19).

Every rank holds a sparse vector of length ``numel``; the result on every rank is the dense sum. The vectors
travel as *sparse streams*: sorted ``(index, value)`` pairs that switch to a dense array once
``nnz > dense_threshold * length``. The default threshold, ``value_bytes / (index_bytes + value_bytes)``, is
the paper's delta: the point where the sparse encoding of a block outgrows its dense encoding (1/2 for
int32 indices and fp32 values, 1/3 for fp16/bf16 values).

Algorithms (all exact, at any world size ``P``, any count per rank, zero included):

* :func:`ssar_recursive_double` -- latency-bound regime. ``log2 P'`` rounds (``P'`` the largest power of two
  <= ``P``); in round ``r`` rank ``i`` exchanges its current stream with rank ``i XOR 2**r`` and merges. The
  stream grows by fill-in and goes dense when it passes the threshold. For ``P != P'`` the extra ranks
  ``P' .. P-1`` first fold their stream into rank ``i - P'`` and get the result back last.
* :func:`ssar_split_allgather` -- bandwidth-bound regime. The index space is cut into ``P`` contiguous ranges;
  each rank sends the part of its stream in range ``j`` to rank ``j`` (one ``alltoall_v``), the owner sums what
  it received, and the reduced ranges are allgathered (a ring allgatherv) as sparse (or, past the threshold,
  dense) blocks.
* :func:`dsar_split_allgather` -- the same first phase; the second phase allgathers the reduced ranges dense.

Every rank issues the same primitives in the same order: payload sizes are exchanged before payloads, so an
empty rank sends zero bytes but never skips a call. All results are bitwise identical on every rank: merges
of two streams are ordered by rank, multi-way sums run in rank order, and fp16/bf16 values are summed in fp32
and rounded to the values' dtype after every merge (what a rank keeps is exactly what its partner received).

The code talks only to a :class:`~sparsedist.collectives.backend.Backend` (``sendrecv``, ``alltoall_v``,
``allgather``), so a torch process group and an mpi4py communicator drive it alike. The streams, their wire
format and the reduce-scatter phase are in :mod:`sparsedist.collectives.streams`. Each algorithm's
:class:`~sparsedist.collectives.base.Collective` states its cost beside it.
"""

from __future__ import annotations

import torch

from ..payload import accumulator_dtype, all_finite
from .backend import Backend
from .allgather import check_out, zeroed
from .base import SIZE_BYTES, Collective, CostSheet, CostTerms, Reduced
from .streams import Block, delta_for, prepare, recv_block, send_block, exchange_block, split_bounds_for, \
    split_exchange, split_reduce, accumulate, allgatherv_bytes

__all__ = ["ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather", "SSARRecursiveDouble",
           "SSARSplitAllgather", "DSARSplitAllgather"]


def ssar_recursive_double(backend: Backend, indices: torch.Tensor, values: torch.Tensor, numel: int,
                          dense_threshold: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """SSAR_Recursive_double: ``log2 P'`` rounds of pairwise exchange-and-merge with partner ``rank XOR 2**r``.

    Args:
        backend: the communicator.
        indices: ``(nnz,)`` integer positions in ``[0, numel)`` (any order; duplicates are summed).
        values: ``(nnz,)`` floating values.
        numel: length of the vector (the same on every rank).
        dense_threshold: a stream switches to dense once ``nnz > dense_threshold * numel`` (default
            ``value_bytes / (index_bytes + value_bytes)``, where the sparse encoding outgrows the dense one).
        out: a ``(numel,)`` floating tensor on the values' device to write the sum into (zeroed once the sum is
            known, so it may not hold the input; the sum is cast to its dtype), e.g. the bucket buffer: saves a
            fresh vector and a pass. Default: a new one.

    Returns:
        ``(numel,)`` tensor: the sum over ranks, identical on every rank; ``out``, or a new one in ``values.dtype``.
    """
    check_out(out, numel, device=values.device)
    codec, idx, val = prepare(indices, values, numel)
    if numel == 0:
        return values.new_zeros(0) if out is None else out
    delta = delta_for(dense_threshold, codec)
    block = Block(0, numel, idx, val).densify_if(delta)
    size, rank = backend.size, backend.rank
    if size > 1:
        p2 = 1 << (size.bit_length() - 1)
        extra = size - p2
        if rank >= p2:  # fold in first, out last
            send_block(backend, codec, block, rank - p2)
            block = recv_block(backend, codec, rank - p2, 0, numel)
        else:
            if rank < extra:
                block = codec.merge(block, recv_block(backend, codec, rank + p2, 0, numel)).densify_if(delta)
            mask = 1
            while mask < p2:
                partner = rank ^ mask
                other = exchange_block(backend, codec, block, partner)
                block = codec.merge(block, other) if rank < partner else codec.merge(other, block)
                block = block.densify_if(delta)
                mask <<= 1
            if rank < extra:
                send_block(backend, codec, block, rank + p2)
    out = zeroed(out, numel, codec.dtype, codec.device)
    block.write_into(out)
    return out


def ssar_split_allgather(backend: Backend, indices: torch.Tensor, values: torch.Tensor, numel: int,
                         dense_threshold: float | None = None, split_bounds=None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """SSAR_Split_allgather: sparse reduce-scatter over ``P`` index ranges, then a sparse allgather of the
    reduced ranges (a range whose reduced block passes the dense threshold travels dense).

    Args:
        backend, indices, values, numel, dense_threshold, out: as :func:`ssar_recursive_double`.
        split_bounds: the ``P`` ranges: None (default) cuts ``[0, numel)`` into equal lengths, as SparCML does;
            ``"balanced"`` computes Ok-Topk's balanced ranges from the data (:func:`balanced_bounds`, one more
            allreduce of ``P`` values); or ``P + 1`` boundaries, the same on every rank (e.g. cached balanced ones).

    Returns:
        As :func:`ssar_recursive_double`.
    """
    check_out(out, numel, device=values.device)
    codec, idx, val = prepare(indices, values, numel)
    if numel == 0:
        return values.new_zeros(0) if out is None else out
    delta = delta_for(dense_threshold, codec)
    bounds = split_bounds_for(backend, idx, numel, split_bounds)
    mine = _sum_range(codec, split_exchange(backend, codec, idx, val, bounds, delta), bounds, backend.rank, delta)
    parts = allgatherv_bytes(backend, codec.encode(mine))
    out = zeroed(out, numel, codec.dtype, codec.device)
    for j, buf in enumerate(parts):
        codec.decode(buf, bounds[j], bounds[j + 1] - bounds[j]).write_into(out)
    return out


def _sum_range(codec, blocks: list, bounds: list[int], rank: int, delta: float) -> Block:
    """The sum of the blocks this rank received for its range, in rank order: merged as sparse streams while their
    entries together fit under SparCML's delta (the result cannot then outgrow it, and the work follows the entries,
    not the range's length), else accumulated densely; dense past delta either way."""
    start, length = bounds[rank], bounds[rank + 1] - bounds[rank]
    if all(b.dense is None for b in blocks) and sum(b.nnz for b in blocks) <= delta * length:
        return codec.sum_sparse(blocks, start, length)
    sums, touched = accumulate(codec, blocks, start, length)
    rel = touched.nonzero().view(-1)
    return Block(start, length, rel + start, sums[rel].to(codec.dtype)).densify_if(delta)


def dsar_split_allgather(backend: Backend, indices: torch.Tensor, values: torch.Tensor, numel: int,
                         dense_threshold: float | None = None, split_bounds=None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """DSAR_Split_allgather: sparse reduce-scatter over ``P`` index ranges (``dense_threshold`` applies to its
    blocks), then a dense allgather of the reduced ranges: with equal ranges (the default) each padded to
    ``ceil(numel / P)`` values (``Backend.allgather``); with other ``split_bounds`` a ring allgatherv of the
    ranges' exact lengths.

    Args and returns as :func:`ssar_split_allgather` (``out`` is written whole, not zeroed first).
    """
    check_out(out, numel, device=values.device)
    codec, idx, val = prepare(indices, values, numel)
    if numel == 0:
        return values.new_zeros(0) if out is None else out
    delta = delta_for(dense_threshold, codec)
    size = backend.size
    bounds = split_bounds_for(backend, idx, numel, split_bounds)
    _, length, sums, _, _ = split_reduce(backend, codec, idx, val, bounds, delta, support=False)
    lengths = [bounds[j + 1] - bounds[j] for j in range(size)]
    if split_bounds is not None:
        mine = sums.to(codec.dtype).contiguous().view(torch.uint8)
        parts = allgatherv_bytes(backend, mine, [n * codec.bv for n in lengths])
        pieces = [p.view(codec.dtype) if p.storage_offset() % 8 == 0 else p.clone().view(codec.dtype) for p in parts]
    else:
        width = max(lengths)
        row = torch.zeros(width, dtype=codec.dtype, device=codec.device)
        row[:length] = sums.to(codec.dtype)
        rows = backend.allgather(row)
        pieces = [rows[j, : lengths[j]] for j in range(size)]
    if out is None:
        return torch.cat(pieces)
    for j, piece in enumerate(pieces):  # every element written: no zero-fill
        out[bounds[j]:bounds[j + 1]] = piece
    return out


class _SparCML(Collective):
    """The hook's view of a SparCML algorithm: the exact sum, densified into the accumulation dtype. A rank whose
    gradient is not finite sends one NaN entry, so the sum is not finite on every rank."""

    algorithm = staticmethod(ssar_recursive_double)

    def reduce(self, indices: torch.Tensor, values: torch.Tensor, numel: int, backend: Backend, *,
               finite: bool = True, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
               **kw) -> Reduced:
        """See :meth:`Collective.reduce`; ``dtype``: the sum's (default: fp32 for half values, else theirs);
        ``out``: a ``(numel,)`` tensor of that dtype to write the sum into (e.g. the bucket buffer), else a new one.
        The algorithm writes its sum straight into it (cast from the values' dtype)."""
        dtype = dtype or accumulator_dtype(values.dtype)
        check_out(out, numel, dtype, values.device)
        if not finite:
            indices = torch.zeros(1, dtype=torch.int64, device=values.device)
            values = torch.full((1,), float("nan"), dtype=values.dtype, device=values.device)
        total = out if out is not None else torch.empty(numel, dtype=dtype, device=values.device)
        self.algorithm(backend, indices, values, numel, out=total)
        return Reduced(total, all_finite(total))


class SSARRecursiveDouble(_SparCML):
    """SSAR_Recursive_double. Cost: ``log2 P'`` rounds of ``2`` alphas and ``8 + block(U(c_r))`` bytes,
    ``c_r = min(P, f 2^r)`` inputs per stream (``f = 2`` when ``P`` is not a power of two: the fold-in doubles
    the busiest streams); plus fold-in ``8 + block(k)`` and fold-out ``8 + block(U(P))`` when ``P != P'``. Each
    size message and payload is one call; coalescing the (unsorted) input sorts ``k`` entries, and so does every
    merge of two sparse streams (``torch.unique`` of both); the result is written into a zeroed vector entry by
    entry (or copied, once dense)."""

    name = "ssar_recursive_double"
    algorithm = staticmethod(ssar_recursive_double)

    @staticmethod
    def cost(c: CostTerms, sheet: CostSheet) -> None:
        P, n = c.P, c.n
        p2 = 1 << (P.bit_length() - 1)
        f = 1 if p2 == P else 2
        sheet.local("sort", c.k)  # coalescing the unsorted input into a stream
        if p2 != P:
            sheet.step(2, SIZE_BYTES + c.block(c.k, n), "sendrecv", 2, parts=(SIZE_BYTES, c.block(c.k, n)))
            sheet.local("sort", 2 * c.k)  # merging the folded-in stream
        r = 0
        while (1 << r) < p2:
            inputs = min(P, f << r)
            m = c.U(inputs)
            sheet.step(2, SIZE_BYTES + c.block(m, n), "sendrecv", 2, parts=(SIZE_BYTES, c.block(m, n)))
            if c.U(min(P, 2 * inputs)) > c.delta * n or m > c.delta * n:
                sheet.local("dense", n, ops=2)
            else:
                sheet.local("sort", 2 * m)  # the merge sorts both streams' entries
            r += 1
        if p2 != P:
            sheet.step(2, SIZE_BYTES + c.block(c.U(P), n), "sendrecv", 2, parts=(SIZE_BYTES, c.block(c.U(P), n)))
        sheet.local("dense", n)  # the zeroed result
        if c.U(P) > c.delta * n:
            sheet.local("dense", n)
        else:
            sheet.local("sparse", c.U(P))  # written entry by entry


def split_exchange_cost(c: CostTerms, sheet: CostSheet) -> None:
    """The exchange of the split algorithms' reduce-scatter: sizes, then ``block(k/P)`` per range (``2(P-1)``
    alphas), after coalescing the (unsorted) input (``k`` entries sorted)."""
    sheet.step(c.P - 1, (c.P - 1) * SIZE_BYTES, "alltoall")
    sheet.step(c.P - 1, (c.P - 1) * c.block(c.k / c.P, c.n / c.P), "alltoall")
    sheet.local("sort", c.k)  # coalescing the unsorted input into a stream


def split_phase_cost(c: CostTerms, sheet: CostSheet) -> None:
    """The reduce-scatter both split algorithms (and the global top-k) start with, summed into a dense accumulator
    of the range: the exchange, then ``k`` received entries added into ``n/P`` zeroed elements (and the ``n``-long
    zeroed result)."""
    split_exchange_cost(c, sheet)
    sheet.local("sparse", 2 * c.k)
    sheet.local("dense", c.n / c.P)
    sheet.local("dense", c.n)


class _Split(_SparCML):
    """A split algorithm: the reduce-scatter phase, then an allgather of the reduced ranges (its second phase)."""

    first_phase_cost = staticmethod(split_phase_cost)

    @classmethod
    def cost(cls, c: CostTerms, sheet: CostSheet) -> None:
        cls.first_phase_cost(c, sheet)
        cls.second_phase_cost(c, sheet)

    @staticmethod
    def second_phase_cost(c: CostTerms, sheet: CostSheet) -> None:
        raise NotImplementedError


class SSARSplitAllgather(_Split):
    """SSAR_Split_allgather. Cost: the split phase, summed as sparse streams (``k`` received entries sorted) while
    they fit under SparCML's delta of the range, else in a dense accumulator scanned for its support (a pass over
    ``n/P`` flags); then the reduced ranges' sizes, ``(P-1)*8`` bytes, a ring allgatherv of ``(P-1)*block(U(P)/P)``
    bytes (a range past delta travels dense), and the ``U(P)`` entries received written into the result."""

    name = "ssar_split_allgather"
    algorithm = staticmethod(ssar_split_allgather)

    @staticmethod
    def first_phase_cost(c: CostTerms, sheet: CostSheet) -> None:
        if c.k > c.delta * c.n / c.P:
            split_phase_cost(c, sheet)
            sheet.local("dense", c.n / c.P)
        else:
            split_exchange_cost(c, sheet)
            sheet.local("sort", c.k)  # the union of the received streams
            sheet.local("dense", c.n)  # the zeroed result

    @staticmethod
    def second_phase_cost(c: CostTerms, sheet: CostSheet) -> None:
        sheet.step(c.P - 1, (c.P - 1) * SIZE_BYTES, "allgather")
        sheet.step(c.P - 1, (c.P - 1) * c.block(c.U(c.P) / c.P, c.n / c.P), "sendrecv", c.P - 1)
        sheet.local("sparse", c.U(c.P) / c.P, ops=c.P)  # each range's entries decoded and written


class DSARSplitAllgather(_Split):
    """DSAR_Split_allgather. Cost: the split phase, then a dense allgather of ``(P-1) * ceil(n/P) * b_v``."""

    name = "dsar_split_allgather"
    algorithm = staticmethod(dsar_split_allgather)

    @staticmethod
    def second_phase_cost(c: CostTerms, sheet: CostSheet) -> None:
        sheet.step(c.P - 1, (c.P - 1) * -(-c.n // c.P) * c.b_v, "allgather")
        sheet.local("dense", c.n)
