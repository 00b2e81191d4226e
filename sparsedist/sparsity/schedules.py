"""When masks are updated and how much of them changes (Evci et al. 2020, section 3).

Steps are counted from 0: step ``t`` is the ``t``-th call of ``optimizer.step()`` / ``rigl.step()``.

* :class:`UpdateSchedule`: the mask is updated at steps ``t = k * update_every`` for ``k >= 1`` while
  ``t < end_step``, where ``end_step = floor(stop_at * total_steps)`` (the paper's ``T_end``). The drop
  fraction reaches 0 at ``T_end``, so an update there would change nothing.
* drop fraction ``f(t)``: ``"cosine"`` (the paper's choice) ``f(t) = alpha / 2 * (1 + cos(pi * t / T_end))``,
  or ``"constant"`` ``f(t) = alpha`` (SET's original schedule).
* :class:`PruningSchedule` (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1): gradual pruning from
  sparsity ``s_i`` to ``s_f`` between ``begin_step`` ``t_0`` and ``end_step`` ``t_0 + n * Delta t``,
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n Delta t))^3``, the masks pruned every ``Delta t`` steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["cosine_drop_fraction", "UpdateSchedule", "ANNEALS", "cubic_sparsity", "PruningSchedule"]

ANNEALS = ("cosine", "constant")


def cosine_drop_fraction(step: int, alpha: float, end_step: int) -> float:
    """``alpha / 2 * (1 + cos(pi * min(step, end_step) / end_step))``: ``alpha`` at step 0, 0 at ``end_step``."""
    if end_step <= 0:
        return 0.0
    t = min(max(int(step), 0), int(end_step))
    return 0.5 * alpha * (1.0 + math.cos(math.pi * t / end_step))


@dataclass
class UpdateSchedule:
    """Mask-update times and the drop fraction at each.

    Attributes:
        update_every: ``Delta T``, steps between mask updates (>= 1).
        end_step: ``T_end``; no update at or after this step (>= 0).
        alpha: initial drop fraction, in [0, 1].
        anneal: ``"cosine"`` or ``"constant"``.
    """

    update_every: int
    end_step: int
    alpha: float = 0.3
    anneal: str = "cosine"

    def __post_init__(self) -> None:
        if not isinstance(self.update_every, int) or isinstance(self.update_every, bool) or self.update_every < 1:
            raise ValueError(f"update_every must be an int >= 1 (steps between mask updates), "
                             f"got {self.update_every!r}")
        if not isinstance(self.end_step, int) or self.end_step < 0:
            raise ValueError(f"end_step must be an int >= 0, got {self.end_step!r}")
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"drop fraction alpha must be in [0, 1], got {self.alpha!r}")
        if self.anneal not in ANNEALS:
            raise ValueError(f"unknown drop-fraction anneal {self.anneal!r}; use one of {ANNEALS}")

    @classmethod
    def from_training(cls, update_every: int, stop_at: float, total_steps: int, alpha: float = 0.3,
                      anneal: str = "cosine") -> "UpdateSchedule":
        """Schedule that stops updating at ``floor(stop_at * total_steps)``; ``stop_at`` in [0, 1]."""
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1 (the number of training steps, i.e. calls of "
                             f"step()), got {total_steps!r}")
        if not isinstance(stop_at, (int, float)) or not 0.0 <= stop_at <= 1.0:
            raise ValueError(f"stop_at must be a fraction of training in [0, 1], got {stop_at!r}")
        return cls(update_every, int(math.floor(stop_at * total_steps)), float(alpha), anneal)

    def is_update_step(self, step: int) -> bool:
        """True iff the masks are updated at step ``step`` (0-based)."""
        return 0 < step < self.end_step and step % self.update_every == 0

    def drop_fraction(self, step: int) -> float:
        """The fraction ``f(t)`` of each layer's active weights dropped (and regrown) at step ``step``."""
        if self.anneal == "constant":
            return float(self.alpha)
        return cosine_drop_fraction(step, self.alpha, self.end_step)

    def update_steps(self) -> list[int]:
        """All update steps, in order."""
        return list(range(self.update_every, self.end_step, self.update_every))

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        new = UpdateSchedule(**state)
        self.update_every, self.end_step, self.alpha, self.anneal = (
            new.update_every, new.end_step, new.alpha, new.anneal)


