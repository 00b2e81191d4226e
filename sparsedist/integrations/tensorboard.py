"""TensorBoard: ``state.stats()`` (bytes sent and saved, density, residual norm, chosen collectives, step-check
verdicts) and your own values (e.g. the loss) as scalars.

::

    from sparsedist.integrations.tensorboard import StatsWriter

    tb = StatsWriter("runs/topk", state)        # None instead of a directory: does nothing (a --tensorboard flag)
    for step, batch in enumerate(loader, 1):
        loss = ...; loss.backward(); optimizer.step()
        tb.log(step, loss=loss)                 # every `every` steps: stats() + loss
    tb.close()

Only rank 0 writes unless ``all_ranks=True`` (then rank r writes to ``DIR/rank{r}``: residuals differ per rank).
The scalar names are those of :func:`sparsedist.integrations.scalars.stats_scalars`, under ``sparsedist/``.
Needs the ``tensorboard`` package (``pip install sparsedist[tensorboard]``), imported only when a directory is
given.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from .scalars import stats_scalars

__all__ = ["StatsWriter", "write_stats"]


def _summary_writer(log_dir: str | os.PathLike):
    try:  # optional dependency
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch.utils.tensorboard raises this when the tensorboard package is missing
        raise ImportError("writing TensorBoard event files needs the tensorboard package: "
                          "pip install 'sparsedist[tensorboard]' (or pip install tensorboard)") from exc
    return SummaryWriter(log_dir=str(log_dir))


def write_stats(writer: Any, stats: dict[str, Any], step: int, prefix: str = "sparsedist/") -> dict[str, float]:
    """Add every scalar of ``stats`` (a ``stats()`` dict) to a ``SummaryWriter`` at ``step``; returns them."""
    scalars = stats_scalars(stats, prefix)
    for name, value in scalars.items():
        writer.add_scalar(name, value, global_step=step)
    return scalars


class StatsWriter:
    """Writes a sparsedist state's telemetry, and extra values, to TensorBoard every ``every`` steps.

    Args:
        log_dir: the event-file directory; None makes every method a no-op (so an optional command-line flag
            needs no ``if``).
        state: anything with ``stats()`` (a :class:`sparsedist.SparsifyState`, the Horovod optimizer), or None to
            write only the extra values.
        every: write on steps divisible by this (``stats()`` computes the residual norm: one pass over them).
        all_ranks: every rank writes, to ``log_dir/rank{r}`` (default: rank 0 only, to ``log_dir``).
        prefix: tag group of the telemetry scalars.
        rank: this process's rank (default: torch.distributed's, else 0; pass ``hvd.rank()`` under Horovod).
    """

    def __init__(self, log_dir: str | os.PathLike | None, state: Any = None, *, every: int = 10,
                 all_ranks: bool = False, prefix: str = "sparsedist/",
                 rank: int | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (steps between writes), got {every!r}")
        if state is not None and not callable(getattr(state, "stats", None)):
            raise TypeError(f"state must have a stats() method (a sparsedist.SparsifyState), got "
                            f"{type(state).__name__}")
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.state, self.every, self.prefix = state, every, prefix
        self.writer = None
        if log_dir is not None and (all_ranks or rank == 0):
            self.writer = _summary_writer(os.path.join(log_dir, f"rank{rank}") if all_ranks else log_dir)

    @property
    def enabled(self) -> bool:
        """Whether this rank writes anything."""
        return self.writer is not None

    def log(self, step: int, force: bool = False, **values: float | torch.Tensor) -> None:
        """On steps divisible by ``every`` (or when ``force``): write ``stats()`` and ``values`` (tags as given,
        e.g. ``loss=loss``; tensors are read with ``.item()`` only then)."""
        if self.writer is None or not (force or step % self.every == 0):
            return
        if self.state is not None:
            write_stats(self.writer, self.state.stats(), step, self.prefix)
        for name, value in values.items():
            self.writer.add_scalar(name, float(value.item() if isinstance(value, torch.Tensor) else value),
                                   global_step=step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
