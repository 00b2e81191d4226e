"""Error reset: each rank computes its gradient at its own *local model*, the consensus minus its pending update.

With error feedback, what a rank's top-k did not send waits in its residual ``e_r`` (in parameter units here: the
wire is ``lr * direction``), and the parameters every rank holds, the consensus ``x``, move only by what was sent.
At 0.1 % density a coordinate's update waits for hundreds of steps, and meanwhile every gradient is computed at a
point that does not include it: the residual keeps growing in the same direction, and when it is finally sent it
overshoots (applying every rank's residual at once made the char-GPT's loss far worse, docs/adam_exchange.md).

Error reset (Xie et al. 2020, CSER: "bifurcated local models") evaluates each rank's gradient at its local model
``x - e_r`` instead: the rank sees its own pending update at once, so a residual stops growing when the local model
has gone far enough. The consensus stays what it was -- identical on every rank, moved only by the averaged sparse
exchange -- and the local models differ from it by their residuals only. The average of the local models,
``x - mean_r e_r``, is the model training has produced; :meth:`LocalModels.consolidate` makes it the consensus
(a dense allreduce of the residuals, in buckets of up to 25 MB, which are then zero).

What sparsedist does, and where it departs from CSER: the residual is still fed back (the exchange selects top-k
of ``update + e_r``), so the local models are pulled together every step by what is sent; CSER resets the
residual instead of feeding it back and synchronises the local models every ``H`` steps (``sync_every`` here,
optional). The parameters a user sees between steps are always the consensus: the local model exists only from
the training forward pass to the end of its backward pass (or the exchange's end, or ``optimizer.step()``), when
the consensus is put back exactly (a copy, not ``x - e + e``, which would round differently on different ranks).

Memory: a copy of every parameter that has a residual, from the forward pass to ``step()``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.autograd import Variable

__all__ = ["LocalModels", "CONSOLIDATE_BUCKET_BYTES"]

#: Most bytes of fp32 residuals one allreduce of :meth:`LocalModels.consolidate` carries (DDP's default bucket):
#: a model's residuals go in a few calls, not one per parameter, without a flat copy of the whole model.
CONSOLIDATE_BUCKET_BYTES = 25 * 2**20


class LocalModels:
    """The local models of one rank, for an exchange that keeps error-feedback residuals by parameter name.

    Args:
        named: ``(name, parameter)`` pairs in an order that is the same on every rank.
        residuals: returns the exchange's current residual dictionary (name -> flat tensor of the parameter's
            numel, in parameter units, fp32); called at each use, so the exchange may replace entries or the dict.
        backend: returns the :class:`~sparsedist.collectives.Backend` that :meth:`consolidate` sums over (called
            when it runs, so an exchange may create its backend lazily).
    """

    def __init__(self, named: list[tuple[str, torch.Tensor]], residuals: Callable[[], dict[str, torch.Tensor]],
                 backend: Callable[[], Any]):
        self.named = list(named)
        self.residuals = residuals
        self.backend = backend
        self._consensus: dict[torch.Tensor, torch.Tensor] = {}
        self._localized = False
        self._queued = False

    @property
    def localized(self) -> bool:
        """True from :meth:`localize` to :meth:`restore`: the parameters hold this rank's local model."""
        return self._localized

    @torch.no_grad()
    def localize(self) -> None:
        """Parameters <- consensus - residual (copies of the consensus kept). Once per step: a second call before
        :meth:`restore` (a second micro-batch, a skipped step) changes nothing."""
        if self._localized:
            return
        self._localized = True
        current = self.residuals()
        for name, p in self.named:
            r = current.get(name)
            if r is None or r.numel() != p.numel():
                continue
            self._consensus[p] = p.detach().clone()
            p.detach().sub_(r.view(p.shape).to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Parameters <- the consensus, exactly as it was before :meth:`localize`."""
        for p, consensus in self._consensus.items():
            p.detach().copy_(consensus)
        self._consensus.clear()
        self._localized = False
        self._queued = False

    def restore_after_backward(self) -> None:
        """Queue :meth:`restore` for the end of the running backward pass (as DDP queues its own finalisation),
        when every gradient has been computed at the local model; outside a backward pass, or once queued, nothing
        happens. A step that ``GradScaler`` then skips leaves the consensus in the parameters, as it should."""
        if self._queued or not self._localized or torch._C._current_graph_task_id() == -1:
            return
        self._queued = True
        Variable._execution_engine.queue_callback(self.restore)

    @torch.no_grad()
    def consolidate(self) -> None:
        """Consensus <- the mean of the ranks' local models; every residual becomes zero. A collective: every rank
        calls it at the same point, between steps (after ``step()``, before the next forward)."""
        if self._localized:
            raise RuntimeError("consolidate() between the forward pass and optimizer.step(): the parameters hold "
                               "this rank's local model; call it after step()")
        backend = self.backend()
        current = self.residuals()
        size = backend.size
        for group in _buckets(self.named, CONSOLIDATE_BUCKET_BYTES):  # the same groups on every rank
            flat = torch.zeros(sum(p.numel() for _, p in group), dtype=torch.float32, device=group[0][1].device)
            offset = 0
            for name, p in group:  # every parameter on every rank, zeros where a rank has no residual
                r = current.pop(name, None)
                if r is not None and r.numel() == p.numel():
                    flat[offset:offset + p.numel()].copy_(r.reshape(-1))
                offset += p.numel()
            total = backend.allreduce(flat)
            offset = 0
            for _, p in group:
                p.detach().sub_((total[offset:offset + p.numel()] / size).view(p.shape).to(p.dtype))
                offset += p.numel()


def _buckets(named: list[tuple[str, torch.Tensor]], cap_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """``named`` cut, in order, into runs of parameters on one device of at most ``cap_bytes`` of fp32 each (a
    larger parameter alone)."""
    groups: list[list[tuple[str, torch.Tensor]]] = []
    size = 0
    for name, p in named:
        if not groups or p.device != groups[-1][0][1].device or size + 4 * p.numel() > cap_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, p))
        size += 4 * p.numel()
    return groups
