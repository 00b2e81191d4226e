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

The optimizer hooks, the mask-provider protocol, verification and state dicts live in
:class:`~sparsedist.sparsity.base.MaskedSparsity`, the root these three share with the pruning methods.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .base import MaskedSparsity
from .distributions import layer_counts
from .masks import Include, apply_mask_, derive_seed, random_mask, top_n
from .schedules import UpdateSchedule

__all__ = ["StaticSparsity", "SET", "RigL"]

_INIT_KEY = 0x1417  # domain separation for derive_seed: initial masks
_GROW_KEY = 0x6A0E  # SET's random growth scores


class StaticSparsity(MaskedSparsity):
    """Fixed random sparsity: exact per-layer active counts, weights outside the mask kept at exactly zero.

    Args:
        model: the module whose parameters are sparsified. It may be a ``DistributedDataParallel`` wrapper;
            mask names are then those of the wrapper (``"module.fc1.weight"``).
        optimizer: the ``torch.optim.Optimizer`` that trains ``model``; it is hooked (see
            :mod:`sparsedist.sparsity.base`).
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
    The per-layer active counts (:attr:`layer_counts`) stay constant during training.
    """

    _skip_update_on_mask_step = True

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
        self.density = float(density)
        self.distribution = distribution
        super().__init__(model, optimizer, include=include, seed=seed, process_group=process_group)

    def _initial_masks(self, pairs: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
        counts = layer_counts({n: tuple(p.shape) for n, p in pairs}, self.density, self.distribution)
        return [random_mask(p.shape, counts[n], derive_seed(self.seed, _INIT_KEY, i), p.device)
                for i, (n, p) in enumerate(pairs)]

    def _describe(self) -> str:
        return f"distribution={self.distribution!r}, "


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
