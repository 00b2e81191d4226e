"""Gradual magnitude pruning during training (Zhu & Gupta 2017, "To prune, or not to prune").

Training starts dense; from ``begin_step`` to ``end_step`` the masks are pruned every ``frequency`` steps to
the cubic schedule's sparsity ``s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(n Delta t))^3``
(:class:`~sparsedist.sparsity.schedules.PruningSchedule`), keeping the weights of largest ``|w|`` (or
``|w * g|``, or random ones); after ``end_step`` the sparse network trains on at the final sparsity. Pruned
weights stay exactly zero and never come back. As in the paper's TensorFlow implementation, the optimizer
still applies the step's (masked) update on pruning steps.

Usage (the optimizer is hooked; call order matters)::

    gmp = GradualMagnitudePruning(model, optimizer, sparsity=0.9, begin_step=200, end_step=2000,
                                  frequency=100, budget="global")
    state = sparsedist.register(ddp, "none", masks=gmp)     # optional: exchange only active gradients
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        gmp.step()
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .masks import Include
from .pruning import Pruning
from .schedules import PruningSchedule

__all__ = ["GradualMagnitudePruning", "GMP"]


class GradualMagnitudePruning(Pruning):
    """Gradual pruning with Zhu & Gupta's cubic schedule.

    Args:
        model, optimizer: as for :class:`~sparsedist.sparsity.base.MaskedSparsity`.
        sparsity: ``s_f``, the final fraction of sparsified weights pruned, in [0, 1).
        begin_step: ``t_0``, the first pruning step.
        end_step: the last pruning step; ``s_f`` holds from here on.
        frequency: ``Delta t``, steps between pruning steps (default 100).
        initial_sparsity: ``s_i`` (default 0).
        budget: ``"uniform"`` (default, as in the paper: every layer reaches ``s_t``), ``"erk"``,
            ``"global"`` (one magnitude threshold over all layers), or a dict name -> density (final).
        score: ``"magnitude"`` (default), ``"taylor"`` (``|w * g|``, averaged over the steps since the last
            pruning step) or ``"random"``.
        include, seed, process_group: as for :class:`~sparsedist.sparsity.base.MaskedSparsity`.

    A dict ``budget`` gives the final per-layer densities; on the way there every layer follows the cubic
    schedule from its initial to its final density.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sparsity: float, *, begin_step: int,
                 end_step: int, frequency: int = 100, initial_sparsity: float = 0.0,
                 budget: str | Mapping[str, float] = "uniform", score: str = "magnitude", include: Include = None,
                 seed: int = 0, process_group: Any = None) -> None:
        self.schedule = PruningSchedule(final_sparsity=sparsity, begin_step=begin_step, end_step=end_step,
                                        frequency=frequency, initial_sparsity=initial_sparsity)
        super().__init__(model, optimizer, budget=budget, score=score, score_window=frequency, include=include,
                         seed=seed, process_group=process_group)

    @property
    def sparsity(self) -> float:
        """The final sparsity ``s_f``."""
        return self.schedule.final_sparsity

    def prune_steps(self) -> list[int]:
        return self.schedule.prune_steps()

    def target_density(self, step: int) -> float:
        return 1.0 - self.schedule.sparsity(step)

    def _budget_at(self, step: int) -> str | Mapping[str, float]:
        """The configured budget; a dict of final densities becomes each layer's point on its cubic path from
        ``1 - s_i`` to its final density at ``step``."""
        if not isinstance(self.budget, Mapping):
            return self.budget
        s0, sf = self.schedule.initial_sparsity, self.schedule.final_sparsity
        frac = 0.0 if sf == s0 else (self.schedule.sparsity(step) - s0) / (sf - s0)
        return {n: (1.0 - s0) + (float(d) - (1.0 - s0)) * frac for n, d in self.budget.items()}


GMP = GradualMagnitudePruning
