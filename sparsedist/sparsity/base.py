"""The root of the model-sparsity hierarchy: masks kept on a model's weights through an optimizer's hooks.

:class:`MaskedSparsity` holds one boolean mask per sparsified weight and keeps the weights at exactly zero
outside it; subclasses only decide the initial masks and when and how the masks change:

* sparse from scratch (:mod:`.rigl`): :class:`StaticSparsity` -> :class:`SET` -> :class:`RigL`;
* pruning (:mod:`.gmp`, :mod:`.prune_retrain`): gradual magnitude pruning and prune-retrain start dense and
  only ever remove weights.

What the optimizer hooks do (``optimizer.register_step_pre_hook`` / ``register_step_post_hook``):

* ordinary step: before the optimizer runs, the gradients of sparsified weights are zeroed outside the mask
  (so momentum and Adam moments never accumulate there); after it runs, the weights are set to exactly 0
  outside the mask (so weight decay, or the momentum of a weight dropped earlier, cannot move them).
* mask-update step: before the optimizer runs, the masks are updated from the current weights and gradients.
  Subclasses with ``_skip_update_on_mask_step`` (SET, RigL, prune-retrain) then hide every gradient of the
  optimizer's parameters (set to ``None``) so that the optimizer skips them all: no weight moves and no
  optimizer state advances (Adam's step count included), as RigL's reference implementation skips
  ``apply_gradients`` on those steps; the gradients are put back right after. The others (gradual magnitude
  pruning) let the optimizer step with the gradients masked by the new masks. If ``optimizer.step()`` was
  not called for that step (e.g. ``GradScaler`` skipped it on overflow), ``step()`` updates the masks itself.

Every subclass implements the mask-provider protocol that sparsedist's DDP hook consumes for mask-aware
exchange: ``mask_of(param)``, ``needs_dense_gradient()``, ``mask_version``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .masks import Include, apply_mask_, mask_checksum, select_parameters

__all__ = ["MaskedSparsity"]


class MaskedSparsity:
    """Masks on a model's weights, enforced through the optimizer; the base of every sparsity method.

    Args:
        model: the module whose parameters are sparsified. It may be a ``DistributedDataParallel`` wrapper;
            mask names are then those of the wrapper (``"module.fc1.weight"``).
        optimizer: the ``torch.optim.Optimizer`` that trains ``model``; it is hooked (see module docs).
        include: which parameters are sparsified. ``None``: the ``weight`` of every Linear, Bilinear,
            Conv*/ConvTranspose*, Embedding and EmbeddingBag module (not biases, norms, or anything else).
            Or a callable ``(name, param) -> bool``, or a list of names from ``model.named_parameters()``.
        seed: seeds every random choice (keyed by ``(seed, step, layer)``); must be the same on every rank.
        process_group: group over which masks are verified (and gradients averaged where a subclass needs
            it); default: the default group when ``torch.distributed`` is initialised.

    Subclasses set their own attributes, then call this ``__init__``, which asks :meth:`_initial_masks` for
    the masks, hooks the optimizer, zeroes the weights outside the masks and verifies the masks across ranks.
    """

    #: whether mask updates need the dense (averaged) gradient, so the exchange must carry it on update steps
    _uses_gradient = False
    #: whether the optimizer's update is skipped on mask-update steps
    _skip_update_on_mask_step = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, include: Include = None,
                 seed: int = 0, process_group: Any = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (it is hooked to keep masked weights at "
                            f"zero), got {type(optimizer).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        pairs = select_parameters(model, include)
        self._names = [n for n, _ in pairs]
        self._params = [p for _, p in pairs]
        self.seed = seed
        self._masks = self._initial_masks(pairs)
        self._counts = {n: int(m.sum()) for n, m in zip(self._names, self._masks)}
        self._by_id = {id(p): m for p, m in zip(self._params, self._masks)}
        self._is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self._group = process_group
        self._optimizer = optimizer
        self._step = 0
        self._mask_version = 0
        self._updated_at: int | None = None  # step whose mask update already ran inside optimizer.step()
        self._stash: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        self.apply_masks()
        self.verify_masks()

    # -- mask provider protocol (consumed by sparsedist's DDP hook) --------------------------------------
    def mask_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The live bool mask (``param``'s shape and device) if ``param`` (by identity) is sparsified, else None."""
        return self._by_id.get(id(param))

    def needs_dense_gradient(self) -> bool:
        """True iff the current step (the backward running now, before ``step()``) updates the masks from the
        dense gradient, so gradient exchange must carry the full dense gradient. Always False for static
        sparsity and SET, and outside RigL's update window."""
        return self._uses_gradient and self._update_due(self._step)

    @property
    def mask_version(self) -> int:
        """Incremented every time any mask changes (update or ``load_state_dict``)."""
        return self._mask_version

    # -- public state ----------------------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name (as in ``model.named_parameters()`` of the model passed in) -> live bool mask.

        The tensors are updated in place; do not modify them."""
        return dict(zip(self._names, self._masks))

    @property
    def layer_counts(self) -> dict[str, int]:
        """Parameter name -> number of active weights."""
        return dict(self._counts)

    @property
    def active_fraction(self) -> float:
        """Current fraction of sparsified weights that are active (the density now)."""
        return sum(self._counts.values()) / sum(p.numel() for p in self._params)

    @property
    def step_count(self) -> int:
        """Number of completed training steps (calls of :meth:`step`)."""
        return self._step

    def is_update_step(self, step: int) -> bool:
        """True iff masks are updated at (0-based) ``step``."""
        return self._update_due(step)

    # -- training loop ---------------------------------------------------------------------------------
    def step(self) -> None:
        """Finish the current training step; call it once per step, after ``optimizer.step()``."""
        t = self._step
        if self._update_due(t) and self._updated_at != t:
            self._update_masks(t, [p.grad for p in self._params])
            self._updated_at = t
        self._step += 1

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set every sparsified weight to exactly 0 outside its mask (done after every optimizer step)."""
        for p, m in zip(self._params, self._masks):
            apply_mask_(p.data, m)

    def remove(self) -> None:
        """Detach the optimizer hooks (masks are no longer enforced)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def verify_masks(self) -> None:
        """Compare a fingerprint of every mask (and the step counter) across ranks; raise on divergence.

        A no-op unless ``torch.distributed`` is initialised with more than one rank. One small all_gather
        (3 int64 per layer); every rank sees the same gathered data, so all ranks raise together, and the
        wait is bounded by the process group's timeout.

        Raises:
            RuntimeError: naming the first layer whose mask differs and the ranks involved.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(self._group)
        if world <= 1:
            return
        device = self._masks[0].device
        rows = [torch.tensor([self._step, len(self._masks), 0], dtype=torch.long, device=device)]
        rows += [mask_checksum(m).to(device) for m in self._masks]
        local = torch.stack(rows)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=self._group)
        ref = gathered[0]
        for r in range(1, world):
            if torch.equal(gathered[r], ref):
                continue
            bad = int((gathered[r] != ref).any(dim=1).nonzero()[0])
            if bad == 0:
                raise RuntimeError(
                    f"{type(self).__name__}: ranks are at different steps ({int(ref[0, 0])} on rank 0, "
                    f"{int(gathered[r][0, 0])} on rank {r}) or hold different layers; call step() exactly once "
                    f"per training step on every rank")
            name = self._names[bad - 1]
            raise RuntimeError(
                f"{type(self).__name__} masks differ across ranks at step {self._step}: layer {name!r} has "
                f"{int(gathered[r][bad, 0])} active weights (fingerprint {gathered[r][bad].tolist()}) on rank "
                f"{r} but {int(ref[bad, 0])} (fingerprint {ref[bad].tolist()}) on rank 0. Masks must be "
                f"computed from identical weights and averaged gradients: wrap the model in "
                f"DistributedDataParallel (or let RigL average gradients), use the same seed on every rank, "
                f"and never modify masks by hand.")

    def state_dict(self) -> dict[str, Any]:
        """Masks (name -> bool tensor, cloned), step counter, seed (all randomness is keyed by (seed, step),
        so this is the whole RNG state), mask version and, where a subclass has one, its schedule."""
        state = {
            "kind": type(self).__name__,
            "step": self._step,
            "seed": self.seed,
            "mask_version": self._mask_version,
            "masks": {n: m.clone() for n, m in zip(self._names, self._masks)},
        }
        schedule = getattr(self, "schedule", None)
        if schedule is not None:
            state["schedule"] = schedule.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; weights outside the loaded masks are set to zero.

        Raises:
            ValueError: missing keys, or masks whose names or shapes do not match this model's.
        """
        missing = [k for k in ("step", "seed", "masks") if k not in state]
        if missing:
            raise ValueError(f"state dict lacks {missing}; pass what {type(self).__name__}.state_dict() returned")
        masks = state["masks"]
        if set(masks) != set(self._names):
            raise ValueError(f"mask names differ: checkpoint lacks {sorted(set(self._names) - set(masks))}, has "
                             f"unknown {sorted(set(masks) - set(self._names))}; build the model (DDP-wrapped "
                             f"or not) and include= exactly as when saving")
        for n, m in zip(self._names, self._masks):
            if tuple(masks[n].shape) != tuple(m.shape):
                raise ValueError(f"mask {n!r} has shape {tuple(masks[n].shape)} in the checkpoint but the "
                                 f"parameter has shape {tuple(m.shape)}")
        for n, m in zip(self._names, self._masks):
            m.copy_(masks[n].to(device=m.device, dtype=torch.bool))
            self._counts[n] = int(m.sum())
        self._step = int(state["step"])
        self.seed = int(state["seed"])
        if "schedule" in state and getattr(self, "schedule", None) is not None:
            self.schedule.load_state_dict(dict(state["schedule"]))
        self._mask_version = max(self._mask_version, int(state.get("mask_version", 0))) + 1
        self._updated_at = None
        self._stash = None
        self.apply_masks()

    def __repr__(self) -> str:
        total = sum(p.numel() for p in self._params)
        active = sum(self._counts.values())
        return (f"{type(self).__name__}(layers={len(self._params)}, density={active / total:.4f} "
                f"({active}/{total}), {self._describe()}step={self._step})")

    # -- hooks -----------------------------------------------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        t = self._step
        self._before_update(t)
        if self._update_due(t):
            stash = []
            if self._skip_update_on_mask_step:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            stash.append((p, p.grad))
            if self._updated_at != t:
                self._update_masks(t, [p.grad for p in self._params])
                self._updated_at = t
            if self._skip_update_on_mask_step:
                for p, _ in stash:  # hide all gradients: the optimizer skips every parameter this step
                    p.grad = None
                self._stash = stash
                return
        with torch.no_grad():
            for name, p, m in zip(self._names, self._params, self._masks):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError(f"parameter {name!r} has a sparse gradient "
                                    f"(e.g. nn.Embedding(sparse=True)), which masked training does not support")
                g.masked_fill_(~m, 0)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._stash is not None:
            for p, g in self._stash:
                p.grad = g
            self._stash = None
        self.apply_masks()

    @torch.no_grad()
    def _shrink_mask(self, index: int, keep: torch.Tensor) -> bool:
        """Prune mask ``index`` to ``keep`` (a bool tensor of its shape, a subset of it): the weights and every
        optimizer state tensor of the parameter's shape (SGD momentum, Adam's moments) become exactly zero at
        the removed positions. Returns whether the mask changed; the caller bumps the mask version."""
        m, p = self._masks[index], self._params[index]
        keep = keep & m
        if torch.equal(keep, m):
            return False
        removed = m & ~keep
        for v in self._optimizer.state.get(p, {}).values():
            if torch.is_tensor(v) and v.shape == p.shape:
                v.masked_fill_(removed, 0)
        m.copy_(keep)
        self._counts[self._names[index]] = int(m.sum())
        apply_mask_(p.data, m)
        return True

    # -- overridden by subclasses ----------------------------------------------------------------------
    def _initial_masks(self, pairs: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
        """The masks at construction, one bool tensor per selected parameter (default: every weight active)."""
        return [torch.ones_like(p, dtype=torch.bool) for _, p in pairs]

    def _describe(self) -> str:
        return ""

    def _before_update(self, step: int) -> None:
        """Called at the start of every optimizer step (before any mask update), with the step's gradients."""

    def _update_due(self, step: int) -> bool:
        return False

    def _update_masks(self, step: int, grads: list[torch.Tensor | None]) -> None:
        raise NotImplementedError(f"{type(self).__name__} never updates its masks")
