"""RigL (Evci et al. 2020) on ``fully_shard`` models: masks sharded like their parameters.

:class:`ShardedRigL` is :class:`sparsedist.sparsity.RigL` where each rank holds only the mask of its own shard of
every sparsified parameter (a bool tensor of the local shard's shape), applies it to its shard of the weights,
of the gradients and of the optimizer state, and saves it in its own checkpoint shard with the schedule.

An update step (every ``update_every`` steps until ``stop_at``) works one layer at a time on full tensors, like
FSDP's own all-gather for the forward pass: the layer's weights, its dense gradient (averaged over all ranks by
the reduce-scatter, which the sparse exchange makes dense on these steps) and its mask are all-gathered, every
rank computes the same new mask with :func:`regrow` (the same arithmetic and tie-breaking as the DDP
:class:`~sparsedist.sparsity.RigL`, so the masks are the ones RigL would compute on the unsharded model), and
keeps its shard. Grown weights and their optimizer slots start at zero; the optimizer skips the step, as in RigL.
Transient memory per update: one layer's full weights and gradient (fp32) and mask.

The initial masks are drawn exactly as :class:`~sparsedist.sparsity.RigL` draws them (full, from the shared seed)
and cut to the local shard, so a sharded and an unsharded run start from the same masks.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.distributed as dist

from ..sparsity import RigL, top_n

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - old torch
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["ShardedRigL", "regrow", "local_shard_of", "local_of"]

_MUL, _MOD = 2_654_435_761, 2_147_483_647  # position fingerprint: sum((idx * _MUL) mod _MOD)


def regrow(weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, n_active: int,
           n: int) -> torch.Tensor:
    """RigL's update of one layer, on full tensors: a new bool mask of ``mask``'s shape.

    Keeps the ``n_active - n`` active weights of largest ``|weight|``, then grows the ``n`` positions of largest
    ``|grad|`` among those not kept (a just-dropped one may return). Ties go to the lower flat index
    (:func:`~sparsedist.sparsity.top_n`); NaN gradients score 0. Deterministic: equal inputs give equal masks.
    """
    neg_inf = torch.tensor(float("-inf"), device=weight.device)
    magnitude = torch.where(mask.reshape(-1), weight.detach().reshape(-1).abs().float(), neg_inf)
    new = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    new[top_n(magnitude, n_active - n)] = True
    score = (torch.zeros(mask.numel(), device=weight.device) if grad is None
             else grad.detach().reshape(-1).abs().float())
    score = torch.nan_to_num(score, nan=0.0, posinf=torch.finfo(torch.float32).max)
    new[top_n(torch.where(new, neg_inf, score), n)] = True
    return new.view_as(mask)


def local_of(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (shares storage), or ``t`` itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _shard_coordinate(param) -> tuple[int, int, int]:
    """``(mesh dim, this rank's coordinate on it, its size)`` of ``param``'s Shard(0) placement."""
    for dim, placement in enumerate(param.placements):
        if placement.is_shard():
            return dim, int(param.device_mesh.get_coordinate()[dim]), int(param.device_mesh.size(dim))
    return 0, 0, 1


def local_shard_of(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` (``param``'s full shape), cut as ``fully_shard`` cuts ``param``."""
    if DTensor is None or not isinstance(param, DTensor):
        return full
    _, coord, size = _shard_coordinate(param)
    chunks = torch.chunk(full, size, dim=0)
    piece = chunks[coord] if coord < len(chunks) else full.new_empty((0, *full.shape[1:]))
    want = tuple(param.to_local().shape)
    if tuple(piece.shape) != want:
        raise RuntimeError(f"sparsedist.fsdp: shard of shape {tuple(piece.shape)} does not match the local "
                           f"parameter's {want}; only fully_shard's even Shard(0) placement is supported")
    return piece.contiguous().clone()


def _row_offset(param: torch.Tensor) -> int:
    """Flat position in the full parameter where this rank's shard starts."""
    if DTensor is None or not isinstance(param, DTensor):
        return 0
    _, coord, size = _shard_coordinate(param)
    rows = math.ceil(param.shape[0] / size) if param.dim() else 0
    return min(coord * rows, param.shape[0] if param.dim() else 0) * math.prod(param.shape[1:])


def _full(param: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor | None:
    """All-gather a local shard (``param``'s placement) into the full tensor; bool travels as uint8."""
    if local is None or DTensor is None or not isinstance(param, DTensor):
        return local
    if isinstance(local, DTensor):
        return local.full_tensor()
    flag = local.dtype == torch.bool
    t = DTensor.from_local(local.to(torch.uint8) if flag else local, param.device_mesh, param.placements,
                           shape=param.shape, stride=param.stride()).full_tensor()
    return t.bool() if flag else t


class ShardedRigL(RigL):
    """:class:`sparsedist.sparsity.RigL` for ``fully_shard`` models; masks are local shards.

    Args: those of :class:`~sparsedist.sparsity.RigL` (``model`` is the ``fully_shard``-ed root, ``optimizer``
    its optimizer, e.g. a :class:`sparsedist.optim.PackedOptimizer`). ``average_gradients`` is always False:
    FSDP's reduce-scatter already averages. ``process_group``: the group over which masks are verified
    (default: all ranks; under HSDP the replicas of a shard must hold identical masks, and do).

    The mask provider protocol of the exchange (``mask_of``, ``needs_dense_gradient``, ``mask_version``) plus
    ``sharded_masks = True``: ``mask_of(param)`` returns the mask of this rank's shard.
    """

    sharded_masks = True

    def __init__(self, model, optimizer, density: float = 0.1, distribution: str | Mapping[str, float] = "erk",
                 **kwargs: Any) -> None:
        kwargs["average_gradients"] = False
        self._sharded = False  # RigL's constructor applies and verifies its full masks: wait until cut
        super().__init__(model, optimizer, density, distribution, **kwargs)
        self._masks = [local_shard_of(p, m) for p, m in zip(self._params, self._masks)]
        self._by_id = {id(p): m for p, m in zip(self._params, self._masks)}
        self._sharded = True
        self.apply_masks()
        self.verify_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self._sharded:
            for p, m in zip(self._params, self._masks):
                local_of(p).masked_fill_(~m, 0)

    def verify_masks(self) -> None:
        """Check across ranks that the shards of every mask hold exactly the layer's active count, and that the
        replicas of a shard (HSDP) hold identical masks; raise naming the layer otherwise. One all_gather."""
        if not self._sharded or not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(self._group)
        coord = _shard_coordinate(self._params[0])[1] if DTensor is not None and isinstance(
            self._params[0], DTensor) else 0
        rows = [torch.tensor([self._step, len(self._masks), coord], dtype=torch.long)]
        for p, m in zip(self._params, self._masks):
            idx = m.reshape(-1).nonzero().view(-1).cpu() + _row_offset(p)
            rows.append(torch.stack([torch.tensor(idx.numel()), idx.sum(), ((idx * _MUL) % _MOD).sum()]))
        local = torch.stack(rows).to(self._masks[0].device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=self._group)
        by_coord: dict[int, torch.Tensor] = {}
        for r, g in enumerate(gathered):
            c = int(g[0, 2])
            if c in by_coord and not torch.equal(by_coord[c], g):
                raise RuntimeError(f"ShardedRigL: replicas of shard {c} differ at step {self._step} (rank {r}: "
                                   f"{g[:, 0].tolist()}, another: {by_coord[c][:, 0].tolist()}); masks must be "
                                   f"computed from identical weights and gradients on every replica")
            by_coord[c] = g
        totals = torch.stack(list(by_coord.values()))[:, 1:, 0].sum(0).tolist()
        for name, total in zip(self._names, totals):
            if total != self._counts[name]:
                raise RuntimeError(f"ShardedRigL: the shards of {name!r} hold {total} active weights together, "
                                   f"the layer has {self._counts[name]}; ranks disagree on its mask")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        counts = dict(self._counts)
        super().load_state_dict(state)  # counts what it loaded locally: restore the layers' totals
        local = torch.tensor([int(m.sum()) for m in self._masks], dtype=torch.long,
                             device=self._masks[0].device)
        group = self._params[0].device_mesh.get_group(_shard_coordinate(self._params[0])[0]) \
            if DTensor is not None and isinstance(self._params[0], DTensor) else None
        if group is not None:
            dist.all_reduce(local, group=group)
        self._counts = {n: int(c) for n, c in zip(self._names, local.tolist())}
        if self._counts != counts:
            self._counts = counts
            raise ValueError("ShardedRigL.load_state_dict: the checkpoint's masks hold other per-layer counts "
                             "than this model's (another density or distribution); build it as when saving")
        self.verify_masks()

    # -- overridden steps ------------------------------------------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._update_due(self._step):
            super()._pre_step(optimizer, args, kwargs)
            return
        with torch.no_grad():
            for p, m in zip(self._params, self._masks):
                if p.grad is not None:
                    local_of(p.grad).masked_fill_(~m, 0)

    @torch.no_grad()
    def _update_masks(self, step: int, grads: list[torch.Tensor | None]) -> None:
        f = self.schedule.drop_fraction(step)
        changed = False
        for name, p, m, g in zip(self._names, self._params, self._masks, grads):
            n = int(math.floor(f * self._counts[name]))
            if n == 0:
                continue
            old = _full(p, m)
            new = regrow(_full(p, p), _full(p, g), old, self._counts[name], n)
            if torch.equal(new, old):
                continue
            mine = local_shard_of(p, new)
            grown = mine & ~m
            local_of(p).masked_fill_(grown, 0)  # grown weights start at zero ...
            for v in self._optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape):
                    local_of(v).masked_fill_(grown, 0)  # ... with fresh optimizer slots
            m.copy_(mine)
            local_of(p).masked_fill_(~m, 0)
            changed = True
        if changed:
            self._mask_version += 1
        self.verify_masks()
