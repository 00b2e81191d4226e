"""Prune a trained network, then retrain it; one-shot or iterative (Han et al. 2015), with rewinding options.

The timeline, in steps (calls of ``step()``): ``train_steps`` of dense training; then ``rounds`` times: prune,
and retrain for ``retrain_steps``. Round ``r`` (0-based) prunes to density ``d^((r + 1) / rounds)`` of the
final density ``d``, so every round removes the same fraction of the remaining weights. The optimizer's
update is skipped on pruning steps (the step's gradient was taken before the pruning).

What the surviving weights start retraining from (``weights=``):

* ``"keep"`` (Han et al.): the trained values; the optimizer state of pruned weights is zeroed;
* ``"rewind"`` (Frankle et al. 2019/2020): every parameter and buffer is reset to its value after
  ``rewind_step`` steps, the optimizer state is cleared;
* ``"reinit"``: every module is re-initialised (``reset_parameters``, seeded by ``(seed, round)``), the
  optimizer state is cleared: the baseline Han et al. found worse than keeping the weights.

The learning rate (optional, ``lr_schedule``: a function of the step giving a factor of each parameter
group's initial learning rate; do not also use an LR scheduler): during training it is
``lr_schedule(t)``; during retraining ``retrain_lr="rewind"`` replays the schedule from ``rewind_step``
(learning-rate rewinding, Renda et al. 2020), a number ``c`` holds the factor at ``c`` (fine-tuning at a
fixed learning rate, as Han et al. retrain).

Dead neurons (``remove_dead=True``): after each pruning, neurons left with no inputs or no outputs lose their
remaining connections (:func:`~sparsedist.sparsity.neurons.remove_dead_neurons`), so the density can end a
little below the target.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .graph import LayerPair, find_layer_pairs
from .masks import Include, derive_seed
from .neurons import remove_dead_neurons
from .pruning import Pruning

__all__ = ["PruneRetrain", "WEIGHT_RESETS"]

WEIGHT_RESETS = ("keep", "rewind", "reinit")
_REINIT_KEY = 0x2E1A


class PruneRetrain(Pruning):
    """Train, prune, retrain (repeat): Han et al. 2015's recipe as a mask provider.

    Args:
        model, optimizer: as for :class:`~sparsedist.sparsity.base.MaskedSparsity`.
        sparsity: final fraction of the sparsified weights pruned, in [0, 1).
        train_steps: dense training steps before the first pruning (>= 1).
        retrain_steps: retraining steps after each pruning (>= 1).
        rounds: 1 (one-shot, default) or more (iterative).
        budget, score: see :class:`~sparsedist.sparsity.pruning.Pruning` (default: one global magnitude
            threshold).
        weights: ``"keep"`` (default), ``"rewind"`` or ``"reinit"`` (module documentation).
        rewind_step: the step whose weights ``"rewind"`` restores and where ``retrain_lr="rewind"`` restarts
            the learning-rate schedule (0 <= rewind_step <= train_steps; default 0).
        lr_schedule: ``None`` (the learning rate is left alone) or ``f(step) -> factor``.
        retrain_lr: ``"rewind"`` (default) or a number: the factor during retraining.
        remove_dead: remove dead neurons after each pruning (default True; needs ``layer_pairs`` or a model
            ``torch.fx`` can trace).
        layer_pairs: which layer feeds which (default: :func:`~sparsedist.sparsity.graph.find_layer_pairs`).
        score_window: ``"taylor"``: steps of ``|w * g|`` averaged before each pruning (default 100).
        include, seed, process_group: as for :class:`~sparsedist.sparsity.base.MaskedSparsity`.
    """

    _skip_update_on_mask_step = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sparsity: float, *, train_steps: int,
                 retrain_steps: int, rounds: int = 1, budget: str | Mapping[str, float] = "global",
                 score: str = "magnitude", weights: str = "keep", rewind_step: int = 0,
                 lr_schedule: Callable[[int], float] | None = None, retrain_lr: str | float = "rewind",
                 remove_dead: bool = True, layer_pairs: Sequence[LayerPair] | None = None, score_window: int = 100,
                 include: Include = None, seed: int = 0, process_group: Any = None) -> None:
        for name, v, low in (("train_steps", train_steps, 1), ("retrain_steps", retrain_steps, 1),
                             ("rounds", rounds, 1), ("rewind_step", rewind_step, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (final fraction of weights pruned), got {sparsity!r}")
        if weights not in WEIGHT_RESETS:
            raise ValueError(f"unknown weights={weights!r}; use one of {WEIGHT_RESETS}")
        if rewind_step > train_steps:
            raise ValueError(f"rewind_step ({rewind_step}) must be <= train_steps ({train_steps}): weights are "
                             f"rewound to a step of the first training")
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError(f"lr_schedule must be None or a function step -> factor, got {type(lr_schedule).__name__}")
        if retrain_lr != "rewind" and (not isinstance(retrain_lr, (int, float)) or retrain_lr < 0):
            raise ValueError(f"retrain_lr must be 'rewind' or a factor >= 0, got {retrain_lr!r}")
        self.sparsity = float(sparsity)
        self.train_steps, self.retrain_steps, self.rounds = train_steps, retrain_steps, rounds
        self.weights, self.rewind_step = weights, rewind_step
        self.lr_schedule, self.retrain_lr = lr_schedule, retrain_lr
        self._model = model
        self._base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self._snapshot: dict[str, torch.Tensor] | None = None
        self.dead_neurons: dict[str, int] = {}
        self._pairs: list[LayerPair] = []
        if remove_dead and layer_pairs is not None:
            self._pairs = list(layer_pairs)
        elif remove_dead:
            try:
                self._pairs = find_layer_pairs(model)
            except ValueError as exc:
                raise ValueError(f"remove_dead=True needs to know which layer feeds which: {exc}; or pass "
                                 f"remove_dead=False") from exc
        super().__init__(model, optimizer, budget=budget, score=score, score_window=score_window, include=include,
                         seed=seed, process_group=process_group)
        if rewind_step == 0 and weights == "rewind":
            self._take_snapshot()

    @property
    def total_steps(self) -> int:
        """``train_steps + rounds * retrain_steps``."""
        return self.train_steps + self.rounds * self.retrain_steps

    def prune_steps(self) -> list[int]:
        return [self.train_steps + r * self.retrain_steps for r in range(self.rounds)]

    def target_density(self, step: int) -> float:
        r = self.prune_steps().index(step)
        return (1.0 - self.sparsity) ** ((r + 1) / self.rounds)

    def lr_factor(self, step: int) -> float | None:
        """The learning-rate factor at ``step`` (None without ``lr_schedule``)."""
        if self.lr_schedule is None:
            return None
        if step < self.train_steps:
            return float(self.lr_schedule(step))
        if self.retrain_lr != "rewind":
            return float(self.retrain_lr)
        since = (step - self.train_steps) % self.retrain_steps if step < self.total_steps else \
            step - self.prune_steps()[-1]
        return float(self.lr_schedule(self.rewind_step + since))

    # -- training loop ---------------------------------------------------------------------------------
    def step(self) -> None:
        super().step()
        if self.weights == "rewind" and self._step == self.rewind_step and self._snapshot is None:
            self._take_snapshot()

    def _before_update(self, step: int) -> None:
        factor = self.lr_factor(step)
        if factor is not None:
            for group, base in zip(self._optimizer.param_groups, self._base_lrs):
                group["lr"] = base * factor
        super()._before_update(step)

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        self._snapshot = {k: v.detach().clone() for k, v in self._model.state_dict().items()}

    @torch.no_grad()
    def _update_masks(self, step: int, grads: list[torch.Tensor | None]) -> None:
        r = self.prune_steps().index(step)
        changed = self._prune_to(step, self.target_density(step), grads)
        if self.weights != "keep":
            if self.weights == "rewind":
                if self._snapshot is None:
                    raise RuntimeError(f"no weights to rewind to: step {self.rewind_step} was never reached")
                self._model.load_state_dict(self._snapshot)
            else:
                devices = sorted({p.device.index or 0 for p in self._model.parameters() if p.is_cuda})
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(derive_seed(self.seed, _REINIT_KEY, r))
                    for m in self._model.modules():
                        if m is not self._model and callable(getattr(m, "reset_parameters", None)):
                            m.reset_parameters()
            self._optimizer.state.clear()
            self.apply_masks()
        if self._pairs:
            new, self.dead_neurons = remove_dead_neurons(self._model, self.masks, self._pairs)
            for i, name in enumerate(self._names):
                changed |= self._shrink_mask(i, new[name])
        if changed:
            self._mask_version += 1
        self.verify_masks()

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """:class:`~sparsedist.sparsity.pruning.Pruning`'s state, the rewind snapshot (names of
        ``model.state_dict()``) and the initial learning rates."""
        state = super().state_dict()
        state["snapshot"] = None if self._snapshot is None else {k: v.clone() for k, v in self._snapshot.items()}
        state["base_lrs"] = list(self._base_lrs)
        state["dead_neurons"] = dict(self.dead_neurons)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        snap = state.get("snapshot")
        if snap is not None:
            own = self._model.state_dict()
            if set(snap) != set(own):
                raise ValueError(f"the rewind snapshot names {sorted(set(snap) ^ set(own))[:6]} that this model "
                                 f"does not have (or lacks them); build the model as when saving")
            snap = {k: v.to(own[k].device) for k, v in snap.items()}
        self._snapshot = snap
        if "base_lrs" in state:
            self._base_lrs = [float(x) for x in state["base_lrs"]]
        self.dead_neurons = dict(state.get("dead_neurons", {}))

    def _describe(self) -> str:
        return (f"sparsity={self.sparsity}, rounds={self.rounds}, weights={self.weights!r}, "
                + super()._describe())
