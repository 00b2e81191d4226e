"""The exchange-aware AdamW (:class:`sparsedist.optim.AdamW`) under FSDP2's sparse reduce-scatter.

``register_fsdp(model, "topk", density=0.01, optimizer=opt)`` with ``opt = sparsedist.optim.AdamW(
model.named_parameters(), ...)`` applies the contract of :mod:`sparsedist.optim` to ``fully_shard`` modules:

* **warm-up** (``opt.exchange_is_dense()``): FSDP2's own dense reduce-scatter of the raw gradients, averaged;
  ``opt.step()`` is plain AdamW on each rank's shard of the averaged gradient, with moments sharded like the
  parameters (DTensors, identical on every rank).
* **sparse phase**: each parameter's accumulator starts from ``opt.to_wire(p, g)`` -- ``p`` the sharded
  parameter, ``g`` this rank's *unsharded* local gradient as ``fully_shard`` hands it to the reduce-scatter --
  instead of ``g``; error feedback, selection and routing to the shards' owners are unchanged, and every rank
  receives its shard of ``mean_r C(lr * u_r + e_r)``. ``opt.step()`` then moves the shard,
  ``p <- p * (1 - lr * weight_decay) - p.grad``, and advances this rank's moments with its kept gradient.

**What it costs.** ``u_r = m_r / (sqrt(v_r) + eps)`` is computed from rank ``r``'s own gradient of the whole
parameter, so rank ``r`` keeps moments of the *full* (unsharded) parameter: at the end of the warm-up the sharded
moments are all-gathered once (:meth:`~sparsedist.optim.base.ExchangeOptimizer._unshard_state`) and from then on
every rank holds ``2 x 4 n`` bytes of optimizer state for a model of ``n`` fp32 parameters, whatever the number
of ranks -- where FSDP2 with torch's AdamW holds ``8 n / P``. Between backward and ``step()`` the optimizer also
keeps this rank's full local gradient (``4 n``; FSDP2 frees its unsharded gradients after the reduce-scatter),
and the residuals are ``4 n`` as for any error feedback under FSDP (:mod:`.residuals`). The per-rank moments are
the method (each rank's Adam direction from its own gradient), so they do not shard; docs/fsdp.md measures it.

Not supported (``register_fsdp`` raises): masks (model sparsity: :class:`~sparsedist.optim.PackedAdamW` is the
optimizer for those), HSDP's ``replicate_group``, a world size of 1 (FSDP2 then skips the reduce-scatter),
optimizers other than :class:`sparsedist.optim.AdamW`, parameters the optimizer does not hold, a ``GradScaler``
given to only one of the two, and a reduce-scatter that is not an average (fp16 gradient reduction or
``set_gradient_divide_factor``: FSDP2 then pre-divides the local gradients, which Adam's rule is not linear in).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..optim.adamw import AdamW
from .layout import ShardLayout, Slot

__all__ = ["check_optimizer", "check_average", "to_wire", "announce"]


def check_optimizer(state, modules_world: list[int], replicate_group: Any) -> None:
    """Raise ``ValueError`` naming the problem if ``state.optimizer`` cannot run under this FSDP2 exchange.

    Args:
        state: the :class:`~sparsedist.fsdp.state.FSDPSparsifyState` (its options, layouts and parameters).
        modules_world: the shard group size of every registered module.
        replicate_group: HSDP's replica group, or None.
    """
    opt, opts = state.optimizer, state.options
    if opt is None:
        return
    if not isinstance(opt, AdamW):
        raise ValueError(f"register_fsdp: under FSDP2 the exchange-aware optimizer must be sparsedist.optim.AdamW, "
                         f"got {type(opt).__name__} (SGD's L2 weight decay would mix this rank's full gradient with "
                         f"its shard of the weights); use a torch optimizer for plain gradient exchange")
    if opt.error_reset:
        raise ValueError("register_fsdp: error_reset=True is not supported under FSDP2 (the local model would be "
                         "the sharded consensus minus a full-size residual); build sparsedist.optim.AdamW with "
                         "error_reset=False")
    if opts.masks is not None:
        raise ValueError("register_fsdp: masks= together with sparsedist.optim.AdamW is not supported under FSDP2 "
                         "(its per-rank moments are full size; model sparsity wants them packed): use "
                         "sparsedist.optim.PackedAdamW with masks, or AdamW without masks")
    if replicate_group is not None:
        raise ValueError("register_fsdp: replicate_group= (HSDP) with sparsedist.optim.AdamW is not supported; "
                         "shard over all ranks (one fully_shard mesh) or use a torch optimizer")
    if any(size == 1 for size in modules_world):
        raise ValueError("register_fsdp: at world size 1 FSDP2 skips the reduce-scatter, so the exchange never sees "
                         "the gradients: use sparsedist.optim.AdamW only with 2 or more ranks (or torch's AdamW)")
    scaler = getattr(opt, "grad_scaler", None)
    if scaler is not opts.grad_scaler:
        raise ValueError("register_fsdp: give the same GradScaler to sparsedist.optim.AdamW (grad_scaler=) and to "
                         "register_fsdp (grad_scaler=), or to neither: the optimizer unscales the local gradient and "
                         "the exchange keeps its residuals in unscaled units")
    held = {p for g in opt.param_groups for p in g["params"]}
    missing = [s.name for lay in state.layouts for s in lay.slots if state.params[s.name] not in held]
    if missing:
        raise ValueError(f"register_fsdp: the optimizer does not hold parameters {missing[:5]} of the sharded model; "
                         f"build it over model.named_parameters() after fully_shard and pass it as optimizer=")


def check_average(op) -> None:
    """The optimizer needs each rank's raw local gradient and an averaged result: FSDP2's ``ReduceOp.AVG``."""
    if op != dist.ReduceOp.AVG:
        raise ValueError(f"sparsedist.fsdp: FSDP asked for a reduce-scatter with {op!r}, but sparsedist.optim.AdamW "
                         f"needs FSDP2's averaging one (fp32 or bf16 gradient reduction, no "
                         f"set_gradient_divide_factor): with a sum FSDP2 may pre-divide the local gradients")


def to_wire(state, slot: Slot, grad: torch.Tensor) -> torch.Tensor:
    """``(numel,)``: the optimizer's update for the slot's parameter from this rank's flat unsharded ``grad``."""
    p = state.params[slot.name]
    return state.optimizer.to_wire(p, grad.reshape(p.shape)).reshape(-1)


def announce(state, layout: ShardLayout, inp: torch.Tensor) -> None:
    """A rank whose gradient is not finite sends nothing, but the optimizer still learns of every parameter (as
    under DDP): ``step()`` expects them, and a skipped step (``GradScaler``) discards them."""
    for slot in layout.slots:
        to_wire(state, slot, layout.gradient(inp, slot))
