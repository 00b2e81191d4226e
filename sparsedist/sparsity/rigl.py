"""Sparse training with masks: static sparsity -> SET -> RigL (Evci et al. 2020, "Rigging the Lottery").

A short hierarchy in the style of jaxpruner's ``sparse_trainers.py``:

* :class:`StaticSparsity`: random masks with exact per-layer counts (uniform or ERK), never updated.
* :class:`SET` (Mocanu et al. 2018): every ``update_every`` steps until ``stop_at * total_steps``, each layer
  drops the ``n = floor(f * n_active)`` active weights of smallest ``|w|`` and grows ``n`` positions drawn at
  random among those not kept.
* :class:`RigL`: the same, but growth picks the ``n`` largest ``|dense gradient|``. It only overrides how
  growth is scored.

Usage (the optimizer is hooked; call order matters)::

    rigl = RigL(model, optimizer, density=0.1, distribution="erk", update_every=100,
                drop_fraction=0.3, stop_at=0.75, total_steps=T)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        rigl.step()

What the optimizer hooks do (``optimizer.register_step_pre_hook`` / ``register_step_post_hook``):

* ordinary step: before the optimizer runs, the gradients of sparsified weights are zeroed outside the mask
  (so momentum and Adam moments never accumulate there); after it runs, the weights are set to exactly 0
  outside the mask (so weight decay, or the momentum of a weight dropped earlier, cannot move them).
* mask-update step (SET/RigL): before the optimizer runs, the masks are updated from the current weights
  and gradients, and every gradient of the optimizer's parameters is hidden (set to ``None``) so that the
  optimizer skips them all: no weight moves and no optimizer state advances (Adam's step count included),
  as in the reference implementation, which skips ``apply_gradients`` on those steps. The gradients are put
  back right after. ``step()`` then only advances the step counter. If ``optimizer.step()`` was not called
  for that step (e.g. ``GradScaler`` skipped it on overflow), ``step()`` performs the update itself from
  ``param.grad``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .distributions import layer_counts
from .masks import Include, apply_mask_, derive_seed, mask_checksum, random_mask, select_parameters, top_n
from .schedules import UpdateSchedule

__all__ = ["StaticSparsity", "SET", "RigL"]

_INIT_KEY = 0x1417  # domain separation for derive_seed: initial masks
_GROW_KEY = 0x6A0E  # SET's random growth scores


class StaticSparsity:
    """Fixed random sparsity: exact per-layer active counts, weights outside the mask kept at exactly zero.

    Args:
        model: the module whose parameters are sparsified. It may be a ``DistributedDataParallel`` wrapper;
            mask names are then those of the wrapper (``"module.fc1.weight"``).
        optimizer: the ``torch.optim.Optimizer`` that trains ``model``; it is hooked (see module docs).
        density: global fraction of sparsified weights kept, in (0, 1] (sparsity = 1 - density).
        distribution: ``"erk"`` (default), ``"uniform"``, or a dict parameter name -> density.
        include: which parameters are sparsified. ``None``: the ``weight`` of every Linear, Bilinear,
            Conv*/ConvTranspose*, Embedding and EmbeddingBag module (not biases, norms, or anything else).
            Or a callable ``(name, param) -> bool``, or a list of names from ``model.named_parameters()``.
        seed: seeds the initial masks (and SET's growth); must be the same on every rank.
        process_group: group over which masks are verified (and RigL's gradients averaged when the model is
            not wrapped in DDP); default: the default group when ``torch.distributed`` is initialised.

    Construct it on every rank, after the model's parameters exist and before training; when resuming,
    construct it first, then load the model's, the optimizer's and this object's state dicts.
    """

    #: whether growth needs the dense (averaged) gradient on update steps
    _uses_gradient = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        density: float = 0.1,
        distribution: str | Mapping[str, float] = "erk",
        *,
        include: Include = None,
        seed: int = 0,
        process_group: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (it is hooked to keep masked weights at "
                            f"zero), got {type(optimizer).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        pairs = select_parameters(model, include)
        self._names = [n for n, _ in pairs]
        self._params = [p for _, p in pairs]
        shapes = {n: tuple(p.shape) for n, p in pairs}
        counts = layer_counts(shapes, density, distribution)
        self.density = float(density)
        self.distribution = distribution
        self.seed = seed
        self._counts = dict(counts)
        self._masks = [
            random_mask(p.shape, counts[n], derive_seed(seed, _INIT_KEY, i), p.device)
            for i, (n, p) in enumerate(pairs)
        ]
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
        """Parameter name -> number of active weights (constant during training)."""
        return dict(self._counts)

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
        so this is the whole RNG state), mask version and, for SET/RigL, the update schedule."""
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
                f"({active}/{total}), distribution={self.distribution!r}, step={self._step})")

    # -- hooks -----------------------------------------------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        t = self._step
        if self._update_due(t):
            stash = []
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        stash.append((p, p.grad))
            if self._updated_at != t:
                self._update_masks(t, [p.grad for p in self._params])
                self._updated_at = t
            for p, _ in stash:  # hide all gradients: the optimizer skips every parameter this step
                p.grad = None
            self._stash = stash
            return
        with torch.no_grad():
            for p, m in zip(self._params, self._masks):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError(f"parameter {self._names[self._params.index(p)]!r} has a sparse gradient "
                                    f"(e.g. nn.Embedding(sparse=True)), which masked training does not support")
                g.masked_fill_(~m, 0)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._stash is not None:
            for p, g in self._stash:
                p.grad = g
            self._stash = None
        self.apply_masks()

    # -- overridden by subclasses ----------------------------------------------------------------------
    def _update_due(self, step: int) -> bool:
        return False

    def _update_masks(self, step: int, grads: list[torch.Tensor | None]) -> None:
        raise NotImplementedError(f"{type(self).__name__} never updates its masks")


