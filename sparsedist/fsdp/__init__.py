"""Sparse gradients and sparse models under FSDP2 (``torch.distributed.fsdp.fully_shard``).

* :func:`register_fsdp` (:mod:`.state`): every ``fully_shard`` module reduce-scatters its gradients sparsely,
  through FSDP2's public ``set_custom_reduce_scatter``: each rank selects from its unsharded gradient with error
  feedback, routes each selected entry to the rank owning its shard (:mod:`.routing`), owners sum
  (:mod:`.exchange`, laid out by :mod:`.layout`). HSDP through ``set_all_reduce_hook`` (:mod:`.hsdp`).
* ``register_fsdp(..., optimizer=sparsedist.optim.AdamW(...))`` (:mod:`.optimizer`): the exchange sends each
  rank's own Adam update instead of its gradient (issue 16's rule), with per-rank full-size moments.
* :class:`CompactFeedback` (:mod:`.residuals`): residuals in bfloat16, and what residuals cost under FSDP.
* :class:`ShardedRigL` (:mod:`.rigl`): RigL with masks sharded like their parameters.

Memory that shrinks with density (optimizer state on the active weights only) is
:class:`sparsedist.optim.PackedOptimizer`. docs/fsdp.md has the measurements.
"""

from .layout import ShardLayout, Slot, managed_parameters
from .memory import storage_bytes, training_memory
from .residuals import CompactFeedback
from .rigl import ShardedRigL, regrow
from .state import FSDPSparsifyState, SparseReduceScatter, register_fsdp

__all__ = ["register_fsdp", "FSDPSparsifyState", "SparseReduceScatter", "ShardLayout", "Slot",
           "managed_parameters", "CompactFeedback", "ShardedRigL", "regrow",
           "training_memory", "storage_bytes"]
