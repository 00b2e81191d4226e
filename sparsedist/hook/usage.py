"""Which parameters take part in a step, for DDP's ``find_unused_parameters=True``.

DDP leaves the gradient of a parameter that no rank used in a step untouched: whatever the hook sends for it is
discarded. Error feedback must then send nothing for it, or its residual drains away while the parameter does not
move (measured before this module existed: conservation errors of 0.1 to 0.4 of the gradient mass in 8 steps).

:class:`ParamUsage` notes, with a post-accumulate-grad hook on every trainable parameter, which parameters
received a gradient on this rank since the last exchanged step (``no_sync`` micro-steps included, as DDP counts
them). The hook fires inside autograd's accumulation, before DDP's own hook marks the parameter ready, so when a
bucket is exchanged the local usage of each of its parameters is known. One allreduce of one flag per parameter
of the bucket (synchronous, before the exchange) tells every rank which are used on some rank; the others are
left out of the bucket's exchange -- their residuals and compressor state stay as they were -- and their entries
of the averaged buffer are zero, which DDP discards. A parameter used on some ranks only is exchanged as usual:
the ranks that did not use it send (from) their residual, so nothing waits for a rank that may never use it again.

Cost: that allreduce, per bucket and step, only for a DDP model built with ``find_unused_parameters=True`` (and
without ``static_graph``); it makes an otherwise overlapped exchange wait for it.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .units import BucketView

__all__ = ["ParamUsage", "tracks_usage"]


def tracks_usage(model) -> bool:
    """True if ``model`` is a DDP model that leaves globally unused parameters untouched."""
    return (isinstance(model, torch.nn.parallel.DistributedDataParallel) and bool(model.find_unused_parameters)
            and not bool(getattr(model, "static_graph", False)))


class ParamUsage:
    """Local and global usage of the parameters in ``named`` (``(name, parameter)`` pairs)."""

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]]):
        self.used: set[str] = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._marker(name))
                         for name, p in named if p.requires_grad]

    def _marker(self, name: str):
        def mark(param: torch.Tensor) -> None:
            self.used.add(name)
        return mark

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def used_here(self, name: str) -> bool:
        """Whether this rank computed a gradient for ``name`` since the last exchanged step."""
        return name in self.used

    def only_used(self, view: BucketView, backend) -> BucketView:
        """``view`` without the parameters no rank used this step (collective: one small allreduce)."""
        flags = torch.tensor([n in self.used for n in view.names], dtype=torch.int32, device=view.buffer.device)
        if backend.size > 1:
            flags = backend.allreduce(flags)
        keep = [bool(f) for f in flags.tolist()]
        return view if all(keep) else view.subset(keep)

    def end_step(self) -> None:
        """The step was exchanged: usage starts afresh."""
        self.used.clear()
