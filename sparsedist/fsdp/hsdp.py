"""HSDP with a sparse replica exchange: shard within a group, replicate across groups.

FSDP2's own HSDP (``fully_shard(model, mesh=2-D mesh)``) reduce-scatters within the shard group and then
all-reduces the shard densely across replicas, calling ``set_all_reduce_hook``'s hook only *after* that dense
all-reduce. So sparsedist shards each replica group with the 1-D shard mesh (``fully_shard(m,
mesh=mesh["shard"])``: the sparse reduce-scatter runs within it) and does the replica sum itself in the hook,
which FSDP calls on the reduce-scatter output (this rank's shard, averaged over its shard group):

* the shard output is sparse already (the union of what the shard group's ranks selected for this owner), so
  its non-zeros are summed over the replica group exactly with SparCML's recursive doubling
  (:func:`sparsedist.collectives.sparse_allreduce`, dense once the fill-in passes SparCML's threshold),
  bitwise identical on every replica, and divided by the number of replicas;
* on dense steps (RigL's mask updates, or no compressor) the shard is all-reduced densely.

Residuals commit only when every rank of the shard group *and* of the replica group had a finite gradient (the
flag is agreed over both), so a replica that overflows cannot make another lose what it sent.
"""

from __future__ import annotations

import torch

from ..collectives.backend import TorchBackend, ring_allreduce_bytes
from ..collectives.sparse_allreduce import sparse_allreduce

__all__ = ["install_replicate_hooks", "replicate_sum"]


def replicate_sum(state, backend: TorchBackend, out: torch.Tensor) -> None:
    """Average the shard ``out`` over the replica group ``backend``, in place (sparse unless a dense step)."""
    before = (backend.bytes_sent, backend.bytes_received)
    if state.dense_now:
        backend.allreduce(out)
    else:
        idx = out.nonzero().view(-1)
        total = sparse_allreduce(idx, out[idx], out.numel(), algorithm="ssar_recursive_double", backend=backend)
        out.copy_(total)
    out.div_(backend.size)
    state.telemetry.record_bucket(
        sent_bytes=backend.bytes_sent - before[0], received_bytes=backend.bytes_received - before[1],
        dense_bytes=ring_allreduce_bytes(out.numel(), out.element_size(), backend.size), elements_sent=0,
        elements_total=0, collective="replicate_allreduce" if state.dense_now else "replicate_sparse_allreduce")


def install_replicate_hooks(state, modules, replicate_group) -> None:
    """Give every ``fully_shard`` module in ``modules`` the replica sum as its ``set_all_reduce_hook`` hook."""
    backend = TorchBackend(replicate_group, timeout=state.options.timeout)
    for module in modules:
        module.set_all_reduce_hook(lambda out: replicate_sum(state, backend, out))
