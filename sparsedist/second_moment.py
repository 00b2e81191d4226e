"""Per-example gradient statistics for variance-based sparsification (Tsuzuku, Imachi & Akiba 2018).

:class:`SecondMomentCollector` installs module hooks on a model's ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
``nn.Embedding`` layers and accumulates, for each of their parameters, the **sum over examples of the squared
per-example gradient**::

    m2[i] = sum_n (d loss / d w_i  restricted to example n)^2

where "restricted to example n" is example n's additive contribution to the gradient of the loss that is
back-propagated. With a mean-reduced loss each contribution already carries the 1/B, so ``m2`` is exactly the
paper's ``sum_z (grad_i f_z)^2 / B^2`` increment of ``v_i``. With any other reduction ``m2`` scales like the
gradient squared, and the variance rule ``r_i^2 > alpha * v_i`` is unchanged (both sides scale alike).

How it is computed (the cheap forms; full per-example gradients are never stored; the pure functions are in
:mod:`sparsedist.per_example`, this module only captures their inputs with hooks and adds up):

* ``Linear``, 2-D input ``(B, I)``: per-example gradient ``dy_n x_n^T`` is rank one, so
  ``m2 = (dy^2)^T (x^2)`` -- one extra matrix product, **exact**. Bias: ``sum_n dy_n^2``.
* ``Linear`` with extra dimensions ``(B, T, ..., I)`` (sequences): example n's gradient is
  ``sum_t dy_nt x_nt^T``. ``mode="exact"`` (default) forms it per example with a batched matrix product,
  in chunks of examples so memory stays under ``max_chunk_elements``, then squares and sums -- **exact**, at the
  cost of one more weight-gradient-sized product. ``mode="per_position"`` uses ``(dy^2)^T (x^2)`` over all
  positions, i.e. treats every position as an example (drops the cross-position terms; cheaper, approximate).
* ``Conv1d/2d/3d``: the per-example gradient sums over spatial positions, so the rank-one identity does not
  hold. ``mode="exact"`` unfolds the input (im2col, any stride/padding/dilation/groups/padding mode) and
  forms each example's gradient ``dy_n (O, L) @ U_n^T (L, C*k)`` with a batched product, chunked over
  examples -- **exact**, for the cost of one more weight-gradient-sized product plus the unfolding.
  ``mode="per_position"`` treats each output position as an example (approximate, and not cheaper here).
* ``Embedding``: example n's gradient row v is the sum of ``dy_nt`` over the positions t with index v. Rows of
  the same (example, index) pair are summed first (``torch.unique`` on ``n * V + index``), then squared and
  scatter-added into the table -- **exact** in both modes, including repeated indices, ``padding_idx`` (no
  gradient) and ``scale_grad_by_freq``.

Where examples live: dimension 0 of the layer input is the example dimension (``batch_dim`` moves it for
Linear inputs with >= 3 dimensions and Embedding inputs with >= 2, e.g. ``batch_dim=1`` for
sequence-first layouts). Unbatched inputs count as one example.

When a module is called several times in one forward (weight sharing, an unrolled RNN cell), the calls'
contributions to each example's gradient are summed *before* squaring (exact: the calls are treated like
positions of a sequence), provided the calls have the same number of examples; calls with different numbers of
examples are squared separately and summed. A parameter shared by *different* modules (tied input/output
embeddings) gets the sum of each module's ``m2`` (cross terms between the modules are not included).
Gradient accumulation (``no_sync()`` micro-batches, several backward passes) adds up until :meth:`pop`.

Timing: ``dy`` is captured by a tensor hook registered on the layer's *output* in a forward hook. Autograd
calls it with the gradient of the output before it computes the layer's parameter gradients, so the statistics
of a parameter are complete before its gradient is accumulated -- and therefore before DDP's communication hook
for that parameter's bucket runs. (``register_full_backward_hook`` gives no such ordering guarantee.)
Activation checkpointing that re-runs forwards during backward is not supported.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from . import per_example

__all__ = ["SecondMomentCollector"]

_MODES = ("exact", "per_position")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel."""
    if isinstance(model, DistributedDataParallel):
        return model.module
    return model


