"""What every exchange-aware optimizer shares: the contract with the exchange, the dense warm-up, the pending local
gradient, clipping, loss scaling, telemetry and checkpoint state. The update rules live in the subclasses.

A subclass implements four methods, each for one parameter ``p`` with its ``state`` and ``group``:

* ``_dense_update(p, grad, state, group)``: the plain optimizer step on the averaged gradient (warm-up), exactly
  as the corresponding ``torch.optim`` class computes it;
* ``_direction(p, grad, state, group) -> Tensor``: this rank's update direction for its own (unscaled, clipped)
  gradient, computed from the committed state without changing it; the wire carries ``lr * direction``;
* ``_commit(p, grad, state, group)``: advance the state with the same gradient (after the exchange succeeded);
* ``_apply(p, update, group)``: move ``p`` by the averaged update (``p.grad``, in parameter units), plus whatever
  the rule applies outside the wire (AdamW's decoupled weight decay).
"""

from __future__ import annotations

import math
from typing import Any

import torch

try:  # FSDP2's sharded parameters; only needed when they are used
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - old torch
    DTensor = None  # type: ignore[assignment,misc]

from .error_reset import LocalModels

__all__ = ["ExchangeOptimizer", "closure_loss", "is_sharded"]


def is_sharded(t: torch.Tensor) -> bool:
    """True for an FSDP2 (``fully_shard``) parameter or state tensor: a DTensor."""
    return DTensor is not None and isinstance(t, DTensor)


