"""Dead neurons after unstructured pruning (Han et al. 2015, section 3.4).

After pruning connections, a neuron (or filter) with no input connections left, or with no output
connections left, is dead: Han et al. remove it with all its remaining connections. Here, for every
:class:`~sparsedist.sparsity.graph.LayerPair` whose two weights are both masked:

* a neuron with **no output connections** (its consumer inputs are all masked) loses its input connections:
  the network computes exactly the same function;
* a neuron with **no input connections** outputs a constant, ``act(bias)``. Its contribution to the next
  layer is folded into that layer's bias, and its output connections are removed, again without changing the
  function. This is exact when nothing but element-wise activations, dropout, pooling that keeps a constant
  constant and a ``Flatten`` lie between, and the consumer is a Linear layer, or a convolution without
  padding; otherwise (a BatchNorm between, a padded convolution, a function call between) the neuron is left
  as it is, since its constant output still matters.

Repeated until nothing changes (removing inputs can leave a neuron of the layer before without outputs).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .graph import LayerPair

__all__ = ["remove_dead_neurons"]

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
                nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus)
_KEEP_CONSTANT = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten,
                  nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                  nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def _outputs_alive(mask: torch.Tensor, consumer: nn.Module, width: int, repeat: int) -> torch.Tensor:
    """Per producer output: does any active consumer weight read it?"""
    if isinstance(consumer, nn.Linear):
        return mask.view(mask.shape[0], width, repeat).any(dim=2).any(dim=0)
    return mask.transpose(0, 1).reshape(width, -1).any(dim=1)


def _constant_path(pair: LayerPair, modules: Mapping[str, nn.Module]) -> list[nn.Module] | None:
    """The activations between the pair if a constant input stays a foldable constant, else None."""
    if pair.norm is not None:
        return None
    acts = []
    for name in pair.between:
        m = modules.get(name)
        if m is None:  # a function call: not inspected
            return None
        if isinstance(m, _ACTIVATIONS):
            acts.append(m)
        elif isinstance(m, _AVG_POOLS):
            if any(int(p) != 0 for p in torch.as_tensor(m.padding).reshape(-1).tolist()):
                return None
        elif not isinstance(m, _KEEP_CONSTANT):
            return None
    consumer = modules[pair.consumer]
    if not isinstance(consumer, nn.Linear):
        pad = consumer.padding
        if isinstance(pad, str) and pad != "valid" or not isinstance(pad, str) and any(int(p) for p in pad):
            return None
    return acts


@torch.no_grad()
def remove_dead_neurons(model: nn.Module, masks: Mapping[str, torch.Tensor], pairs: Sequence[LayerPair]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Remove the connections of dead neurons (see the module documentation).

    Args:
        model: the model the pairs' names refer to (``model.named_modules()``); the consumers' biases are
            changed in place where a constant output is folded into them.
        masks: parameter name (``"<module>.weight"``) -> bool mask; pairs whose two weights are not both in
            it are skipped. Not modified.
        pairs: from :func:`~sparsedist.sparsity.graph.find_layer_pairs`.

    Returns:
        ``(new_masks, removed)``: a copy of ``masks`` with the dead neurons' connections removed, and producer
        name -> number of its neurons that are dead (no connections left on either side) afterwards.
    """
    modules = dict(model.named_modules())
    new = {n: m.clone() for n, m in masks.items()}
    usable = [p for p in pairs if f"{p.producer}.weight" in new and f"{p.consumer}.weight" in new]
    changed = True
    while changed:
        changed = False
        for pair in usable:
            prod, cons = modules[pair.producer], modules[pair.consumer]
            pm, cm = new[f"{pair.producer}.weight"], new[f"{pair.consumer}.weight"]
            width = pm.shape[0]
            has_in = pm.reshape(width, -1).any(dim=1)
            has_out = _outputs_alive(cm, cons, width, pair.repeat)
            cut_in = has_in & ~has_out  # inputs of neurons nobody reads
            cut_out = ~has_in & has_out  # outputs of constant neurons, if foldable
            if cut_out.any():
                acts = _constant_path(pair, modules)
                bias = prod.bias.detach() if prod.bias is not None else torch.zeros(width, device=pm.device)
                if acts is None:
                    cut_out[:] = False
                else:
                    h = bias.float()
                    for act in acts:
                        h = act(h)
                    h = torch.where(cut_out, h, torch.zeros_like(h))
                    w = cons.weight.detach().float() * cm
                    if isinstance(cons, nn.Linear):
                        contribution = w.view(w.shape[0], width, pair.repeat).sum(dim=2) @ h
                    else:
                        contribution = w.transpose(0, 1).reshape(width, w.shape[0], -1).sum(dim=2).t() @ h
                    if cons.bias is not None:
                        cons.bias.add_(contribution.to(cons.bias.dtype))
                    elif contribution.abs().max() > 0:
                        cut_out[:] = False  # nowhere to fold a non-zero constant: keep those neurons
            if cut_in.any():
                pm[cut_in] = False
                changed = True
            if cut_out.any():
                if isinstance(cons, nn.Linear):
                    cm.view(cm.shape[0], width, pair.repeat)[:, cut_out, :] = False
                else:
                    cm[:, cut_out] = False
                changed = True
    removed = {}
    for pair in usable:
        pm, cm = new[f"{pair.producer}.weight"], new[f"{pair.consumer}.weight"]
        width = pm.shape[0]
        dead = ~pm.reshape(width, -1).any(dim=1) & ~_outputs_alive(cm, modules[pair.consumer], width, pair.repeat)
        removed[pair.producer] = int(dead.sum())
    return new, removed
