"""The common part of the pruning methods: start dense, and at scheduled steps keep the best-scored weights.

:class:`Pruning` sits beside :class:`~sparsedist.sparsity.rigl.StaticSparsity` under
:class:`~sparsedist.sparsity.base.MaskedSparsity`; :class:`~sparsedist.sparsity.gmp.GradualMagnitudePruning`
and :class:`~sparsedist.sparsity.prune_retrain.PruneRetrain` only say when they prune and to which density.
Scores and budgets are those of :mod:`.scores`. For ``score="taylor"`` the scores are ``|w * g|`` averaged
over the ``score_window`` steps up to and including each pruning step (the gradient of every optimizer step
in that window, read before the update: with DDP it is the averaged gradient, identical on every rank).
"""

from __future__ import annotations

import bisect
from typing import Any, Mapping

import torch
from torch import nn

from .base import MaskedSparsity
from .masks import Include
from .scores import BUDGETS, SCORES, check_choice, prune_masks, weight_scores

__all__ = ["Pruning"]


class Pruning(MaskedSparsity):
    """Masks that start full and only shrink, pruned at :meth:`prune_steps` to :meth:`target_density`.

    Args (in addition to :class:`~sparsedist.sparsity.base.MaskedSparsity`'s):
        budget: how the density is split over layers: ``"uniform"``, ``"erk"``, ``"global"`` (one
            threshold over all layers) or a dict parameter name -> density.
        score: ``"magnitude"`` (``|w|``), ``"taylor"`` (``|w * g|``) or ``"random"``.
        score_window: ``"taylor"``: number of steps whose ``|w * g|`` is averaged (>= 1).

    :meth:`needs_dense_gradient` is True on pruning steps: with mask-aware exchange the hook then sends the
    full gradient, which also carries (flushes) the error-feedback residuals kept on the old active set
    before that set shrinks.
    """

    _skip_update_on_mask_step = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 budget: str | Mapping[str, float] = "uniform", score: str = "magnitude", score_window: int = 100,
                 include: Include = None, seed: int = 0, process_group: Any = None) -> None:
        if isinstance(budget, str):
            check_choice("budget", budget, BUDGETS)
        elif not isinstance(budget, Mapping):
            raise TypeError(f"budget must be one of {BUDGETS} or a dict parameter name -> density, got "
                            f"{type(budget).__name__}")
        check_choice("score", score, SCORES)
        if not isinstance(score_window, int) or isinstance(score_window, bool) or score_window < 1:
            raise ValueError(f"score_window must be an int >= 1 (steps of |w * g| averaged), got {score_window!r}")
        self.budget = budget
        self.score = score
        self.score_window = score_window
        self._taylor: dict[str, torch.Tensor] = {}
        self._taylor_steps = 0
        super().__init__(model, optimizer, include=include, seed=seed, process_group=process_group)

    # -- what subclasses define ------------------------------------------------------------------------
    def prune_steps(self) -> list[int]:
        """Every step at which the masks are pruned, in increasing order."""
        raise NotImplementedError

    def target_density(self, step: int) -> float:
        """The global density the masks are pruned to at pruning step ``step``."""
        raise NotImplementedError

    # -- protocol --------------------------------------------------------------------------------------
    def needs_dense_gradient(self) -> bool:
        """True on pruning steps (see the class documentation)."""
        return self._update_due(self._step)

    def _update_due(self, step: int) -> bool:
        steps = self._steps()
        i = bisect.bisect_left(steps, step)
        return i < len(steps) and steps[i] == step

    def _steps(self) -> list[int]:
        cached = getattr(self, "_steps_cache", None)
        if cached is None:
            cached = self._steps_cache = self.prune_steps()
        return cached

    # -- scoring ---------------------------------------------------------------------------------------
    def _in_window(self, step: int) -> bool:
        steps = self._steps()
        i = bisect.bisect_left(steps, step)  # the next pruning step at or after `step`
        return i < len(steps) and steps[i] - step < self.score_window

    @torch.no_grad()
    def _before_update(self, step: int) -> None:
        if self.score != "taylor" or not self._in_window(step):
            return
        for name, p in zip(self._names, self._params):
            if p.grad is None:
                continue
            s = (p.detach().float() * p.grad.detach().float()).abs_()
            acc = self._taylor.get(name)
            self._taylor[name] = s if acc is None else acc.add_(s)
        self._taylor_steps += 1

    def _scores(self, step: int, grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
        if self.score == "taylor" and self._taylor_steps == 0:  # optimizer.step() was skipped: this step's grads
            for name, p, g in zip(self._names, self._params, grads):
                if g is not None:
                    self._taylor[name] = (p.detach().float() * g.detach().float()).abs()
            self._taylor_steps = 1
        out = []
        for i, (name, p) in enumerate(zip(self._names, self._params)):
            if self.score == "taylor":
                acc = self._taylor.get(name)
                out.append(acc / self._taylor_steps if acc is not None else torch.zeros_like(p, dtype=torch.float32))
            else:
                out.append(weight_scores(self.score, p, seed=self.seed, step=step, layer=i))
        self._taylor, self._taylor_steps = {}, 0
        return out

    @torch.no_grad()
    def _prune_to(self, step: int, density: float, grads: list[torch.Tensor | None],
                  budget: str | Mapping[str, float] | None = None) -> bool:
        """Shrink the masks to ``density`` by the configured score and budget (or ``budget``); True if any
        mask changed."""
        budget = self.budget if budget is None else budget
        new = prune_masks(self._scores(step, grads), self._masks, self._names, density, budget)
        changed = False
        for i, keep in enumerate(new):
            changed |= self._shrink_mask(i, keep)
        return changed

    def _budget_at(self, step: int) -> str | Mapping[str, float]:
        """How the density of pruning step ``step`` is split over layers (default: the configured budget)."""
        return self.budget

    def _update_masks(self, step: int, grads: list[torch.Tensor | None]) -> None:
        if self._prune_to(step, self.target_density(step), grads, self._budget_at(step)):
            self._mask_version += 1
        self.verify_masks()

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """:class:`MaskedSparsity`'s state, the schedule and the partial Taylor scores (by parameter name)."""
        state = super().state_dict()
        state["taylor"] = {"scores": {n: t.clone() for n, t in self._taylor.items()}, "steps": self._taylor_steps}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._steps_cache = None
        taylor = state.get("taylor", {"scores": {}, "steps": 0})
        unknown = set(taylor["scores"]) - set(self._names)
        if unknown:
            raise ValueError(f"Taylor scores for unknown parameters {sorted(unknown)}; build the model and "
                             f"include= exactly as when saving")
        params = dict(zip(self._names, self._params))
        self._taylor = {n: t.to(params[n].device, torch.float32).clone() for n, t in taylor["scores"].items()}
        self._taylor_steps = int(taylor["steps"])

    def _describe(self) -> str:
        return f"budget={self.budget!r}, score={self.score!r}, "
