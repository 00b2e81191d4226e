"""Optimizer state that shrinks with density: Adam, AdamW and SGD packed to the active weights of masked params.

Under a model-sparsity mask (RigL, SET, static) the weights outside the mask stay zero, and so do their gradients
once masked -- yet a dense optimizer keeps SGD momentum and Adam's two moments for every weight, so a 90 %-sparse
model costs as much optimizer memory as a dense one. :class:`PackedOptimizer` keeps, for every parameter the
mask provider masks, the int32 positions of its active weights and its state tensors at those positions only
(``2 * density * n`` values for Adam instead of ``2 * n``); unmasked parameters (biases, norms, dense layers)
keep the usual dense state. Each step gathers the active weights and gradients, runs PyTorch's own functional
update (``torch.optim.adam.adam`` / ``torch.optim.sgd.sgd``, single-tensor) on the packed tensors and scatters the
weights back, so the packed state equals, entry for entry, the state a dense ``torch.optim.AdamW(...,
foreach=False)`` keeps at the active positions (tests/test_packed_optim.py checks it bit for bit).

When the masks change (``mask_version`` of the provider), the state is re-packed: weights that stay active keep
their slots, grown weights get zero slots (exactly what RigL does to a dense optimizer's state), dropped ones
lose theirs.

Gradients: with ``pack_gradients=True`` (default) a post-accumulate-grad hook packs every masked parameter's
gradient as soon as it is ready (``param.grad`` becomes None; :meth:`packed_grad` has it), so between backward and
step only ``density * n`` gradient values are kept -- except on the mask provider's dense-gradient steps (RigL's
updates), which keep the dense gradient. Under ``fully_shard`` the unmasked parameters' gradients are copied out
of FSDP's flat reduce-scatter buffer, so that the buffer is freed. Not compatible with ``GradScaler`` (it unscales
``param.grad`` only); unscale before packing or use bf16.

Usage::

    opt = sparsedist.optim.PackedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.0)
    rigl = sparsedist.sparsity.RigL(model, opt, density=0.1, ...)   # or sparsedist.fsdp.ShardedRigL
    opt.attach_masks(rigl)
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.optim.adam import adam as _adam
from torch.optim.sgd import sgd as _sgd

from .base import closure_loss

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - old torch
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["PackedOptimizer", "PackedAdam", "PackedAdamW", "PackedSGD", "repack"]

_ALGORITHMS = ("adam", "adamw", "sgd")
_PACKED_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def repack(values: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Values packed at sorted positions ``old`` re-packed at sorted positions ``new``: a position in both keeps
    its value, a new one gets 0, one that left is dropped. ``(len(new),)``, ``values``' dtype."""
    old, new = old.long(), new.long()
    out = values.new_zeros(new.numel())
    if old.numel():
        at = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
        hit = old[at] == new
        out[hit] = values[at[hit]]
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


