"""When masks are updated and how much of them changes (Evci et al. 2020, section 3).

Steps are counted from 0: step ``t`` is the ``t``-th call of ``optimizer.step()`` / ``rigl.step()``.

* :class:`UpdateSchedule`: the mask is updated at steps ``t = k * update_every`` for ``k >= 1`` while
  ``t < end_step``, where ``end_step = floor(stop_at * total_steps)`` (the paper's ``T_end``). The drop
  fraction reaches 0 at ``T_end``, so an update there would change nothing.
* drop fraction ``f(t)``: ``"cosine"`` (the paper's choice) ``f(t) = alpha / 2 * (1 + cos(pi * t / T_end))``,
  or ``"constant"`` ``f(t) = alpha`` (SET's original schedule).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["cosine_drop_fraction", "UpdateSchedule", "ANNEALS"]

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
