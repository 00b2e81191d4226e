"""Optimizers for a sparse gradient exchange: one rule for AdamW and SGD.

**The rule.** Error feedback keeps the *sum* of what a compressor did not send, so it is exact over time only for
a quantity that enters the update linearly (Tang et al. 2021, 1-bit Adam, Sec. 3). These optimizers therefore
compress the one quantity that always does: each rank runs the optimizer's update rule on its *own* gradient,
with its *own* optimizer state, and sends its parameter update ``lr * direction`` (AdamW: ``m_r / (sqrt(v_r) +
eps)`` with bias correction, :mod:`.adamw`; SGD: the momentum/Nesterov direction, :mod:`.sgd`). Every rank
applies the average of what was sent, so the parameters stay identical; the per-rank state (moments, momentum
buffers) differs and is checkpointed per rank. A dense warm-up of ``warmup_steps`` optimizer steps runs the
plain optimizer on densely averaged gradients first.

**The contract with an exchange** (the DDP hook, :class:`ReferenceExchange`, or anything else), per step:

1. After (or during) backward, ask ``optimizer.exchange_is_dense()`` once; the answer is the same on every rank.
2. Dense: ``p.grad <- sum_r grad_r / P`` (a plain allreduce of the raw gradients, as DDP does).
3. Sparse: for each parameter ``p`` with local gradient ``grad``, ``w = optimizer.to_wire(p, grad)`` (same shape,
   a new tensor; call it once per parameter per step, with the gradient as backward left it, loss-scaled if a
   ``GradScaler`` is in use). Add the error-feedback residual to ``w``, select, keep the residual, sum over
   ranks, divide by P, and write the result into ``p.grad``. ``to_wire`` may be called in any order and from a
   communication hook while backward runs; it changes no optimizer state (it keeps the local gradient until
   ``step()``). In the dense phase it returns ``grad`` unchanged, so an exchange may call it unconditionally.
4. ``optimizer.step()`` consumes ``p.grad``: dense, the plain optimizer step on the averaged gradient; sparse,
   ``p <- p - p.grad`` (AdamW also decays ``p`` by ``lr * weight_decay`` itself) and each rank's state advances
   with its own gradient. A sparse step whose parameter has a gradient but no ``to_wire`` call raises.

**Error reset** (``error_reset=True``, :mod:`.error_reset`; Xie et al. 2020's "bifurcated local models"):
each rank computes its gradient at its *local model*, the consensus parameters minus its own error-feedback
residual, so it sees its pending update at once instead of hundreds of steps later at 0.1 % density. An exchange
that keeps residuals by parameter name binds them with ``optimizer.attach_exchange(named, residuals, backend,
module)`` (the DDP hook, :class:`ReferenceExchange` and the Horovod optimizer given the module do; FSDP2
refuses the option): the optimizer then
localises the parameters in a forward pre-hook of ``module`` (training passes only, once per step) and puts the
consensus back, exactly, in ``step()``, so between steps every rank holds the same parameters.
``optimizer.consolidate()`` (a collective; ``sync_every=N`` calls it every N sparse steps) makes the mean of the
local models every rank's parameters: call it before evaluating or saving a model, and at the end of training.

**FSDP2.** ``sparsedist.fsdp.register_fsdp(model, "topk", optimizer=opt)`` applies the same contract inside
FSDP2's reduce-scatter (AdamW only; :mod:`sparsedist.fsdp.optimizer`): ``to_wire`` gets the sharded parameter
and this rank's unsharded gradient, the warm-up runs on the shards with sharded state, and the ``step()`` that
ends the warm-up all-gathers that state into full-size per-rank state (a collective: every rank steps).

**Clipping and loss scaling.** In the sparse phase ``p.grad`` holds the averaged *update*, in parameter units,
not a gradient: do not call ``clip_grad_norm_`` on it; pass ``max_grad_norm`` to the optimizer instead, which
clips the averaged gradient in the dense phase (as ``clip_grad_norm_`` would) and each rank's local gradient
per tensor in the sparse phase (:class:`~.base.ExchangeOptimizer`). That is not the same as clipping the dense
averaged gradient: a rank's local gradient is noisier (its norm is larger), and a tensor is clipped on its own.
With ``torch.amp.GradScaler``, pass ``grad_scaler=scaler``: ``to_wire`` unscales the local gradient and scales
the wire back, so ``scaler.step(optimizer)`` unscales ``p.grad``, skips a step with a non-finite value (a rank
whose gradient overflowed sends NaN, so every rank skips) and the optimizer state stays untouched.

**Telemetry.** ``optimizer.stats()``: ``warmup_steps``, ``warmup_over``, ``steps``, ``dense_steps``,
``sparse_steps``, ``lr_changed_after_backward``, ``error_reset``, ``sync_every``, ``consolidations``.

**Packed optimizer state.** :mod:`.packed` (``PackedAdamW``, ``PackedAdam``, ``PackedSGD``) keeps the state of
masked parameters on their active weights only, so optimizer memory shrinks with model density (docs/fsdp.md).
"""

from .adamw import AdamW
from .base import ExchangeOptimizer
from .packed import PackedAdam, PackedAdamW, PackedOptimizer, PackedSGD, repack
from .reference import ReferenceExchange, commit_residual, local_selection
from .sgd import SGD

__all__ = ["AdamW", "SGD", "ExchangeOptimizer", "ReferenceExchange", "local_selection", "commit_residual",
           "PackedOptimizer", "PackedAdam", "PackedAdamW", "PackedSGD", "repack"]