class SET(StaticSparsity):
    """Sparse Evolutionary Training: drop the smallest-magnitude active weights, regrow at random.

    Args (in addition to :class:`StaticSparsity`'s):
        update_every: ``Delta T``, steps between mask updates (default 100).
        drop_fraction: ``alpha``, the initial drop fraction (default 0.3).
        stop_at: no mask update at or after step ``floor(stop_at * total_steps)`` (default 0.75).
        total_steps: number of training steps (calls of :meth:`step`); required.
        drop_fraction_anneal: ``"cosine"`` (default; ``f(t) = alpha/2 (1 + cos(pi t / T_end))``) or
            ``"constant"``.

    At an update step ``t`` each layer with ``n_active`` active weights drops the ``n = floor(f(t) * n_active)``
    of smallest ``|w|`` and grows ``n`` among the positions not kept (a just-dropped position may be chosen
    again; it then keeps its weight and optimizer state). Newly grown weights start at exactly 0 and every
    optimizer state tensor of the parameter's shape (SGD momentum, Adam's ``exp_avg``/``exp_avg_sq``, ...) is
    zeroed at their positions. The optimizer's update is skipped on update steps (as jaxpruner's SET does;
    the original TF SET applied it). Growth scores here are uniform random numbers from a generator seeded by
    ``(seed, step, layer)``: identical on every rank. Ties are broken towards the lower flat index.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        density: float = 0.1,
        distribution: str | Mapping[str, float] = "erk",
        *,
        update_every: int = 100,
        drop_fraction: float = 0.3,
        stop_at: float = 0.75,
        total_steps: int | None = None,
        drop_fraction_anneal: str = "cosine",
        include: Include = None,
        seed: int = 0,
        process_group: Any = None,
    ) -> None:
        if total_steps is None:
            raise ValueError(f"{type(self).__name__} needs total_steps=, the number of training steps (calls of "
                             f"step()); masks stop changing at stop_at * total_steps")
        self.schedule = UpdateSchedule.from_training(update_every, stop_at, total_steps, drop_fraction,
                                                     drop_fraction_anneal)
        super().__init__(model, optimizer, density, distribution, include=include, seed=seed,
                         process_group=process_group)

    def drop_fraction(self, step: int) -> float:
        """The drop fraction ``f(step)``."""
        return self.schedule.drop_fraction(step)

    def _update_due(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    def _grow_scores(self, index: int, param: torch.Tensor, grad: torch.Tensor | None, step: int) -> torch.Tensor:
        """Flat float scores (higher = grown first) over all positions of ``param``. SET: uniform random."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, _GROW_KEY, step, index))
        return torch.rand(param.numel(), generator=gen).to(param.device)

    def _prepare_gradients(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return grads

    @torch.no_grad()
    def _update_masks(self, step: int, grads: list[torch.Tensor | None]) -> None:
        f = self.schedule.drop_fraction(step)
        grads = self._prepare_gradients(grads)
        changed = False
        for i, (name, p, m) in enumerate(zip(self._names, self._params, self._masks)):
            n_active = self._counts[name]
            n = int(math.floor(f * n_active))
            if n == 0:
                continue
            old = m.reshape(-1)
            neg_inf = torch.tensor(float("-inf"), device=p.device)
            # Drop: keep the n_active - n largest |w| among the active positions.
            drop_score = torch.where(old, p.detach().reshape(-1).abs().float(), neg_inf)
            kept = torch.zeros_like(old)
            kept[top_n(drop_score, n_active - n)] = True
            # Grow: the n best-scored positions among those not kept (just-dropped ones included).
            score = self._grow_scores(i, p, grads[i], step).to(device=p.device, dtype=torch.float32)
            score = torch.nan_to_num(score, nan=0.0, posinf=torch.finfo(torch.float32).max)
            score = torch.where(kept, neg_inf, score)
            new = kept.clone()
            new[top_n(score, n)] = True
            new = new.view_as(m)
            if torch.equal(new, m):
                continue
            grown = new & ~m  # new connections (not active before this update)
            p.data.masked_fill_(grown, 0)  # grown weights start at zero
            for v in self._optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.masked_fill_(grown, 0)  # fresh optimizer slots for grown weights
            m.copy_(new)
            apply_mask_(p.data, m)
            changed = True
        if changed:
            self._mask_version += 1
        self.verify_masks()


class RigL(SET):
    """RigL: like :class:`SET`, but grow the positions with the largest ``|dense gradient|``.

    Args (in addition to :class:`SET`'s):
        average_gradients: average the gradients over ``process_group`` before scoring. ``None`` (default):
            only when ``torch.distributed`` is initialised with more than one rank and ``model`` is not a
            ``DistributedDataParallel`` wrapper (whose gradients are already averaged). Pass ``False`` if you
            average gradients yourself.

    The dense gradient is only needed on update steps (:meth:`needs_dense_gradient`); elsewhere the
    gradients of inactive positions are ignored (zeroed before the optimizer runs).
    """

    _uses_gradient = True

    def __init__(self, *args: Any, average_gradients: bool | None = None, **kwargs: Any) -> None:
        if average_gradients is not None and not isinstance(average_gradients, bool):
            raise TypeError(f"average_gradients must be None, True or False, got {average_gradients!r}")
        self._average_gradients = average_gradients
        super().__init__(*args, **kwargs)

    def _grow_scores(self, index: int, param: torch.Tensor, grad: torch.Tensor | None, step: int) -> torch.Tensor:
        if grad is None:
            return torch.zeros(param.numel(), device=param.device)
        if grad.is_sparse:
            grad = grad.to_dense()
        return grad.detach().reshape(-1).abs()

    def _should_average(self) -> bool:
        if self._average_gradients is not None:
            return self._average_gradients and dist.is_available() and dist.is_initialized()
        return (dist.is_available() and dist.is_initialized() and dist.get_world_size(self._group) > 1
                and not self._is_ddp)

    def _prepare_gradients(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        if not self._should_average():
            return grads
        device = self._params[0].device
        flat = torch.cat([
            (g.to_dense() if g is not None and g.is_sparse else g).detach().reshape(-1).to(device, torch.float32)
            if g is not None else torch.zeros(p.numel(), device=device)
            for g, p in zip(grads, self._params)
        ])
        dist.all_reduce(flat, group=self._group)
        flat /= dist.get_world_size(self._group)
        return [t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in self._params]), self._params)]
