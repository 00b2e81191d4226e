"""The compressor interface: WHAT to send. Pure tensor code, no communication, no DDP.

A compressor sees one flat accumulator at a time (a layer's gradient plus its residual, or a whole bucket's)
and returns a :class:`~sparsedist.payload.SparseGrad`. The hook (:mod:`sparsedist.hook`) owns the flow::

    acc     = compressor.accumulate(grad, residual, ctx)   # error feedback: grad + residual (DGC: momentum)
    payload = compressor.compress(acc, ctx)                # selection
    ...collective...
    residual = acc - payload.to_dense()                    # (sparsedist.feedback) what was not sent is kept
    compressor.after_send(ctx.key, payload)                # compressor-side state (DGC momentum masking, ...)

Compressors that keep per-tensor state key it by ``ctx.key`` (the parameter's name, identical on every rank) and
implement ``state_dict()`` / ``load_state_dict()``. Everything a compressor may know besides the tensors (the
step, the world size, the shared seed) arrives in the :class:`SelectContext`, on every registration path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import check_density, check_nonnegative
from ..payload import SparseGrad

__all__ = ["Compressor", "FixedDensityCompressor", "SelectContext", "check_density", "check_nonnegative",
           "count_for_density", "entries_at_least"]


@dataclass
class SelectContext:
    """What a compressor may know besides the accumulator.

    Attributes:
        step: number of completed gradient exchanges before this one (0 on the first step); identical on all ranks.
        key: the tensor's state key, its parameter name (for a whole-bucket selection the first parameter's),
            identical on every rank.
        index: the parameter's position in the model (for seeded randomness: an integer identical on every rank).
        world_size: number of ranks taking part.
        rank: this process's rank (for rank-local randomness).
        seed: the state's seed, shared by all ranks (for shared-index randomness).
        second_moment: for variance-based selection, a flat tensor (same shape as the accumulator) with the
            sum over examples of squared per-example gradients of this step; None when not collected.
    """

    step: int
    key: str = ""
    index: int = 0
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    second_moment: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def count_for_density(numel: int, density: float) -> int:
    """k = ceil(density * numel), at least 1 for a non-empty tensor, at most numel."""
    if numel == 0:
        return 0
    return max(1, min(numel, math.ceil(density * numel - 1e-9)))


class Workspace:
    """Scratch buffers that selection reuses from call to call (one per name, grown to the largest request).

    On a CPU, a fresh tensor of a few tens of MB comes from ``mmap`` and is page-faulted in on first touch: at
    25M fp32 elements ``x.abs()`` costs 47 ms, ``torch.abs(x, out=buffer)`` 7 ms (measured on this project's
    2-core machine). Holding ``|x|`` and the candidate mask across calls costs ``n`` values and ``n`` bools of
    memory for the largest tensor selected. Not thread-safe; not pickled (rebuilt empty).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements (contents undefined), reused by later calls with the same name."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel]

    def abs(self, x: torch.Tensor) -> torch.Tensor:
        """``|x|`` written into this workspace's ``"abs"`` buffer (valid until the next call)."""
        return torch.abs(x, out=self.get("abs", x.numel(), x.dtype, x.device))

    def __getstate__(self) -> dict:
        return {"_buffers": {}}


#: entries per row of the row-maximum scan in :func:`entries_at_least`
_ROW = 32


