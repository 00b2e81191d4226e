"""Per-example gradient statistics as pure functions of a layer's inputs and output gradients.

For variance-based sparsification (Tsuzuku, Imachi & Akiba 2018) each parameter needs
``m2[i] = sum_n (d loss / d w_i restricted to example n)^2`` per step. One function per layer type turns the
``(input, output gradient)`` pairs of a layer's calls in one forward pass into ``(parameter, m2)``
contributions; :class:`sparsedist.second_moment.SecondMomentCollector` captures the pairs with module hooks and
adds the contributions up. The module docstring of :mod:`sparsedist.second_moment` states the forms and where
they are exact.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["linear", "conv", "embedding", "KINDS", "kind_of"]


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _chunk(max_chunk_elements: int, per_example: int) -> int:
    return max(1, max_chunk_elements // max(1, per_example))


def _by_batch(items: Iterable[tuple]) -> list[list]:
    """Split items into lists with equal example counts (calls that can be matched example by example)."""
    groups: dict[int, list] = {}
    for it in items:
        groups.setdefault(it[0].shape[0], []).append(it)
    return list(groups.values())


def _linear_examples(x: torch.Tensor, dy: torch.Tensor, batch_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P, I) inputs and (B, P, O) output grads in fp32: example, position, feature."""
    x = x.float()
    dy = dy.float()
    if x.dim() == 1:                  # unbatched: one example
        x, dy = x[None], dy[None]
    elif x.dim() >= 3 and batch_dim != 0:
        if batch_dim >= x.dim() - 1:
            raise ValueError(f"batch_dim={batch_dim} is not an example dimension of a Linear input of "
                             f"shape {tuple(x.shape)} (the last dimension holds the features)")
        x, dy = x.movedim(batch_dim, 0), dy.movedim(batch_dim, 0)
    return x.reshape(x.shape[0], -1, x.shape[-1]), dy.reshape(dy.shape[0], -1, dy.shape[-1])


def linear(module: nn.Linear, items: list[tuple[torch.Tensor, torch.Tensor]], *, mode: str = "exact",
           batch_dim: int = 0, max_chunk_elements: int = 1 << 24) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, m2)`` contributions of one ``nn.Linear``'s calls: ``items`` are ``(input, output grad)``
    pairs of the calls of one forward pass. Exact rank-one form for ``(B, I)`` inputs; per-example products,
    chunked, for sequence inputs (``mode="exact"``), or every position as an example (``"per_position"``)."""
    pairs = [_linear_examples(x, dy, batch_dim) for x, dy in items]
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    out_f, in_f = module.out_features, module.in_features
    for same_b in _by_batch(pairs):
        x = _cat([p[0] for p in same_b], dim=1)          # (B, P, I): calls act like extra positions
        dy = _cat([p[1] for p in same_b], dim=1)         # (B, P, O)
        b, positions = x.shape[0], x.shape[1]
        if positions == 1 or mode == "per_position":
            # rank-one per example (exact) or per-position approximation: one extra matrix product
            if weight is not None and weight.requires_grad:
                yield weight, dy.reshape(-1, out_f).square().t() @ x.reshape(-1, in_f).square()
            if bias is not None and bias.requires_grad:
                yield bias, dy.square().sum(dim=(0, 1))
            continue
        if weight is not None and weight.requires_grad:
            total = torch.zeros(out_f, in_f, dtype=torch.float32, device=x.device)
            step = _chunk(max_chunk_elements, out_f * in_f)
            for s in range(0, b, step):
                g = torch.bmm(dy[s:s + step].transpose(1, 2), x[s:s + step])   # per-example (b, O, I)
                total += g.square_().sum(dim=0)
            yield weight, total
        if bias is not None and bias.requires_grad:
            yield bias, dy.sum(dim=1).square().sum(dim=0)


def _im2col(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Unfold ``x`` (B, C, *S) into (B, C * prod(k), L) in the weight's (C, k1, k2, ...) order."""
    nd = len(module.kernel_size)
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    for j in range(nd):
        k, s, d = module.kernel_size[j], module.stride[j], module.dilation[j]
        span = d * (k - 1) + 1
        x = x.unfold(2 + j, span, s)          # adds a trailing window axis
        if d > 1:
            x = x[..., ::d]
    # x: (B, C, L1..Lnd, k1..knd) -> (B, C, k1..knd, L1..Lnd)
    b, c = x.shape[:2]
    perm = [0, 1] + [2 + nd + j for j in range(nd)] + [2 + j for j in range(nd)]
    x = x.permute(perm)
    return x.reshape(b, c * math.prod(module.kernel_size), -1)