class PackedOptimizer(torch.optim.Optimizer):
    """Adam / AdamW / SGD with state packed to the active weights of masked parameters.

    Args:
        params: parameters, ``named_parameters()`` or parameter groups, as for any ``torch.optim`` optimizer.
        algorithm: ``"adam"``, ``"adamw"`` (decoupled weight decay) or ``"sgd"``.
        masks: a mask provider (``mask_of(param)`` -> bool mask of the parameter's local shape or None,
            ``mask_version``, ``needs_dense_gradient()``), or None until :meth:`attach_masks`.
        pack_gradients: pack masked gradients as soon as they are ready (see the module docs).
        **defaults: the algorithm's hyper-parameters with ``torch.optim``'s names and defaults: ``lr``,
            ``betas``, ``eps``, ``weight_decay``, ``amsgrad=False`` (Adam/AdamW); ``lr``, ``momentum``,
            ``dampening``, ``weight_decay``, ``nesterov`` (SGD); ``maximize``.
    """

    def __init__(self, params: Iterable, algorithm: str = "adamw", *, masks: Any = None, pack_gradients: bool = True,
                 **defaults: Any):
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")
        base = ({"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
                if algorithm == "sgd" else
                {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False,
                 "weight_decay": 1e-2 if algorithm == "adamw" else 0.0})
        base["maximize"] = False
        unknown = sorted(set(defaults) - set(base))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {algorithm}; valid: {sorted(base)}")
        base.update(defaults)
        if base.get("amsgrad"):
            raise ValueError("amsgrad is not supported by PackedOptimizer (its max_exp_avg_sq is not packed)")
        self.algorithm = algorithm
        self.pack_gradients = bool(pack_gradients)
        super().__init__(params, base)
        self._masks = None
        self._packed: dict[torch.Tensor, torch.Tensor] = {}
        self._hooks: list = []
        if masks is not None:
            self.attach_masks(masks)

    # -- masks -------------------------------------------------------------------------------------------
    def attach_masks(self, masks: Any) -> "PackedOptimizer":
        """Use ``masks`` (e.g. the RigL object built with this optimizer) from now on; returns self."""
        if not callable(getattr(masks, "mask_of", None)):
            raise TypeError(f"masks must provide mask_of(param) (e.g. sparsedist RigL), got {type(masks).__name__}")
        for h in self._hooks:
            h.remove()
        self._masks, self._hooks = masks, []
        if self.pack_gradients:
            for group in self.param_groups:
                for p in group["params"]:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._pack_hook))
        return self

    def _mask(self, p: torch.Tensor) -> torch.Tensor | None:
        return None if self._masks is None else self._masks.mask_of(p)

    def _index(self, p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The active positions of ``p`` (flat, local), re-packing ``p``'s state when the mask changed."""
        state = self.state[p]
        version = getattr(self._masks, "mask_version", None)
        idx = state.get("index")
        if idx is not None and version is not None and state.get("mask_version") == version:
            return idx
        new = mask.reshape(-1).nonzero().view(-1)
        new = new.to(torch.int32) if mask.numel() < 2**31 else new
        if idx is not None and not torch.equal(idx.long(), new.long()):
            self._repack(state, idx.long(), new.long())
        state["index"], state["mask_version"] = new, version
        return new

    @staticmethod
    def _repack(state: dict, old: torch.Tensor, new: torch.Tensor) -> None:
        for key in _PACKED_KEYS:
            if state.get(key) is not None:
                state[key] = repack(state[key], old, new)

    # -- gradients ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _pack_hook(self, p: torch.Tensor) -> None:
        if p.grad is None or self._masks is None or self._masks.needs_dense_gradient():
            return
        mask = self._mask(p)
        if mask is None:
            if DTensor is not None and isinstance(p.grad, DTensor):
                p.grad = p.grad.clone()  # out of FSDP's flat reduce-scatter buffer, so that it can be freed
            return
        g = _local(p.grad).reshape(-1)[self._index(p, mask)]
        prev = self._packed.get(p)
        self._packed[p] = g if prev is None else prev.add_(g)
        p.grad = None

    def packed_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """The packed gradient of masked parameter ``p`` since the last ``zero_grad`` (None if none)."""
        return self._packed.get(p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, keeping the positions integers (torch would cast every
        state tensor of a floating parameter to its dtype)."""
        sd = dict(state_dict)
        sd["state"] = {k: dict(v) for k, v in state_dict["state"].items()}
        positions = {k: s.pop("index") for k, s in sd["state"].items() if "index" in s}
        super().load_state_dict(sd)
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(saved, (p for g in self.param_groups for p in g["params"])):
            if i in positions:
                self.state[p]["index"] = positions[i].to(_local(p).device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._packed.clear()

    # -- step --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            work, writes = [], []
            for p in group["params"]:
                mask = self._mask(p)
                idx = self._index(p, mask) if mask is not None else None
                g = self._packed.get(p) if idx is not None else None
                if g is None and p.grad is not None:
                    g = _local(p.grad)
                    if idx is not None:
                        g = g.reshape(-1)[idx]
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError("PackedOptimizer does not take sparse gradients (nn.Embedding(sparse=True))")
                w = _local(p)
                if idx is not None:
                    w = w.reshape(-1)[idx]
                    writes.append((p, idx, w))
                work.append((p, w, g))
            if work:
                self._update(group, work)
            for p, idx, w in writes:
                _local(p).view(-1).index_copy_(0, idx.long(), w)
        return loss

    def _update(self, group: dict, work: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """One step of the algorithm over ``(param, weights, grad)`` (weights packed or the param's local tensor)."""
        states = [self.state[p] for p, _, _ in work]
        weights, grads = [w for _, w, _ in work], [g for _, _, g in work]
        if self.algorithm == "sgd":
            bufs = [s.get("momentum_buffer") for s in states]
            _sgd(weights, grads, bufs, foreach=False, weight_decay=group["weight_decay"],
                 momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                 nesterov=group["nesterov"], maximize=group["maximize"])
            if group["momentum"] != 0:
                for s, b in zip(states, bufs):
                    s["momentum_buffer"] = b
            return
        for s, w in zip(states, weights):
            if "step" not in s:
                s["step"] = torch.zeros((), dtype=torch.float32)
                s["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        _adam(weights, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], foreach=False, decoupled_weight_decay=self.algorithm == "adamw",
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=group["maximize"])

    # -- accounting ----------------------------------------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state on this rank: ``values`` (moments / momentum) and ``index`` (positions)."""
        values = index = 0
        for s in self.state.values():
            for k, v in s.items():
                if torch.is_tensor(v) and k != "step":
                    n = _local(v).numel() * v.element_size()
                    index, values = (index + n, values) if k == "index" else (index, values + n)
        return {"values": values, "index": index}


class PackedAdam(PackedOptimizer):
    """:class:`PackedOptimizer` with ``torch.optim.Adam``'s signature (L2 weight decay)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, masks=None,
                 pack_gradients=True, maximize=False):
        super().__init__(params, "adam", masks=masks, pack_gradients=pack_gradients, lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, maximize=maximize)


class PackedAdamW(PackedOptimizer):
    """:class:`PackedOptimizer` with ``torch.optim.AdamW``'s signature (decoupled weight decay)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, masks=None,
                 pack_gradients=True, maximize=False):
        super().__init__(params, "adamw", masks=masks, pack_gradients=pack_gradients, lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, maximize=maximize)


class PackedSGD(PackedOptimizer):
    """:class:`PackedOptimizer` with ``torch.optim.SGD``'s signature."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 masks=None, pack_gradients=True, maximize=False):
        super().__init__(params, "sgd", masks=masks, pack_gradients=pack_gradients, lr=lr, momentum=momentum,
                         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