def entries_at_least(mag: torch.Tensor, threshold: torch.Tensor | float, workspace: Workspace | None = None, *,
                     strict: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of a flat ``mag`` >= ``threshold`` (``strict``: >): their indices (int64, ascending) and values.

    On a CPU a comparison into a bool mask costs about twice a read pass, and ``nonzero`` over it four times. So
    the maxima of rows of 32 entries come first (one read pass), and only the rows whose maximum reaches the
    threshold are compared: at a density of 1 % about a third of the rows, at 0.1 % 4 %. When more than half
    the rows reach it, the whole tensor is compared instead, and always on an accelerator (where each ``nonzero``
    waits for the host). NaN entries never qualify, as with ``mag >= t``. ``workspace``: the whole comparison's
    bool mask reuses its ``"mask"`` buffer.
    """
    compare = torch.gt if strict else torch.ge
    n = mag.numel()
    full = n - n % _ROW
    rows = mag[:full].view(-1, _ROW)
    hit = None
    if mag.device.type == "cpu":
        row_max = rows.amax(1)
        # a row qualifies unless its maximum fails the test; a NaN maximum: that row is compared entry by entry
        hit = (~(row_max <= threshold if strict else row_max < threshold)).nonzero().view(-1)
    if hit is None or 2 * hit.numel() > rows.shape[0]:
        out = {} if workspace is None else {"out": workspace.get("mask", n, torch.bool, mag.device)}
        found = compare(mag, threshold, **out).nonzero().view(-1)
        return found, mag[found]
    block = rows.index_select(0, hit).view(-1)
    where = compare(block, threshold).nonzero().view(-1)
    found, values = hit[where // _ROW] * _ROW + where % _ROW, block[where]
    if full < n:
        tail = compare(mag[full:], threshold).nonzero().view(-1) + full
        found, values = torch.cat([found, tail]), torch.cat([values, mag[tail]])
    return found, values


class Compressor:
    """Base class. Subclasses implement :meth:`compress`; stateful ones also the state methods.

    Class attributes:
        name: registry name (``"topk"``, ...).
        needs_second_moment: True if :meth:`compress` needs ``ctx.second_moment`` (variance-based selection);
            :func:`sparsedist.register` then installs the module hooks that compute it.
        shared_indices: True if every rank selects the same indices (values-only allreduce is valid).
        contractive: True if what :meth:`compress` leaves behind (``acc - sent``) is never larger than ``acc``
            (top-k, threshold, uniform rand-k): what error feedback needs to converge (Karimireddy et al. 2019).
            An unbiased compressor that rescales its values by ``1/p`` is not; error feedback is then off unless
            asked for, and refused if asked for.
        count_bounded: True if :meth:`compress` never returns more than ``count_for_density(n, density_at(step))``
            entries, so that payloads can be padded to a bound known from the configuration (the hook then sends
            them with one asynchronous collective of fixed size, overlapped with the backward pass).
        dense_fallback: True if sending every entry of the accumulator is a sound step of this method, so that
            ``collective="auto"`` may skip selection and allreduce everything when that is fastest (a fast link);
            the residual is then flushed (see :meth:`dense_step`).
        accumulates_plainly: True if :meth:`accumulate` is ``grad + residual`` (so a dense send may add the
            residual into the gradient buffer in place); False when it transforms the gradient (DGC's momentum).
    """

    name = "base"
    needs_second_moment = False
    shared_indices = False
    count_bounded = False
    contractive = True
    dense_fallback = True
    accumulates_plainly = True

    def accumulate(self, grad: torch.Tensor, residual: torch.Tensor | None, ctx: SelectContext) -> torch.Tensor:
        """Return the accumulator to select from: ``grad + residual`` (a new tensor; inputs untouched).

        Args:
            grad: flat gradient of this step, ``(n,)``, this rank's (not yet averaged over ranks).
            residual: flat residual ``(n,)`` in the accumulator dtype, or None when error feedback is off.
            ctx: the tensor's key, the step, the world size (e.g. DGC's clipping threshold scales with it).
        """
        if residual is None:
            return grad.clone()
        return residual + grad

    def compress(self, acc: torch.Tensor, ctx: SelectContext) -> SparseGrad:
        """Select what to send from the flat accumulator ``acc`` (``(n,)``, floating)."""
        raise NotImplementedError

    def after_send(self, key: str, payload: SparseGrad, finite: bool | torch.Tensor = True) -> None:
        """Commit compressor-side state once ``payload`` has been exchanged (default: nothing).

        ``finite`` is True, or a 0-d bool tensor (an overlapped exchange on an accelerator, which must not wait for
        the host): then commit on the device only where it is True (``torch.where``).

        Compressors must not change their persistent state in :meth:`accumulate` or :meth:`compress`: when an
        exchange is abandoned (a non-finite gradient on some rank), the hook skips :meth:`after_send` and calls
        :meth:`discard_pending` for the tensor, and its state must be exactly as before the step. Commits may
        run on the communication thread (an overlapped exchange's callback), one tensor at a time: touch only
        ``key``'s state.
        """

    def discard_pending(self, key: str) -> None:
        """Forget whatever :meth:`accumulate`/:meth:`compress` prepared for ``key`` in an abandoned exchange."""

    def after_send_all(self, key: str) -> None:
        """Commit compressor-side state once the whole accumulator of ``key`` was exchanged (``collective="auto"``
        chose the dense sum, so :meth:`compress` was not called). Default: nothing."""

    def dense_step(self, grad: torch.Tensor, residual: torch.Tensor | None, ctx: SelectContext,
                   scale: float = 1.0) -> None:
        """``collective="auto"``'s dense choice, in place: turn ``grad`` into the accumulator this method would
        select from, so that it can be sent whole by plain DDP's asynchronous allreduce. State changes stay
        pending like :meth:`accumulate`'s: the hook calls :meth:`after_send_all` once the sum is known to be
        finite (and drops the residual), otherwise nothing.

        Args:
            grad: flat gradient ``(n,)``, a view into the DDP bucket (overwritten).
            residual: the residual ``(n,)`` in ``grad``'s dtype (unscaled units), or None (none kept).
            ctx: as for :meth:`accumulate`.
            scale: the loss scale ``grad`` carries (the residual is added times ``scale``).
        """
        if residual is not None:
            grad.add_(residual, alpha=scale)

    def density_at(self, step: int) -> float | None:
        """Target density at ``step`` for fixed-density compressors, else None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Per-tensor state (e.g. DGC momenta), keyed by the tensor's ``key`` (its parameter name)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state with keys {sorted(state)}")

    def options(self) -> dict[str, Any]:
        """The compressor's configuration, for logging and for checking that all ranks agree."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class FixedDensityCompressor(Compressor):
    """A compressor that sends ``ceil(density * n)`` entries of each tensor (top-k, rand-k), or that many on
    average (Wangni's unbiased rand-k).

    Args:
        density: fraction of entries sent, in (0, 1].
    """

    def __init__(self, density: float = 0.01):
        self.density = check_density(density)

    def density_at(self, step: int) -> float:
        return self.density

    def options(self) -> dict[str, Any]:
        return {"density": self.density}