class _Group:
    """Calls of one module in one forward pass, whose per-example gradients add up."""

    __slots__ = ("generation", "expected", "received", "items")

    def __init__(self, generation: int):
        self.generation = generation
        self.expected = 0        # calls that will deliver an output gradient
        self.received = 0        # output gradients delivered so far
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []   # (input, output grad), not yet processed


class SecondMomentCollector:
    """Accumulate ``sum_n (per-example gradient)^2`` for every parameter of the supported layers.

    Args:
        model: the model, or the ``DistributedDataParallel`` wrapping it (hooks go on ``ddp.module``).
            Hooks are installed on every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` and
            ``nn.Embedding`` (and subclasses that keep the base class ``forward``); ``MultiheadAttention``'s
            ``out_proj`` is skipped because that module's ``forward`` is never called. Other layer types
            (norms, ``ConvTranspose``, RNN modules, ...) are not covered: see :meth:`uncovered`.
        mode: ``"exact"`` (default): exact per-example sums for every covered layer.
            ``"per_position"``: for sequence inputs to Linear and for convolutions, treat each position as an
            example (drops the cross-position terms; saves the per-example product for Linear sequences, not
            for convolutions, whose cost is dominated by the unfolding). Embedding is exact in both modes.
        batch_dim: the example dimension of Linear inputs with >= 3 dims and of Embedding inputs with >= 2 dims
            (0 for batch-first layouts, 1 for ``(T, B, ...)``). 2-D Linear inputs and conv inputs always use 0.
        max_chunk_elements: bound on the number of elements of the temporary per-example gradients (and
            unfolded inputs) formed at once by the exact path; the examples are processed in chunks under it.

    Results are fp32 on the parameter's device, whatever the model dtype.
    """

    def __init__(self, model: nn.Module, *, mode: str = "exact", batch_dim: int = 0,
                 max_chunk_elements: int = 1 << 24):
        if not isinstance(model, nn.Module):
            raise TypeError(f"SecondMomentCollector needs an nn.Module (or a DDP wrapper), got {type(model).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
            raise ValueError(f"batch_dim must be an int >= 0 (the example dimension of the layer inputs), "
                             f"got {batch_dim!r}")
        if isinstance(max_chunk_elements, bool) or not isinstance(max_chunk_elements, int) or max_chunk_elements < 1:
            raise ValueError(f"max_chunk_elements must be a positive int, got {max_chunk_elements!r}")
        self.mode = mode
        self.batch_dim = batch_dim
        self.max_chunk_elements = max_chunk_elements
        #: While True, forward passes install no gradient hooks: nothing is computed or accumulated (the hook
        #: sets it on steps it sends densely, where no selection needs the statistics).
        self.paused = False
        self._root = _unwrap(model)
        self._lock = threading.RLock()
        self._handles: list = []
        self._generation = 0
        self._owners: dict[int, list[nn.Module]] = {}        # id(param) -> modules whose weight/bias it is
        self._params: dict[int, nn.Parameter] = {}           # id(param) -> param (keeps ids valid)
        self._acc: dict[int, torch.Tensor] = {}              # id(param) -> fp32 sum, param's shape
        self._current: dict[nn.Module, _Group] = {}          # module -> group of the latest forward
        self._partial: dict[nn.Module, list[_Group]] = {}    # module -> groups holding unprocessed items

        skip = set()
        for m in self._root.modules():
            if isinstance(m, nn.MultiheadAttention):
                skip.add(m.out_proj)
        for m in self._root.modules():
            if m in skip or per_example.kind_of(m) is None:
                continue
            params = [p for p in (m._parameters.get("weight"), m._parameters.get("bias")) if p is not None]
            if not params:
                continue
            for p in params:
                self._owners.setdefault(id(p), []).append(m)
                self._params[id(p)] = p
            self._handles.append(m.register_forward_hook(self._forward_hook, with_kwargs=True))
        self._handles.append(self._root.register_forward_pre_hook(self._new_forward))

    # ------------------------------------------------------------------------------------------------- API

    def covers(self, param: torch.Tensor) -> bool:
        """True if ``param`` (the parameter object) is the weight or bias of a hooked layer."""
        return id(param) in self._owners and self._params[id(param)] is param

    def uncovered(self, model: nn.Module | None = None) -> list[str]:
        """Names of the trainable parameters of ``model`` (default: the hooked model) that are not covered.

        Names are relative to the unwrapped model (no ``module.`` prefix for a DDP wrapper).
        """
        root = self._root if model is None else _unwrap(model)
        return [name for name, p in root.named_parameters() if p.requires_grad and not self.covers(p)]

    def pop(self, param: torch.Tensor) -> torch.Tensor | None:
        """Return the accumulated sum of squared per-example gradients of ``param`` and reset it to zero.

        Returns:
            A ``(param.numel(),)`` float32 tensor on the parameter's device (zeros if no gradient reached the
            parameter since the last pop), or None if ``param`` is not covered.
        """
        if not self.covers(param):
            return None
        with self._lock:
            for m in self._owners[id(param)]:
                self._flush(m)
            acc = self._acc.pop(id(param), None)
        if acc is None:
            return torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        return acc.reshape(-1)

    def reset(self) -> None:
        """Drop everything accumulated so far (all parameters)."""
        with self._lock:
            self._acc.clear()
            self._partial.clear()
            self._current.clear()

    def remove(self) -> None:
        """Remove every hook this collector installed and drop its buffers; it then covers nothing."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()
        self._owners.clear()
        self._params.clear()

    def __repr__(self) -> str:
        return (f"SecondMomentCollector(mode={self.mode!r}, batch_dim={self.batch_dim}, "
                f"layers={len({id(m) for ms in self._owners.values() for m in ms})}, params={len(self._owners)})")

    # ----------------------------------------------------------------------------------------------- hooks

    def _new_forward(self, module, args) -> None:
        with self._lock:
            self._generation += 1

    def _forward_hook(self, module, args, kwargs, output) -> None:
        if self.paused:
            return
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if not any(p.requires_grad for p in (module._parameters.get("weight"), module._parameters.get("bias"))
                   if p is not None):
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return
        x = x.detach()
        with self._lock:
            group = self._current.get(module)
            if group is None or group.generation != self._generation:
                group = _Group(self._generation)
                self._current[module] = group
            group.expected += 1

        def hook(grad: torch.Tensor) -> None:
            self._deliver(module, group, x, grad)

        output.register_hook(hook)

    def _deliver(self, module: nn.Module, group: _Group, x: torch.Tensor, dy: torch.Tensor) -> None:
        with self._lock:
            group.items.append((x, dy.detach()))
            group.received += 1
            if group.received >= group.expected:
                items, group.items = group.items, []
                partial = self._partial.get(module)
                if partial is not None and group in partial:
                    partial.remove(group)
                self._process(module, items)
            else:
                partial = self._partial.setdefault(module, [])
                if group not in partial:
                    partial.append(group)

    def _flush(self, module: nn.Module) -> None:
        """Process output gradients of calls whose siblings delivered none (unused outputs)."""
        for group in self._partial.pop(module, []):
            items, group.items = group.items, []
            if items:
                self._process(module, items)

    # ----------------------------------------------------------------------------------------- statistics

    def _add(self, p: torch.Tensor | None, value: torch.Tensor) -> None:
        if p is None or not p.requires_grad:
            return
        value = value.reshape(p.shape).to(device=p.device, dtype=torch.float32)
        cur = self._acc.get(id(p))
        if cur is None:
            self._acc[id(p)] = value          # a fresh tensor computed here, never a view of user data
        else:
            cur.add_(value)

    def _process(self, module: nn.Module, items: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        fn = per_example.kind_of(module)
        options = {"mode": self.mode, "max_chunk_elements": self.max_chunk_elements, "batch_dim": self.batch_dim}
        if fn is per_example.conv:
            del options["batch_dim"]
        elif fn is per_example.embedding:
            options = {"batch_dim": self.batch_dim}
        with torch.no_grad():
            for param, m2 in fn(module, items, **options):
                self._add(param, m2)
