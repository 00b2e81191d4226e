"""Export pruned models for inference, in forms that load and run without sparsedist.

* A structurally pruned model (:func:`~sparsedist.sparsity.structured.structured_prune`) already is a plain,
  smaller ``nn.Module``: :func:`export_dense` returns an unwrapped copy in eval mode, with every BatchNorm that
  directly follows a Conv or Linear layer folded into it (:func:`fold_batchnorm`; the usual inference step).
* An unstructured one: :func:`to_sparse_csr` replaces every Linear and Conv2d (``groups=1``) whose weight is
  sparse enough by a module holding the weight as a ``torch.sparse`` CSR matrix (``int32`` indices): Linear
  computes ``W_csr @ x^T``; Conv2d lays its input out as columns (im2col, one copy) and computes
  ``W_csr @ columns``.
* 2:4 (N:M) semi-structured sparsity: :func:`~sparsedist.sparsity.scores.nm_mask` makes the masks anywhere;
  :func:`to_semi_structured` converts Linear weights with ``torch.sparse.to_sparse_semi_structured``, which
  PyTorch implements for CUDA GPUs only (compute capability 8.0 and later, fp16/bf16; its CPU call raises),
  so on a CPU a 2:4 model runs as dense or as CSR.

:func:`save_inference` writes any of these as TorchScript (``torch.jit.script``): ``torch.jit.load(path)`` runs
it with nothing but PyTorch installed. :func:`storage_bytes` gives the bytes of the weights as stored.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .graph import module_calls

__all__ = ["export_dense", "fold_batchnorm", "to_sparse_csr", "to_semi_structured", "save_inference", "storage_bytes",
           "CSRLinear", "CSRConv2d"]


def _csr(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        dense = weight.detach().reshape(weight.shape[0], -1)
        csr = dense.to_sparse_csr()
        return torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                       csr.values(), dense.shape, check_invariants=False)


class CSRLinear(nn.Module):
    """Inference-only Linear with a CSR weight ``(out, in)``: input ``(..., in)`` -> ``(..., out)``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", _csr(linear.weight))
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = (self.weight @ x.reshape(-1, self.in_features).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(shape[:-1] + (self.out_features,))


class CSRConv2d(nn.Module):
    """Inference-only Conv2d (``groups=1``) with a CSR weight ``(out, in * kh * kw)``, computed on the unfolded
    input: ``(N, C, H, W)`` -> ``(N, out, H', W')``."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("CSRConv2d supports groups=1, padding_mode='zeros' and numeric padding only")
        self.out_channels = conv.out_channels
        self.kernel_size = (int(conv.kernel_size[0]), int(conv.kernel_size[1]))
        self.stride = (int(conv.stride[0]), int(conv.stride[1]))
        self.padding = (int(conv.padding[0]), int(conv.padding[1]))
        self.dilation = (int(conv.dilation[0]), int(conv.dilation[1]))
        self.register_buffer("weight", _csr(conv.weight))
        self.register_buffer("bias", conv.bias.detach().clone() if conv.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        kh, kw = self.kernel_size
        ph, pw = self.padding
        xp = F.pad(x, [pw, pw, ph, ph]) if ph > 0 or pw > 0 else x
        # im2col as one copy: windows as views (N, C, OH, OW, kh, kw), laid out as (C * kh * kw, N * OH * OW)
        win = xp.unfold(2, self.dilation[0] * (kh - 1) + 1, self.stride[0])
        win = win.unfold(3, self.dilation[1] * (kw - 1) + 1, self.stride[1])
        win = win[:, :, :, :, ::self.dilation[0], ::self.dilation[1]]
        oh, ow = win.shape[2], win.shape[3]
        cols = win.permute(1, 4, 5, 0, 2, 3).reshape(-1, n * oh * ow)
        y = (self.weight @ cols).reshape(self.out_channels, n, oh, ow).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every eval-mode BatchNorm whose input is the output of a Conv or Linear layer (used nowhere else, each
    module called once) into that layer's weight and bias, in place, and replace it by ``nn.Identity``.

    Found by tracing with ``torch.fx``; a model that cannot be traced is left unchanged. Returns the names of the
    folded BatchNorm modules. The folded model computes the same function in eval mode (up to rounding).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable models are exported without folding
        return []
    modules = dict(model.named_modules())
    calls = module_calls(graph)
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        layer, user = modules[node.target], next(iter(node.users))
        if user.op != "call_module" or calls[node.target] != 1 or calls[user.target] != 1:
            continue
        bn = modules[user.target]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_mean is None:
            continue
        if type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            fused = fuse_conv_bn_eval(layer, bn)
        elif type(layer) is nn.Linear and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            continue
        for name, new in ((node.target, fused), (user.target, nn.Identity())):
            parent, _, leaf = name.rpartition(".")
            setattr(modules[parent] if parent else model, leaf, new)
        folded.append(user.target)
    return folded


def export_dense(model: nn.Module) -> nn.Module:
    """An unwrapped (no DDP) deep copy of ``model`` in eval mode, gradients off, BatchNorm folded into the layer
    before it (:func:`fold_batchnorm`): what inference runs."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    out = copy.deepcopy(model).eval()
    fold_batchnorm(out)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _replace(model: nn.Module, convert) -> nn.Module:
    for name, child in list(model.named_children()):
        new = convert(child)
        if new is not None:
            setattr(model, name, new)
        else:
            _replace(child, convert)
    return model


def to_sparse_csr(model: nn.Module, min_sparsity: float = 0.0) -> nn.Module:
    """A copy of ``model`` for inference whose Linear and Conv2d (``groups=1``) layers with at least
    ``min_sparsity`` zero weights hold their weights in CSR form (:class:`CSRLinear`, :class:`CSRConv2d`).

    Zeros are read from the weights themselves (prune first: masked weights are exactly zero). float32 or
    float64 weights (PyTorch's CPU CSR kernels). The other modules are copied unchanged.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    out = export_dense(model)

    def convert(m: nn.Module) -> nn.Module | None:
        if type(m) not in (nn.Linear, nn.Conv2d):
            return None
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return None
        if float((m.weight == 0).float().mean()) < min_sparsity:
            return None
        if m.weight.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"CSR export needs float32/float64 weights (PyTorch's CPU sparse kernels), got "
                            f"{m.weight.dtype}; call model.float() first")
        return CSRLinear(m) if isinstance(m, nn.Linear) else CSRConv2d(m)

    return _replace(out, convert)


def to_semi_structured(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear weights use PyTorch's 2:4 semi-structured layout (CUDA only).

    The weights must already follow the 2:4 pattern (:func:`~sparsedist.sparsity.scores.nm_mask`) and live
    on a CUDA device PyTorch's kernels support (fp16/bf16, compute capability >= 8.0).

    Raises:
        RuntimeError: the model is not on CUDA: PyTorch has no CPU kernels for this layout.
    """
    out = export_dense(model)
    linears = [m for m in out.modules() if type(m) is nn.Linear]
    if not linears or any(not m.weight.is_cuda for m in linears):
        raise RuntimeError("2:4 semi-structured sparsity (torch.sparse.to_sparse_semi_structured) runs on CUDA "
                           "GPUs only; on a CPU run the 2:4-pruned model dense or export it with to_sparse_csr()")
    for m in linears:
        m.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
    return out


def save_inference(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (an export of this module, or any scriptable module) as TorchScript to ``path``;
    ``torch.jit.load(path)`` runs it without sparsedist."""
    scripted = torch.jit.script(model.eval())
    torch.jit.save(scripted, str(path))


def _tensor_bytes(t: torch.Tensor) -> int:
    if t.layout == torch.sparse_csr:
        return sum(x.numel() * x.element_size() for x in (t.crow_indices(), t.col_indices(), t.values()))
    return t.numel() * t.element_size()


def storage_bytes(model: nn.Module, scripted: bool = False) -> int:
    """Bytes of ``model``'s parameters and buffers as stored (CSR: values plus both index arrays), or, with
    ``scripted=True``, the size of its TorchScript file (code and archive overhead included)."""
    if scripted:
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(model.eval()), buf)
        return buf.getbuffer().nbytes
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t)
    return total