def cubic_sparsity(step: int, initial: float, final: float, begin: int, end: int, exponent: float = 3.0) -> float:
    """Zhu & Gupta's sparsity at ``step``: ``final + (initial - final) * (1 - p)^exponent`` with
    ``p = (step - begin) / (end - begin)`` clipped to [0, 1] (``initial`` before ``begin``, ``final`` from
    ``end`` on; a step function at ``begin`` when ``end == begin``)."""
    if end <= begin:
        return float(final if step >= begin else initial)
    p = min(max((step - begin) / (end - begin), 0.0), 1.0)
    return float(final + (initial - final) * (1.0 - p) ** exponent)


@dataclass
class PruningSchedule:
    """When gradual pruning prunes and to which sparsity (Zhu & Gupta 2017).

    Attributes:
        final_sparsity: ``s_f``, fraction of the sparsified weights pruned at the end, in [0, 1).
        begin_step: ``t_0``, the first pruning step (>= 0).
        end_step: the last pruning step (>= ``begin_step``); the sparsity is ``s_f`` from here on.
        frequency: ``Delta t``, steps between pruning steps (>= 1). Pruning happens at ``t_0 + k Delta t``
            and at ``end_step`` (also when ``end_step - t_0`` is not a multiple of ``Delta t``, so ``s_f``
            is always reached).
        initial_sparsity: ``s_i`` (default 0), in [0, ``s_f``].
        exponent: 3 in the paper.
    """

    final_sparsity: float
    begin_step: int
    end_step: int
    frequency: int = 100
    initial_sparsity: float = 0.0
    exponent: float = 3.0

    def __post_init__(self) -> None:
        for name in ("begin_step", "end_step", "frequency"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "frequency" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'frequency' else 0}, got {v!r}")
        if self.end_step < self.begin_step:
            raise ValueError(f"end_step ({self.end_step}) must be >= begin_step ({self.begin_step})")
        if not isinstance(self.final_sparsity, (int, float)) or not 0.0 <= self.final_sparsity < 1.0:
            raise ValueError(f"final_sparsity must be in [0, 1) (fraction of weights pruned), got "
                             f"{self.final_sparsity!r}")
        if not isinstance(self.initial_sparsity, (int, float)) or \
                not 0.0 <= self.initial_sparsity <= self.final_sparsity:
            raise ValueError(f"initial_sparsity must be in [0, final_sparsity={self.final_sparsity}], got "
                             f"{self.initial_sparsity!r}")
        if not isinstance(self.exponent, (int, float)) or self.exponent <= 0:
            raise ValueError(f"exponent must be > 0 (3 in Zhu & Gupta), got {self.exponent!r}")

    def is_prune_step(self, step: int) -> bool:
        """True iff the masks are pruned at (0-based) ``step``."""
        return self.begin_step <= step <= self.end_step and (
            (step - self.begin_step) % self.frequency == 0 or step == self.end_step)

    def sparsity(self, step: int) -> float:
        """The target sparsity ``s_t`` at ``step`` (cubic between the pruning steps' end points)."""
        return cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, self.begin_step, self.end_step,
                              self.exponent)

    def prune_steps(self) -> list[int]:
        """Every pruning step, in order."""
        steps = list(range(self.begin_step, self.end_step + 1, self.frequency))
        return steps if steps[-1] == self.end_step else steps + [self.end_step]

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        new = PruningSchedule(**state)
        for k, v in asdict(new).items():
            setattr(self, k, v)