def conv(module: nn.modules.conv._ConvNd, items: list[tuple[torch.Tensor, torch.Tensor]], *, mode: str = "exact",
         max_chunk_elements: int = 1 << 24) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, m2)`` contributions of one ``nn.Conv1d/2d/3d``'s calls: per-example gradients from the
    unfolded input (im2col), chunked over examples (``mode="exact"``), or every output position as an example
    (``"per_position"``)."""
    nd = len(module.kernel_size)
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    groups = module.groups
    out_c = module.out_channels
    ck = weight.shape[1] * math.prod(module.kernel_size)     # per-group input features (C/g * prod(k))
    pairs = []
    for x, dy in items:
        x, dy = x.float(), dy.float()
        if x.dim() == nd + 1:                      # unbatched: one example
            x, dy = x[None], dy[None]
        pairs.append((x, dy.reshape(dy.shape[0], out_c, -1)))
    for same_b in _by_batch(pairs):
        b = same_b[0][0].shape[0]
        if bias is not None and bias.requires_grad:
            dy_all = _cat([p[1] for p in same_b], dim=2)               # (B, O, L)
            if mode == "exact":
                yield bias, dy_all.sum(dim=2).square().sum(dim=0)
            else:
                yield bias, dy_all.square().sum(dim=(0, 2))
        if weight is None or not weight.requires_grad:
            continue
        total = torch.zeros(groups, out_c // groups, ck, dtype=torch.float32, device=same_b[0][0].device)
        length = sum(p[1].shape[2] for p in same_b)
        per_example = groups * ck * length + (out_c * ck if mode == "exact" else 0)
        step = _chunk(max_chunk_elements, per_example)
        for s in range(0, b, step):
            u = _cat([_im2col(module, x[s:s + step]) for x, _ in same_b], dim=2)   # (b, g*ck, L)
            d = _cat([dy[s:s + step] for _, dy in same_b], dim=2)                          # (b, O, L)
            n = u.shape[0]
            u = u.reshape(n, groups, ck, -1)
            d = d.reshape(n, groups, out_c // groups, -1)
            if mode == "exact":
                g = torch.matmul(d, u.transpose(2, 3))           # per-example (n, g, O/g, ck)
                total += g.square_().sum(dim=0)
            else:   # every (example, position) pair as an example: one product over all of them
                d2 = d.square().permute(1, 2, 0, 3).reshape(groups, out_c // groups, -1)   # (g, O/g, n*L)
                u2 = u.square().permute(1, 2, 0, 3).reshape(groups, ck, -1)               # (g, ck, n*L)
                total += torch.bmm(d2, u2.transpose(1, 2))
        yield weight, total.reshape(weight.shape)


def embedding(module: nn.Embedding, items: list[tuple[torch.Tensor, torch.Tensor]], *,
              batch_dim: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(weight, m2)`` of one ``nn.Embedding``'s calls: rows of the same (example, index) summed first, then
    squared and scattered into the table (exact, with repeated indices, ``padding_idx`` and
    ``scale_grad_by_freq``)."""
    weight = module._parameters.get("weight")
    if weight is None or not weight.requires_grad:
        return
    num, dim = module.num_embeddings, module.embedding_dim
    keys = []
    for n_off, (idx, dy) in enumerate(items):
        dy = dy.float()
        if module.scale_grad_by_freq:
            counts = torch.bincount(idx.reshape(-1), minlength=num).to(dy.dtype)
            dy = dy / counts[idx].unsqueeze(-1)
        if idx.dim() == 0:
            idx, dy = idx.reshape(1, 1), dy.reshape(1, 1, dim)
        elif idx.dim() == 1:                               # (B,): one index per example
            idx, dy = idx[:, None], dy[:, None, :]
        elif batch_dim != 0:
            if batch_dim >= idx.dim():
                raise ValueError(f"batch_dim={batch_dim} is not a dimension of an Embedding input of "
                                 f"shape {tuple(idx.shape)}")
            idx, dy = idx.movedim(batch_dim, 0), dy.movedim(batch_dim, 0)
        b = idx.shape[0]
        idx = idx.reshape(b, -1)
        dy = dy.reshape(b, -1, dim)
        example = torch.arange(b, device=idx.device)[:, None].expand_as(idx)
        keys.append((b, example, idx, dy))
    # calls with the same number of examples share example ids; others get their own id range
    offsets: dict[int, int] = {}
    next_free = 0
    flat_keys, flat_rows = [], []
    for b, example, idx, dy in keys:
        if b not in offsets:
            offsets[b] = next_free
            next_free += b
        k = (example + offsets[b]) * num + idx
        if module.padding_idx is not None:
            keep = idx != module.padding_idx
            k, dy = k[keep], dy[keep]
        flat_keys.append(k.reshape(-1))
        flat_rows.append(dy.reshape(-1, dim))
    k = _cat(flat_keys, dim=0)
    r = _cat(flat_rows, dim=0)
    if k.numel() == 0:
        yield weight, torch.zeros(num, dim, dtype=torch.float32, device=r.device)
        return
    uniq, inverse = torch.unique(k, return_inverse=True)
    per_example = torch.zeros(uniq.numel(), dim, dtype=torch.float32, device=r.device)
    per_example.index_add_(0, inverse, r)                   # sum rows of the same (example, index)
    out = torch.zeros(num, dim, dtype=torch.float32, device=r.device)
    out.index_add_(0, uniq % num, per_example.square_())
    yield weight, out


#: the layer types covered, and the function for each
KINDS = ((nn.Linear, linear), (nn.Conv1d, conv), (nn.Conv2d, conv), (nn.Conv3d, conv), (nn.Embedding, embedding))


def kind_of(m: nn.Module):
    """The statistics function for module ``m``, or None (a subclass that changes ``forward`` is not covered:
    the formulas assume the base class's computation)."""
    for cls, fn in KINDS:
        if isinstance(m, cls):
            return fn if type(m).forward is cls.forward else None
    return None