def closure_loss(closure) -> Any:
    """What ``torch.optim`` optimizers do with a closure before stepping: call it with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class ExchangeOptimizer(torch.optim.Optimizer):
    """Base class; see :mod:`sparsedist.optim` for the contract.

    Args:
        params, defaults: as for :class:`torch.optim.Optimizer` (named parameters are accepted and their names
            appear in error messages).
        warmup_steps: optimizer steps with a dense exchange of raw gradients before the sparse phase (int >= 0).
        max_grad_norm: clip gradients to this L2 norm (None: no clipping). Dense phase: the averaged gradient
            (``p.grad``), by the global norm over all parameters, as ``torch.nn.utils.clip_grad_norm_`` would.
            Sparse phase: each rank's local gradient, tensor by tensor, at ``max_grad_norm * sqrt(n_i / N)``
            (``n_i`` the tensor's size, ``N`` all parameters'), so the local global norm stays within
            ``max_grad_norm`` (Lin et al. 2018's local clipping).
        grad_scaler: the ``torch.amp.GradScaler`` in use, if any: the local gradient is unscaled before it
            enters the optimizer state and the wire is rescaled, so ``scaler.step(optimizer)`` (which unscales
            ``p.grad`` and skips non-finite steps) works unchanged.
        error_reset: compute each rank's gradient at its local model, the consensus minus its error-feedback
            residual (:mod:`.error_reset`; default False). Needs an exchange that keeps residuals by parameter
            name and binds them (:meth:`attach_exchange`): the DDP hook or :class:`~.reference.ReferenceExchange`.
        sync_every: with ``error_reset``, :meth:`consolidate` after every ``sync_every``-th sparse step (a dense
            allreduce of the residuals, one call per 25 MB; None: only when called).
    """

    def __init__(self, params, defaults: dict[str, Any], *, warmup_steps: int = 0,
                 max_grad_norm: float | None = None, grad_scaler: Any = None, error_reset: bool = False,
                 sync_every: int | None = None):
        if sync_every is not None and (isinstance(sync_every, bool) or not isinstance(sync_every, int)
                                       or sync_every < 1):
            raise ValueError(f"sync_every must be an int >= 1 (sparse steps between consolidations) or None, got "
                             f"{sync_every!r}")
        if sync_every is not None and not error_reset:
            raise ValueError("sync_every consolidates the local models of error_reset=True; without error reset "
                             "every rank already holds the same parameters: drop sync_every or set error_reset=True")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0 (optimizer steps with a dense exchange), "
                             f"got {warmup_steps!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a number > 0 or None (no clipping), got {max_grad_norm!r}")
        if grad_scaler is not None and not (hasattr(grad_scaler, "get_scale") and hasattr(grad_scaler, "is_enabled")):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        super().__init__(params, defaults)
        self.warmup_steps = warmup_steps
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.grad_scaler = grad_scaler
        self._steps = 0  # completed optimizer steps, dense and sparse (identical on every rank)
        self._pending: dict[torch.Tensor, tuple[torch.Tensor, float]] = {}  # p -> (local gradient, lr on wire)
        self._owner: dict[torch.Tensor, tuple[dict, str]] = {}
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or [f"param_groups[{gi}][{pi}]" for pi in range(len(group["params"]))]
            for p, name in zip(group["params"], names):
                self._owner[p] = (group, name)
        self._numel = sum(p.numel() for p in self._owner)
        self._telemetry = {"dense_steps": 0, "sparse_steps": 0, "lr_changed_after_backward": 0, "consolidations": 0}
        self.error_reset = bool(error_reset)
        self.sync_every = sync_every
        self._local: LocalModels | None = None
        self._local_hook = None

    # -- the contract -------------------------------------------------------------------------------------------
    def exchange_is_dense(self) -> bool:
        """True during the warm-up: the exchange must allreduce the raw gradients densely and average them."""
        return self._steps < self.warmup_steps

    @torch.no_grad()
    def to_wire(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The quantity this rank contributes for ``param``, given its local gradient ``grad``.

        Dense phase: ``grad`` itself. Sparse phase: a new tensor shaped like ``grad``, ``lr * direction`` (times
        the loss scale under a ``grad_scaler``), where ``direction`` is the optimizer's own update direction for
        this rank's gradient; non-finite if ``grad`` is. The exchange adds its error-feedback residual, selects,
        sums over ranks, divides by the world size and writes the result into ``param.grad`` before
        :meth:`step`. Call once per parameter per step; the local gradient is kept until :meth:`step` commits
        it (a skipped step discards it).
        """
        group, name = self._lookup(param)
        if grad.shape != param.shape:
            raise ValueError(f"to_wire({name}): gradient shape {tuple(grad.shape)} differs from the parameter's "
                             f"{tuple(param.shape)}")
        if self.exchange_is_dense():
            return grad
        scale = self._loss_scale()
        # a copy in the parameter's dtype: the exchange overwrites grad (DDP's bucket view) with the result
        g = grad.to(param.dtype, copy=True)
        if scale != 1.0:
            g.div_(scale)
        if self.max_grad_norm is not None:  # a non-finite norm makes g non-finite: the step is then skipped
            limit = self.max_grad_norm * math.sqrt(param.numel() / self._numel)
            g.mul_(torch.clamp(limit / (torch.linalg.vector_norm(g) + 1e-6), max=1.0))
        g = self._gradient_at(param, g, group)
        lr = float(group["lr"])
        self._pending[param] = (g, lr)
        if self._local is not None:  # error reset: back to the consensus once this backward pass is over
            self._local.restore_after_backward()
        wire = self._direction(param, g, self.state[param], group)
        return wire.mul_(lr * scale)

    def attach_exchange(self, named: list[tuple[str, torch.Tensor]], residuals, backend,
                        module: torch.nn.Module) -> None:
        """Called by an exchange that keeps error-feedback residuals by parameter name (the DDP hook,
        :class:`~.reference.ReferenceExchange`): with ``error_reset``, bind them and localise ``module``'s
        parameters before each training forward pass (a forward pre-hook; nothing without ``error_reset``).

        Args:
            named: ``(name, parameter)`` pairs, the same order on every rank.
            residuals: returns the exchange's current residual dictionary (name -> flat fp32 tensor).
            backend: returns the exchange's :class:`~sparsedist.collectives.Backend` (for :meth:`consolidate`).
            module: the module whose forward pass computes the gradients.
        """
        if not self.error_reset:
            return
        if self._local_hook is not None:
            self._local_hook.remove()
        self._local = LocalModels(named, residuals, backend)
        self._local_hook = module.register_forward_pre_hook(lambda mod, args: self._localize())

    def _localize(self) -> None:
        if torch.is_grad_enabled() and not self.exchange_is_dense():  # training forward passes only
            self._local.localize()

    def restore_consensus(self) -> None:
        """With ``error_reset``: put the consensus back into the parameters if they hold the local model (an exchange
        that runs after backward calls it once it has called :meth:`to_wire` for every parameter; inside DDP's
        backward pass this happens by itself at its end, and :meth:`step` does it too)."""
        if self._local is not None:
            self._local.restore()

    def consolidate(self) -> None:
        """With ``error_reset``: make the mean of the ranks' local models the parameters of every rank (a dense
        allreduce of the residuals, one call per 25 MB, after which they are zero). A collective: call it on every
        rank between steps, before evaluating or saving the model (the parameters between steps are the consensus,
        which lacks every rank's pending update). Without ``error_reset`` it does nothing."""
        if not self.error_reset:
            return
        if self._local is None:
            raise RuntimeError(f"{type(self).__name__}(error_reset=True) has no exchange bound: register the "
                               f"sparsedist DDP hook with optimizer=this optimizer, or use a ReferenceExchange")
        self._local.consolidate()
        self._telemetry["consolidations"] += 1

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step on ``p.grad`` as the exchange left it (see :mod:`sparsedist.optim`)."""
        loss = closure_loss(closure)
        dense = self.exchange_is_dense()
        if self.error_reset and not dense and self._local is None:
            raise RuntimeError(f"{type(self).__name__}(error_reset=True): no exchange bound its residuals; error "
                               f"reset runs with the sparsedist DDP hook (register(..., optimizer=opt)), "
                               f"sparsedist.horovod.DistributedOptimizer(opt, model) or a ReferenceExchange, not "
                               f"under FSDP2")
        lr_changed = False
        if dense and self.max_grad_norm is not None:
            with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            if with_grad:
                torch.nn.utils.clip_grad_norm_(with_grad, self.max_grad_norm)
        committed = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse (torch.sparse) gradients "
                                       f"({self._owner[p][1]})")
                state = self.state[p]
                if dense:
                    self._dense_update(p, p.grad, state, group)
                    continue
                if p not in self._pending:
                    raise RuntimeError(
                        f"{type(self).__name__}.step(): parameter {self._owner[p][1]} has a gradient but no exchange "
                        f"produced it (to_wire was not called this step). In the sparse phase p.grad must hold the "
                        f"averaged update written by the exchange: register the sparsedist hook with this optimizer "
                        f"or call a sparsedist.optim.ReferenceExchange after backward")
                g, lr = self._pending.pop(p)
                lr_changed = lr_changed or lr != group["lr"]
                self._commit(p, g, state, group)
                committed.append((p, group))
        self.restore_consensus()  # the averaged update applies to the consensus
        for p, group in committed:
            self._apply(p, p.grad, group)
        self._pending.clear()
        self._steps += 1
        if dense and not self.exchange_is_dense():
            self._unshard_state()
        sparse_done = self._steps - self.warmup_steps
        if not dense and self.sync_every and sparse_done % self.sync_every == 0:
            self.consolidate()
        self._telemetry["dense_steps" if dense else "sparse_steps"] += 1
        self._telemetry["lr_changed_after_backward"] += lr_changed
        return loss

    def kept_gradients(self) -> list[torch.Tensor]:
        """The local gradients :meth:`to_wire` keeps until :meth:`step` (full parameter size, this step's)."""
        return [g for g, _ in self._pending.values()]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As :meth:`torch.optim.Optimizer.zero_grad`; also drops local gradients of a step that never ran."""
        self._pending.clear()
        super().zero_grad(set_to_none=set_to_none)

    # -- telemetry and state ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """``warmup_steps`` (the dense warm-up length), ``warmup_over`` (the sparse phase has begun),
        ``steps`` (completed optimizer steps), ``dense_steps``/``sparse_steps`` (of those, by phase, since
        construction or the last load), ``lr_changed_after_backward`` (sparse steps whose learning rate was set
        between backward and step(): their wire used the previous value), ``error_reset``, ``sync_every`` and
        ``consolidations`` (of the local models, since construction or the last load)."""
        return {"warmup_steps": self.warmup_steps, "warmup_over": not self.exchange_is_dense(), "steps": self._steps,
                "error_reset": self.error_reset, "sync_every": self.sync_every, **self._telemetry}

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (this rank's moments, which differ per rank in the sparse phase) plus the step
        count, warm-up length and error reset. Save one per rank (``sparsedist.checkpoint`` does), after
        ``step()``: with ``error_reset`` the parameters hold a local model between the forward pass and ``step()``."""
        if self._local is not None and self._local.localized:
            raise RuntimeError(f"{type(self).__name__}.state_dict() between the forward pass and step(): with "
                               f"error_reset the parameters now hold this rank's local model, not the consensus; "
                               f"save after step()")
        sd = super().state_dict()
        sd["exchange"] = {"steps": self._steps, "warmup_steps": self.warmup_steps, "error_reset": self.error_reset}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "exchange" not in state_dict:
            raise ValueError(f"{type(self).__name__}.load_state_dict: no 'exchange' entry; this state dict was not "
                             f"written by a sparsedist.optim optimizer (to start from a torch.optim one, load it into "
                             f"a copy with state_dict['exchange'] = {{'steps': N, 'warmup_steps': W}})")
        state_dict = dict(state_dict)
        extra = state_dict.pop("exchange")
        if bool(extra.get("error_reset", False)) != self.error_reset:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the checkpoint was trained with error_reset="
                             f"{bool(extra.get('error_reset', False))} and this optimizer has error_reset="
                             f"{self.error_reset}; build the optimizer with the checkpoint's setting (the residuals "
                             f"mean something different with and without it)")
        super().load_state_dict(state_dict)
        self._steps = int(extra["steps"])
        self.warmup_steps = int(extra["warmup_steps"])
        self._pending.clear()

    # -- helpers ------------------------------------------------------------------------------------------------
    def _unshard_state(self) -> None:
        """At the end of the warm-up, sharded (FSDP2) state becomes full-size local state.

        The warm-up's state of a ``fully_shard`` parameter is sharded like it (a DTensor), identical on every
        rank; the sparse phase advances each rank's state with its own *unsharded* gradient, so every rank needs
        the full tensor. A collective (an all-gather per tensor): every rank's ``step()`` runs it, in parameter
        order. Nothing happens for unsharded parameters.
        """
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                for key, value in list(state.items()):
                    if is_sharded(value):  # a copy: the gathered tensor may be a view of a padded buffer
                        state[key] = value.full_tensor().clone(memory_format=torch.contiguous_format)

    def _lookup(self, param: torch.Tensor) -> tuple[dict, str]:
        try:
            return self._owner[param]
        except KeyError:
            raise KeyError(f"to_wire: this tensor (shape {tuple(param.shape)}) is not a parameter of this "
                           f"{type(self).__name__}; build the optimizer over the model's parameters (e.g. "
                           f"model.named_parameters()) before registering the exchange") from None

    def _loss_scale(self) -> float:
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return 1.0
        return float(self.grad_scaler.get_scale())

    def _gradient_at(self, p, grad, group) -> torch.Tensor:
        """What the rule takes from ``p`` itself, added to this rank's gradient (a copy, changed in place) while
        ``p`` holds the point the gradient was taken at (under error reset the local model, which ``step()`` no
        longer sees). Nothing by default; SGD adds its L2 term."""
        return grad

    def _dense_update(self, p, grad, state, group) -> None:
        raise NotImplementedError

    def _direction(self, p, grad, state, group) -> torch.Tensor:
        raise NotImplementedError

    def _commit(self, p, grad, state, group) -> None:
        raise NotImplementedError

    def _apply(self, p, update, group) -> None:
        raise NotImplementedError
