"""The sparse reduce-scatter's communication: each selected entry goes only to the rank that owns it.

SparCML's split phase (Renggli et al. 2019) with the ranges fixed by FSDP's sharding: rank ``j`` owns flat
positions ``[j * S, (j + 1) * S)`` of the reduce-scatter input. Every rank cuts its sorted selection at the range
boundaries, encodes each piece as a sparse block (or a dense one, once it holds more than ``delta`` of its range:
:class:`~sparsedist.collectives.streams.Codec`), and one ``all_to_all`` of 16-byte headers (the piece's size and
whether the sender's gradient was finite) precedes one ``all_to_all`` of the pieces. An owner sums what it
receives in rank order, so the result is defined bit for bit; every rank learns every rank's finite flag.

Ok-Topk's load balancing (Li & Hoefler 2022) moves the range boundaries to where the entries are; here the
owners are fixed by the parameters' shards, so a rank whose shard holds many large gradients receives more.
"""

from __future__ import annotations

import torch

from ..collectives.backend import Backend
from ..collectives.streams import Block, Codec

__all__ = ["route_to_owners"]


def route_to_owners(backend: Backend, codec: Codec, idx: torch.Tensor, val: torch.Tensor, chunk: int,
                    finite: bool, delta: float) -> tuple[torch.Tensor, bool, int]:
    """Sum the ranks' sparse vectors of ``P * chunk`` elements, each rank receiving its own range only.

    Args:
        backend: the communicator over the FSDP group (its byte counters record the traffic).
        codec: encoder for the vector (``numel = P * chunk``, the wire dtype of the values).
        idx: ``(nnz,)`` int64 positions, sorted ascending, unique.
        val: ``(nnz,)`` values (wire dtype).
        chunk: ``S``, the length of each rank's range.
        finite: whether this rank's gradient was finite; if False it sends nothing and every rank is told.
        delta: SparCML's density above which a piece travels dense.

    Returns:
        ``(sums, all_finite, received)``: this rank's ``(chunk,)`` sums in the accumulation dtype (fp32 for
        half types), whether every rank's gradient was finite (identical on all ranks), and the number of
        entries it received (its own included; a dense piece counts its length).
    """
    size, rank, dev = backend.size, backend.rank, codec.device
    if finite and size > 1:
        edges = torch.arange(1, size, dtype=torch.int64, device=dev) * chunk
        cuts = [0] + torch.searchsorted(idx, edges).tolist() + [int(idx.numel())]
    else:
        cuts = [0] * size + [int(idx.numel()) if finite else 0]
    pieces = [codec.encode(Block(j * chunk, chunk, idx[cuts[j]:cuts[j + 1]], val[cuts[j]:cuts[j + 1]])
                           .densify_if(delta)) for j in range(size)]
    header = torch.tensor([[p.numel(), int(finite)] for p in pieces], dtype=torch.int64, device=dev)
    heard = torch.cat(backend.alltoall_v(list(header.view(-1).split(2)), [2] * size)).view(size, 2)
    ok = bool(heard[:, 1].all())
    received = backend.alltoall_v(pieces, heard[:, 0].tolist())
    sums = torch.zeros(chunk, dtype=codec.acc, device=dev)
    count = 0
    start = rank * chunk
    for buf in received:  # in rank order: the same sum on every run
        piece = codec.decode(buf, start, chunk)
        count += piece.nnz
        if piece.dense is not None:
            sums += piece.dense.to(codec.acc)
        elif piece.nnz:
            sums.index_add_(0, piece.idx - start, piece.val.to(codec.acc))
    return sums, ok, count
