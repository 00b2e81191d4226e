"""Which layers feed which: the (producer, consumer) pairs that neuron and filter removal work on.

A *pair* is a Linear or Conv layer (the producer) whose outputs reach exactly one other Linear or Conv layer
(the consumer) through operations that treat every channel on its own: element-wise activations, dropout,
pooling, at most one BatchNorm, and a ``Flatten`` from a convolution into a Linear layer. Removing output
neuron / filter ``j`` of the producer then means removing entry ``j`` of the BatchNorm and input ``j`` of the
consumer (with a ``Flatten``, its ``repeat`` consecutive input features ``j * repeat ... (j + 1) * repeat - 1``).

:func:`find_layer_pairs` finds them by tracing the model with ``torch.fx``. A producer whose output is also
used elsewhere (a residual connection, a concatenation, an attention reshape) is not a pair: its neurons
cannot be removed on their own. Models that cannot be traced can list their pairs by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerPair", "find_layer_pairs", "module_calls", "PRODUCERS", "CHANNELWISE"]

#: layers whose output neurons / filters can be removed (Conv with groups=1 only)
PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: modules that act on each channel on its own (BatchNorm is handled separately)
CHANNELWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, torch.tanh, torch.sigmoid,
              F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
              F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


@dataclass(frozen=True)
class LayerPair:
    """A producer layer whose output neurons/filters feed one consumer layer channel by channel.

    Attributes:
        producer: module name of the Linear / Conv layer whose outputs are removed.
        consumer: module name of the Linear / Conv layer that reads them.
        norm: module name of the BatchNorm between them, or None.
        between: module names of the other channel-wise modules between them, in order (a function call
            such as ``F.relu`` appears as ``"<function relu>"``).
        repeat: consumer inputs per producer output (1, or ``H * W`` after a ``Flatten`` of a convolution).
    """

    producer: str
    consumer: str
    norm: str | None = None
    between: tuple[str, ...] = ()
    repeat: int = 1


def _removable(m: nn.Module) -> bool:
    return isinstance(m, PRODUCERS) and getattr(m, "groups", 1) == 1


def _width_in(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _width_out(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _follow(node: torch.fx.Node, modules: dict[str, nn.Module]
            ) -> tuple[str, str | None, tuple[str, ...], bool, bool] | None:
    """Walk from a producer's output to the consumer; (consumer, norm, between, flattened, pooled) or None."""
    norm, between, flattened, pooled = None, [], False, False
    cur = node
    while True:
        if len(cur.users) != 1:
            return None
        nxt = next(iter(cur.users))
        if nxt.op == "call_module":
            m = modules[nxt.target]
            if _removable(m):
                return nxt.target, norm, tuple(between), flattened, pooled
            if isinstance(m, _NORMS) and norm is None:
                norm = nxt.target
            elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                flattened = True
                between.append(nxt.target)
            elif isinstance(m, CHANNELWISE):
                pooled = pooled or isinstance(m, _POOLS)
                between.append(nxt.target)
            else:
                return None
        elif nxt.op == "call_function" and nxt.target in _FUNCTIONS and nxt.args and nxt.args[0] is cur:
            pooled = pooled or nxt.target in _POOL_FUNCTIONS
            between.append(f"<function {getattr(nxt.target, '__name__', nxt.target)}>")
        elif nxt.op == "call_function" and nxt.target is torch.flatten and nxt.args[0] is cur and \
                tuple(nxt.args[1:]) in ((1,), (1, -1)) and not nxt.kwargs:
            flattened = True
            between.append("<function flatten>")
        elif nxt.op == "call_method" and nxt.args and nxt.args[0] is cur and (
                nxt.target in _METHODS or (nxt.target == "flatten" and tuple(nxt.args[1:]) in ((1,), (1, -1)))):
            flattened = flattened or nxt.target == "flatten"
            between.append(f"<method {nxt.target}>")
        else:
            return None
        cur = nxt


def module_calls(graph: torch.fx.Graph) -> dict[str, int]:
    """Module name -> how many times the traced graph calls it (a module called twice shares its weights)."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def find_layer_pairs(model: nn.Module) -> list[LayerPair]:
    """The (producer, consumer) pairs of ``model`` (see the module documentation), in graph order.

    Names are those of ``model.named_modules()`` (a ``DistributedDataParallel`` wrapper is traced through
    its ``module``, and the names keep the ``"module."`` prefix). A module called more than once, a Conv with
    ``groups > 1``, a transposed convolution, or a shape that does not line up leaves the layers unpaired.

    Raises:
        ValueError: the model cannot be traced by ``torch.fx`` (data-dependent control flow); then pass the
            pairs by hand as :class:`LayerPair` objects.
    """
    prefix = ""
    root = model
    if isinstance(model, nn.parallel.DistributedDataParallel):
        root, prefix = model.module, "module."
    try:
        graph = torch.fx.symbolic_trace(root).graph
    except Exception as exc:  # noqa: BLE001 - fx raises many types; all mean "cannot trace"
        raise ValueError(f"cannot trace {type(root).__name__} with torch.fx to find which layer feeds which "
                         f"({type(exc).__name__}: {exc}); list the pairs by hand as "
                         f"sparsedist.sparsity.LayerPair(producer, consumer, norm, between, repeat)") from exc
    modules = dict(root.named_modules())
    calls = module_calls(graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _removable(modules[node.target]):
            continue
        found = _follow(node, modules)
        if found is None:
            continue
        consumer, norm, between, flattened, pooled = found
        used = [node.target, consumer] + ([norm] if norm else [])
        if any(calls[n] != 1 for n in used):
            continue
        prod, cons = modules[node.target], modules[consumer]
        width, need = _width_out(prod), _width_in(cons)
        if isinstance(prod, nn.Linear):  # features on the last dimension: a Linear must read them unchanged
            ok = isinstance(cons, nn.Linear) and need == width and not pooled
        elif isinstance(cons, nn.Linear):  # channels on dimension 1: a Flatten must bring them to the Linear
            ok = flattened and need % width == 0
        else:
            ok = need == width and not flattened
        if not ok:
            continue
        if norm is not None and modules[norm].num_features != width:
            continue
        pairs.append(LayerPair(prefix + node.target, prefix + consumer, prefix + norm if norm else None,
                               tuple(b if b.startswith("<") else prefix + b for b in between), need // width))
    return pairs
