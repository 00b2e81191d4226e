"""Sparse streams, the representation SparCML's algorithms and Ok-Topk's global top-k exchange and merge.

A stream is a block ``[start, start + length)`` of a vector of ``numel`` elements, stored sparse (sorted unique
int64 indices and values) or, once ``nnz > delta * length``, dense. :class:`Codec` turns blocks into ``uint8``
messages and back; :func:`split_exchange` is the exchange of the reduce-scatter over index ranges that the split
algorithms and the global top-k share (:func:`split_reduce` sums it into a dense accumulator); the point-to-point
helpers exchange sizes before payloads, so an empty rank never hangs.

Wire format of one block (a ``uint8`` tensor): empty -> zero bytes; sparse -> int64 header ``nnz`` then ``nnz``
indices (int32 when ``numel < 2**31``, else int64) then ``nnz`` values in the values' dtype; dense -> int64
header ``-1`` then ``length`` values.
"""

from __future__ import annotations

import torch

from ..payload import accumulator_dtype
from .backend import Backend
from .base import HEADER_BYTES

__all__ = ["HEADER_BYTES", "Block", "Codec", "coalesce", "index_dtype_for", "default_dense_threshold",
           "uniform_bounds", "balanced_bounds", "allgatherv_bytes", "split_exchange", "split_reduce",
           "accumulate"]

# ---------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------
def index_dtype_for(numel: int) -> torch.dtype:
    """Wire dtype of indices for a vector of ``numel`` elements: int32 if it fits, else int64."""
    return torch.int32 if numel <= 2**31 - 1 else torch.int64


def default_dense_threshold(value_bytes: int, index_bytes: int) -> float:
    """SparCML's delta: the density above which a sparse block is larger than its dense form."""
    return value_bytes / (value_bytes + index_bytes)


