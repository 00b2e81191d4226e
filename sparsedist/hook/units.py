"""The pieces a bucket is cut into on its way through the pipeline.

* :class:`FlatBucket` -- a ``GradBucket`` look-alike over a flat buffer (integrations that own their exchange).
* :class:`BucketView` -- one bucket's parameters with their names, positions and flat gradient views.
* :class:`Unit` -- one selection unit: a parameter's accumulator (layer-wise), or the packed active set of a
  masked parameter, with the payload its compressor selected.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from ..payload import SparseGrad

__all__ = ["FlatBucket", "BucketView", "Unit"]


class FlatBucket:
    """A ``GradBucket`` look-alike over a flat buffer holding the gradients of ``params`` in order."""

    def __init__(self, buffer: torch.Tensor, params: list[torch.Tensor], index: int = 0, is_last: bool = True):
        if buffer.dim() != 1:
            raise ValueError(f"buffer must be 1-D (gradients concatenated), got shape {tuple(buffer.shape)}")
        total = sum(p.numel() for p in params)
        if total != buffer.numel():
            raise ValueError(f"buffer has {buffer.numel()} elements but the parameters have {total}")
        self._buffer, self._params, self._index, self._last = buffer, list(params), index, is_last
        self._views, offset = [], 0
        for p in self._params:
            self._views.append(buffer[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def gradients(self) -> list[torch.Tensor]:
        return self._views

    def is_last(self) -> bool:
        return self._last


class BucketView:
    """One bucket as the pipeline sees it.

    Attributes:
        bucket: the DDP ``GradBucket`` (or :class:`FlatBucket`).
        buffer: its flat buffer ``(numel,)``, this rank's local gradients (overwritten with the average).
        params: its parameters, in bucket order.
        names: their names (the state keys); ``positions``: their positions in the model (seeded randomness).
        grads: flat views ``(n_i,)`` of each parameter's gradient inside ``buffer``; ``offsets``: where each starts.
        layout: ``(bucket index, numel)``, the key of per-bucket state (DDP rebuilds buckets after step 0).
        sparse: the bucket holds one parameter's sparse (COO) gradient (``nn.Embedding(sparse=True)``): ``buffer``
            is that gradient, ``(num_rows, ...)``, and ``grads``/``offsets`` are empty.
    """

    def __init__(self, bucket: dist.GradBucket, params_index) -> None:
        self.bucket = bucket
        self.buffer = bucket.buffer()
        self.params = bucket.parameters()
        entries = [params_index.of(p) for p in self.params]
        self.positions = [i for i, _ in entries]
        self.names = [n for _, n in entries]
        self.sparse = self.buffer.is_sparse
        self.grads = [] if self.sparse else [g.reshape(-1) for g in bucket.gradients()]
        base, esize = (0, 1) if self.sparse else (self.buffer.data_ptr(), self.buffer.element_size())
        self.offsets = [(g.data_ptr() - base) // esize for g in self.grads]
        self.layout = (bucket.index(), self.buffer.numel())

    @property
    def numel(self) -> int:
        return self.buffer.numel()

    def subset(self, keep: list[bool]) -> "BucketView":
        """The same bucket with only the parameters where ``keep`` is True (the buffer stays whole)."""
        view = copy.copy(self)
        for attr in ("params", "positions", "names", "grads", "offsets"):
            setattr(view, attr, [x for x, k in zip(getattr(self, attr), keep) if k])
        return view


class Unit:
    """One selection unit: a parameter (layer-wise) or the packed active set of a masked parameter.

    Attributes:
        key: the parameter's name; ``index``: its position (for seeded randomness).
        acc: the flat accumulator ``(n,)`` (gradient + residual, or the compressor's accumulation).
        offset: where the parameter starts in the bucket buffer.
        index_map: for a packed active set, the positions ``(n,)`` (int64) of its entries in the parameter.
        payload: what the compressor selected, indices local to the unit.
    """

    __slots__ = ("key", "index", "acc", "offset", "index_map", "numel", "payload")

    def __init__(self, key: str, index: int, acc: torch.Tensor, offset: int, index_map: torch.Tensor | None):
        self.key = key
        self.index = index
        self.acc = acc
        self.offset = offset
        self.index_map = index_map
        self.numel = acc.numel()
        self.payload: SparseGrad | None = None

    def bucket_indices(self, local: torch.Tensor) -> torch.Tensor:
        """Positions in the bucket buffer of the unit-local positions ``local``."""
        idx = local.long()
        if self.index_map is not None:
            idx = self.index_map[idx]
        return idx + self.offset

    def send_all(self) -> None:
        """Select every entry (no selection)."""
        self.payload = SparseGrad(torch.arange(self.numel, device=self.acc.device), self.acc, self.numel,
                                  shared_indices=True)
