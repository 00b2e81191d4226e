"""Where each parameter's gradient sits in an FSDP2 reduce-scatter, and which rank owns which part of it.

``fully_shard`` gives every parameter a ``Shard(0)`` placement: its first dimension is padded to a multiple of
the world size ``P`` and cut into ``P`` equal chunks, chunk ``j`` living on rank ``j``. In backward, FSDP copies
the parameters' unsharded gradients of one module into one flat reduce-scatter input of ``P * S`` elements,
rank-chunk major: row ``j`` of ``input.view(P, S)`` holds chunk ``j`` of every parameter, one after the other,
and the reduce-scatter gives rank ``j`` the sum of row ``j`` (its shard of every parameter).

So for a parameter with ``numel`` elements, ``s`` elements per shard (``s = ceil(rows / P) * row_numel``) at
offset ``o`` within a row, its element ``q`` (flat, row-major) sits at flat input position
``(q // s) * S + o + q % s`` and belongs to rank ``q // s``. Padding (``P * s - numel`` zeros) comes last.

The parameters of one FSDP module, and their order, are those of ``fully_shard``'s own rule: a post-order walk
of the module tree that stops at nested ``fully_shard`` modules, each module's direct parameters in
registration order, shared ones once, only those that require grad (``register_fsdp`` sets
``set_reduce_scatter_unused_params(True)`` so that every such parameter is always present). The layout is
checked against the size FSDP hands over on every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

try:  # FSDP2 (torch >= 2.6); the package only needs it when used
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - old torch
    FSDPModule = DTensor = None  # type: ignore[assignment,misc]

__all__ = ["Slot", "ShardLayout", "managed_parameters"]


def managed_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name relative to module, parameter)`` of the parameters ``fully_shard(module)`` manages, in its order.

    Only parameters that require grad (those that appear in the reduce-scatter).
    """
    order: list[tuple[str, nn.Module]] = []
    seen_modules: set[int] = set()

    def walk(prefix: str, m: nn.Module) -> None:
        if m is not module and isinstance(m, FSDPModule):
            return  # a nested fully_shard module reduces its own parameters
        seen_modules.add(id(m))
        for child_name, child in m.named_children():
            if id(child) not in seen_modules:
                walk(f"{prefix}{child_name}.", child)
        order.append((prefix, m))

    walk("", module)
    out, seen = [], set()
    for prefix, m in order:
        for name, p in m.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                if p.requires_grad:
                    out.append((prefix + name, p))
    return out


@dataclass(frozen=True)
class Slot:
    """One parameter in a reduce-scatter input.

    Attributes:
        name: the parameter's name in the model passed to ``register_fsdp`` (keys residuals and masks).
        shape: its full (unsharded) shape.
        numel: its number of elements.
        shard: elements per rank chunk, ``ceil(shape[0] / P) * prod(shape[1:])``.
        offset: where its chunk starts within a row of ``S`` elements.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    shard: int
    offset: int

    def owner(self, q: torch.Tensor) -> torch.Tensor:
        """Owning rank of flat positions ``q`` (int64)."""
        return torch.div(q, self.shard, rounding_mode="floor")


class ShardLayout:
    """The flat reduce-scatter layout of one FSDP module at world size ``world_size``.

    Args:
        slots: the module's parameters in FSDP's order.
        world_size: ``P``, the size of the group the module is sharded over.
    """

    def __init__(self, slots: list[Slot], world_size: int):
        self.slots = slots
        self.world_size = int(world_size)
        self.chunk = sum(s.shard for s in slots)  # S: elements of each rank's output

    @classmethod
    def of(cls, module: nn.Module, names: dict[int, str], world_size: int) -> "ShardLayout":
        """The layout of ``fully_shard``-ed ``module``; ``names`` maps ``id(param)`` to its model-wide name."""
        slots, offset = [], 0
        for local_name, p in managed_parameters(module):
            if DTensor is not None and isinstance(p, DTensor):
                bad = [pl for pl in p.placements if pl.is_shard() and getattr(pl, "dim", 0) != 0]
                if bad:
                    raise ValueError(f"sparsedist.fsdp: parameter {local_name!r} is sharded on {bad}; only "
                                     f"fully_shard's default Shard(0) placement is supported (drop "
                                     f"shard_placement_fn)")
            shape = tuple(int(d) for d in p.shape) or (1,)
            row = math.prod(shape[1:])
            shard = math.ceil(shape[0] / world_size) * row
            slots.append(Slot(names.get(id(p), local_name), shape, math.prod(shape), shard, offset))
            offset += shard
        return cls(slots, world_size)

    @property
    def numel(self) -> int:
        """Elements of the reduce-scatter input, ``P * S``."""
        return self.world_size * self.chunk

    def check(self, input_numel: int, output_numel: int, what: str) -> None:
        if input_numel != self.numel or output_numel != self.chunk:
            raise RuntimeError(
                f"sparsedist.fsdp: {what} received a reduce-scatter of {input_numel} -> {output_numel} elements, "
                f"but its parameters {[s.name for s in self.slots][:6]} make {self.numel} -> {self.chunk} at world "
                f"size {self.world_size}; parameters were added, frozen or unfrozen after register_fsdp(), or "
                f"fully_shard was applied afterwards: call register_fsdp() again after the last change")

    def gradient(self, flat: torch.Tensor, slot: Slot) -> torch.Tensor:
        """Slot's unsharded local gradient ``(numel,)`` read from the flat input (a copy, padding dropped)."""
        rows = flat.view(self.world_size, self.chunk)[:, slot.offset: slot.offset + slot.shard]
        return rows.reshape(-1)[: slot.numel]

    def add_into(self, flat: torch.Tensor, slot: Slot, values: torch.Tensor) -> None:
        """``flat``'s slot += ``values`` (``(numel,)``, full parameter order), in place."""
        padded = values.new_zeros(self.world_size * slot.shard)
        padded[: slot.numel] = values
        rows = flat.view(self.world_size, self.chunk)[:, slot.offset: slot.offset + slot.shard]
        rows.add_(padded.view(self.world_size, slot.shard).to(flat.dtype))

    def positions(self, slot: Slot, q: torch.Tensor) -> torch.Tensor:
        """Flat input positions (int64) of the slot's elements ``q`` (int64, full parameter order)."""
        owner = slot.owner(q)
        return owner * self.chunk + slot.offset + (q - owner * slot.shard)

    def output_view(self, out: torch.Tensor, slot: Slot) -> torch.Tensor:
        """The slot's part of this rank's output (``(shard,)``, a view)."""
        return out[slot.offset: slot.offset + slot.shard]