def uniform_bounds(numel: int, parts: int) -> list[int]:
    """``parts + 1`` boundaries cutting ``[0, numel)`` into ``parts`` contiguous ranges of near-equal length."""
    return [(j * numel) // parts for j in range(parts + 1)]


def balanced_bounds(backend: Backend, indices: torch.Tensor, numel: int) -> list[int]:
    """Ranges cut where the ranks' entries are, so that each range holds about the same number of entries.

    Ok-Topk's region repartition (Li & Hoefler 2022): each rank takes the ``P - 1`` split points that cut its own
    sorted indices into ``P`` equal-count pieces; the split points are averaged over the ranks that have at least
    ``P`` entries (one allreduce of ``P`` float64). A collective call.

    Args:
        backend: the communicator.
        indices: this rank's ``(nnz,)`` positions, **sorted ascending** (e.g. from :func:`coalesce`).
        numel: length of the vector.

    Returns:
        ``P + 1`` non-decreasing boundaries from 0 to ``numel`` (uniform if no rank has ``P`` entries),
        identical on every rank.
    """
    size = backend.size
    vec = torch.zeros(size, dtype=torch.float64, device=indices.device)
    m = indices.numel()
    if m >= size:
        pos = (torch.arange(1, size, device=indices.device) * m) // size
        vec[: size - 1] = indices[pos].to(torch.float64)
        vec[size - 1] = 1.0
    if size > 1:
        backend.allreduce(vec)
    contributors = float(vec[size - 1])
    if contributors <= 0:
        return uniform_bounds(numel, size)
    inner = torch.floor(vec[: size - 1] / contributors).to(torch.int64).clamp_(0, numel)
    return [0] + torch.cummax(inner, 0).values.tolist() + [numel]


def check_bounds(bounds, numel: int, size: int) -> list[int]:
    b = [int(x) for x in bounds]
    if len(b) != size + 1 or b[0] != 0 or b[-1] != numel or any(b[j] > b[j + 1] for j in range(size)):
        raise ValueError(f"split bounds must be {size + 1} non-decreasing integers from 0 to numel={numel}, "
                         f"got {list(bounds)[:8]}{'...' if len(b) > 8 else ''}")
    return b


def coalesce(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sort indices and sum duplicates.

    Args:
        indices: ``(nnz,)`` integer tensor.
        values: ``(nnz,)`` floating tensor.

    Returns:
        ``(idx, val, inverse)``: ``idx`` int64 sorted and unique, ``val`` in ``values.dtype`` (duplicates summed
        in fp32 for half types), and ``inverse`` (``(nnz,)`` int64, ``idx[inverse[i]] == indices[i]``) or
        ``None`` when the input was already sorted and unique (then ``inverse`` is the identity).
    """
    idx = indices.to(torch.int64).contiguous()
    values = values.contiguous()
    if idx.numel() <= 1 or bool((idx[1:] > idx[:-1]).all()):
        return idx, values, None
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    if uniq.numel() == idx.numel():
        val = values.new_empty(uniq.numel())
        val[inverse] = values
    else:
        acc = accumulator_dtype(values.dtype)
        val = torch.zeros(uniq.numel(), dtype=acc, device=values.device)
        val.index_add_(0, inverse, values.to(acc))
        val = val.to(values.dtype)
    return uniq, val, inverse


class Block:
    """A piece ``[start, start + length)`` of the vector, stored sparse (``idx`` absolute int64 sorted unique,
    ``val``) or dense (``dense``, ``(length,)``)."""

    __slots__ = ("start", "length", "idx", "val", "dense")

    def __init__(self, start: int, length: int, idx=None, val=None, dense=None):
        self.start, self.length, self.idx, self.val, self.dense = start, length, idx, val, dense

    @property
    def nnz(self) -> int:
        return self.length if self.dense is not None else int(self.idx.numel())

    def densify_if(self, threshold: float) -> "Block":
        """Switch to dense when ``nnz > threshold * length``."""
        if self.dense is None and self.idx.numel() and self.idx.numel() > threshold * self.length:
            dense = self.val.new_zeros(self.length)
            dense[self.idx - self.start] = self.val
            return Block(self.start, self.length, dense=dense)
        return self

    def write_into(self, out: torch.Tensor) -> None:
        """Write (not add) this block into the full-length vector ``out``."""
        if self.dense is not None:
            out[self.start: self.start + self.length] = self.dense.to(out.dtype)
        elif self.idx.numel():
            out[self.idx] = self.val.to(out.dtype)


def view_as(buf: torch.Tensor, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """``buf[lo:hi]`` (uint8) reinterpreted as ``dtype``; copies when the slice is misaligned."""
    seg = buf[lo:hi]
    if seg.storage_offset() % 8:
        seg = seg.clone()
    return seg.view(dtype)


class Codec:
    """Encodes blocks of one vector (``numel`` elements of ``dtype``) as uint8 messages, and decodes them."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.numel, self.dtype, self.device = numel, dtype, device
        self.idtype = index_dtype_for(numel)
        self.bi = torch.empty(0, dtype=self.idtype).element_size()
        self.bv = torch.empty(0, dtype=dtype).element_size()
        self.acc = accumulator_dtype(dtype)

    def empty_block(self, start: int, length: int) -> Block:
        return Block(start, length, torch.empty(0, dtype=torch.int64, device=self.device),
                      torch.empty(0, dtype=self.dtype, device=self.device))

    def encode(self, block: Block) -> torch.Tensor:
        if block.dense is not None:
            head = torch.tensor([-1], dtype=torch.int64, device=self.device)
            return torch.cat([head.view(torch.uint8), block.dense.to(self.dtype).contiguous().view(torch.uint8)])
        m = int(block.idx.numel())
        if m == 0:
            return torch.empty(0, dtype=torch.uint8, device=self.device)
        head = torch.tensor([m], dtype=torch.int64, device=self.device)
        return torch.cat([head.view(torch.uint8), block.idx.to(self.idtype).contiguous().view(torch.uint8),
                          block.val.to(self.dtype).contiguous().view(torch.uint8)])

    def decode(self, buf: torch.Tensor, start: int, length: int) -> Block:
        if buf.numel() == 0:
            return self.empty_block(start, length)
        head = int(view_as(buf, 0, HEADER_BYTES, torch.int64)[0])
        if head < 0:
            expect = HEADER_BYTES + length * self.bv
            if buf.numel() != expect:
                raise RuntimeError(f"sparsedist: corrupt dense block: {buf.numel()} bytes, expected {expect} "
                                   f"(do all ranks pass the same numel?)")
            return Block(start, length, dense=view_as(buf, HEADER_BYTES, expect, self.dtype))
        end_i = HEADER_BYTES + head * self.bi
        expect = end_i + head * self.bv
        if buf.numel() != expect:
            raise RuntimeError(f"sparsedist: corrupt sparse block: {buf.numel()} bytes for {head} entries, "
                               f"expected {expect} (do all ranks pass the same numel and dtype?)")
        idx = view_as(buf, HEADER_BYTES, end_i, self.idtype).to(torch.int64)
        val = view_as(buf, end_i, expect, self.dtype)
        return Block(start, length, idx, val)

    def sum_sparse(self, blocks: list[Block], start: int, length: int) -> Block:
        """The sum of sparse blocks over the same range, in list order (the accumulation dtype, rounded once):
        what a dense accumulator of the range would hold at the union of their supports."""
        parts = [b for b in blocks if b.idx.numel()]
        if not parts:
            return self.empty_block(start, length)
        idx = torch.cat([b.idx for b in parts])
        val = torch.cat([b.val for b in parts]).to(self.acc)
        uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
        out = torch.zeros(uniq.numel(), dtype=self.acc, device=self.device).index_add_(0, inv, val)
        return Block(start, length, uniq, out.to(self.dtype))

    def merge(self, lo: Block, hi: Block) -> Block:
        """Sum of two blocks over the same range; ``lo`` comes from the lower rank (fixes the order)."""
        if lo.dense is None and hi.dense is None:
            if hi.idx.numel() == 0:
                return lo
            if lo.idx.numel() == 0:
                return hi
            idx = torch.cat([lo.idx, hi.idx])
            val = torch.cat([lo.val, hi.val]).to(self.acc)
            uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
            out = torch.zeros(uniq.numel(), dtype=self.acc, device=self.device).index_add_(0, inv, val)
            return Block(lo.start, lo.length, uniq, out.to(self.dtype))
        if lo.dense is not None:
            acc = lo.dense.to(self.acc, copy=True)
            other = hi
        else:
            acc = hi.dense.to(self.acc, copy=True)
            other = lo
        if other.dense is not None:
            acc += other.dense.to(self.acc)
        elif other.idx.numel():
            acc.index_add_(0, other.idx - lo.start, other.val.to(self.acc))
        return Block(lo.start, lo.length, dense=acc.to(self.dtype))


def delta_for(dense_threshold: float | None, codec: Codec) -> float:
    if dense_threshold is None:
        return default_dense_threshold(codec.bv, codec.bi)
    return float(dense_threshold)


def prepare(indices, values, numel):
    idx, val, _ = coalesce(indices, values)
    return Codec(numel, values.dtype, values.device), idx, val


# ---------------------------------------------------------------------------------------------------------
# point-to-point with sizes exchanged first
# ---------------------------------------------------------------------------------------------------------
def size_tensor(n: int, device) -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int64, device=device)


def exchange_block(backend: Backend, codec: Codec, block: Block, partner: int) -> Block:
    buf = codec.encode(block)
    rsize = torch.empty(1, dtype=torch.int64, device=codec.device)
    backend.sendrecv(size_tensor(buf.numel(), codec.device), partner, rsize, partner)
    rbuf = torch.empty(int(rsize[0]), dtype=torch.uint8, device=codec.device)
    backend.sendrecv(buf, partner, rbuf, partner)
    return codec.decode(rbuf, block.start, block.length)


def send_block(backend: Backend, codec: Codec, block: Block, dst: int) -> None:
    buf = codec.encode(block)
    none64 = torch.empty(0, dtype=torch.int64, device=codec.device)
    backend.sendrecv(size_tensor(buf.numel(), codec.device), dst, none64, dst)
    backend.sendrecv(buf, dst, torch.empty(0, dtype=torch.uint8, device=codec.device), dst)


def recv_block(backend: Backend, codec: Codec, src: int, start: int, length: int) -> Block:
    rsize = torch.empty(1, dtype=torch.int64, device=codec.device)
    backend.sendrecv(torch.empty(0, dtype=torch.int64, device=codec.device), src, rsize, src)
    rbuf = torch.empty(int(rsize[0]), dtype=torch.uint8, device=codec.device)
    backend.sendrecv(torch.empty(0, dtype=torch.uint8, device=codec.device), src, rbuf, src)
    return codec.decode(rbuf, start, length)


def allgatherv_bytes(backend: Backend, buf: torch.Tensor, counts: list[int] | None = None) -> list[torch.Tensor]:
    """Allgather one uint8 buffer per rank, lengths differing (zero included), without padding.

    A ring allgatherv: the lengths are allgathered first (8 bytes per rank) unless ``counts`` (every rank's
    length, known to all) is given; then in ``P - 1`` steps every rank passes the block it received last to its
    right neighbour. Each rank receives exactly the others' bytes and sends at most the total, however unequal
    the blocks are (a padded allgather would move ``(P-1) * max`` bytes, a direct send ``(P-1) * own``).

    Returns:
        Rank ``j``'s buffer at index ``j``.
    """
    size, rank = backend.size, backend.rank
    if size == 1:
        return [buf]
    if counts is None:
        counts = backend.allgather(size_tensor(buf.numel(), buf.device)).view(-1).tolist()
    parts: list = [None] * size
    parts[rank] = buf
    if sum(counts) == 0:
        return [buf.new_empty(0) for _ in counts]
    right, left = (rank + 1) % size, (rank - 1) % size
    for step in range(size - 1):
        send_j, recv_j = (rank - step) % size, (rank - step - 1) % size
        rbuf = buf.new_empty(int(counts[recv_j]))
        backend.sendrecv(parts[send_j], right, rbuf, left)
        parts[recv_j] = rbuf
    return parts




def split_exchange(backend: Backend, codec: Codec, idx: torch.Tensor, val: torch.Tensor, bounds: list[int],
                   delta: float) -> list[Block]:
    """The exchange of the split algorithms' reduce-scatter: sends the part of the (sorted) stream in range
    ``[bounds[j], bounds[j+1])`` to rank ``j`` (one block, dense past ``delta``; sizes first, one ``alltoall_v``
    each); returns the blocks of this rank's range that every rank sent, in rank order (its own included)."""
    size, rank, dev = backend.size, backend.rank, codec.device
    if size > 1:
        cuts = [0] + torch.searchsorted(idx, torch.tensor(bounds[1:-1], dtype=torch.int64, device=dev)).tolist()
    else:
        cuts = [0]
    cuts.append(int(idx.numel()))
    bufs = [codec.encode(Block(bounds[j], bounds[j + 1] - bounds[j], idx[cuts[j]:cuts[j + 1]],
                               val[cuts[j]:cuts[j + 1]]).densify_if(delta)) for j in range(size)]
    lengths = torch.tensor([b.numel() for b in bufs], dtype=torch.int64, device=dev)
    rlengths = torch.cat(backend.alltoall_v(list(lengths.split(1)), [1] * size)).tolist()
    start, length = bounds[rank], bounds[rank + 1] - bounds[rank]
    return [codec.decode(buf, start, length) for buf in backend.alltoall_v(bufs, rlengths)]


def split_reduce(backend: Backend, codec: Codec, idx: torch.Tensor, val: torch.Tensor, bounds: list[int],
                  delta: float, support: bool = True) -> tuple[int, int, torch.Tensor, torch.Tensor | None, int]:
    """Phase 1 of the split algorithms (a sparse reduce-scatter), summed into a dense accumulator of the range.

    Sends the part of the (sorted) stream in range ``[bounds[j], bounds[j+1])`` to rank ``j`` (as a sparse block,
    or dense past ``delta``); the owner sums what it receives in rank order.

    Returns:
        ``(start, length, sums, touched, received)`` for this rank's range: ``sums`` ``(length,)`` in the
        accumulation dtype (fp32 for half types), ``touched`` ``(length,)`` bool, the union of the received
        supports (None with ``support=False``: DSAR sends its range dense and needs none), and ``received`` the
        number of entries it received (its own included; a dense block counts its length).
    """
    rank = backend.rank
    start, length = bounds[rank], bounds[rank + 1] - bounds[rank]
    blocks = split_exchange(backend, codec, idx, val, bounds, delta)
    sums, touched = accumulate(codec, blocks, start, length, support)
    return start, length, sums, touched, sum(blk.nnz for blk in blocks)


def accumulate(codec: Codec, blocks: list[Block], start: int, length: int,
               support: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum blocks of the range ``[start, start + length)`` into a dense accumulator, in list order: ``(sums,
    touched)``, ``sums`` ``(length,)`` in the accumulation dtype and ``touched`` the union of their supports
    (``(length,)`` bool; None with ``support=False``)."""
    sums = torch.zeros(length, dtype=codec.acc, device=codec.device)
    touched = torch.zeros(length, dtype=torch.bool, device=codec.device) if support else None
    for blk in blocks:
        if blk.dense is not None:
            sums += blk.dense.to(codec.acc)
            if touched is not None:
                touched.fill_(True)
        elif blk.idx.numel():
            rel = blk.idx - start
            sums.index_add_(0, rel, blk.val.to(codec.acc))
            if touched is not None:
                touched[rel] = True
    return sums, touched


def split_bounds_for(backend: Backend, idx: torch.Tensor, numel: int, split_bounds) -> list[int]:
    if split_bounds is None:
        return uniform_bounds(numel, backend.size)
    if isinstance(split_bounds, str):
        if split_bounds != "balanced":
            raise ValueError(f"split_bounds must be None, 'balanced' or a list of P+1 ints, got {split_bounds!r}")
        return balanced_bounds(backend, idx, numel)
    return check_bounds(split_bounds, numel, backend.size)
