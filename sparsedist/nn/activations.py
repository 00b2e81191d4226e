"""Sparse activations as modules, a helper that swaps a model's activations, and a sparsity meter.

* :class:`TopKActivation` — k-winners-take-all along the feature (last) dimension.
* :class:`ThresholdActivation` — FATReLU, ``x if x > threshold else 0``.
* :func:`sparsify_activations` — replace a model's activation modules (``nn.ReLU``, ``nn.GELU``, ...) in place.
* :class:`ActivationSparsityMeter` — measured fraction of exact zeros in the outputs of chosen layers.

The modules are stateless: their ``state_dict()`` is empty, so swapping activations never changes a
checkpoint's keys. The math lives in :mod:`sparsedist.nn.functional`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from . import functional as SF

__all__ = [
    "TopKActivation",
    "ThresholdActivation",
    "sparsify_activations",
    "ActivationSparsityMeter",
    "DEFAULT_ACTIVATION_TYPES",
]

#: Module types that :func:`sparsify_activations` replaces and :class:`ActivationSparsityMeter` watches by default.
DEFAULT_ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.GELU)


class TopKActivation(nn.Module):
    """k-winners-take-all: keep the ``k`` largest values of each row of the last dimension, zero the rest.

    Input ``(..., F)`` — ``(B, F)`` per example, ``(B, T, F)`` per token — output of the same shape and
    dtype with exactly ``k`` winners per row (ties: lowest index first). Gradients flow to the winners
    only. Used in place of ReLU/GELU, winners keep their raw value (Makhzani & Frey 2014; Ahmad &
    Scheinkman 2019); to select among the outputs of another activation use ``compose=True`` in
    :func:`sparsify_activations`.

    Args:
        k: int ``>= 1`` (number of winners per row; must be ``<= F``, checked at the first forward), or
            float in ``(0, 1]`` (fraction of ``F``; the count is ``ceil(k * F)``). The activation's output
            density is ``k / F``.
    """

    def __init__(self, k) -> None:
        super().__init__()
        SF._check_k_spec(k, "k")
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return SF.kwinners(x, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class ThresholdActivation(nn.Module):
    """FATReLU (Kurtz et al. 2020): ``x if x > threshold else 0``, element-wise.

    Any shape and float dtype. ``threshold=0`` is ReLU. The gradient passes where the input was kept.
    The output density depends on the data: measure it with :class:`ActivationSparsityMeter`.

    Args:
        threshold: finite real number ``>= 0``.
    """

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = SF._check_threshold(threshold)

    def forward(self, x: Tensor) -> Tensor:
        return SF.threshold_activation(x, self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparsify_activations(
    model: nn.Module,
    *,
    k=None,
    threshold: float | None = None,
    types: Iterable[type[nn.Module]] = DEFAULT_ACTIVATION_TYPES,
    compose: bool = False,
    filter: Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Replace a model's activation modules, in place, by sparse ones.

    Exactly one of ``k`` (:class:`TopKActivation`) or ``threshold`` (:class:`ThresholdActivation`) must be
    given. Only activations that are *modules* are found; ``F.gelu(x)`` called inside a ``forward`` cannot
    be swapped (write the model with ``nn.GELU()`` modules).

    Args:
        model: the model to modify (not itself an activation module).
        k: int or fraction for :class:`TopKActivation`.
        threshold: threshold for :class:`ThresholdActivation`.
        types: module classes to replace (exact class match, subclasses are left alone);
            default ``(nn.ReLU, nn.GELU)``.
        compose: if ``False`` (default) the activation is replaced (``TopKActivation`` instead of ``GELU``:
            k-WTA on the pre-activation). If ``True`` it is kept and followed by the sparse op
            (``nn.Sequential(GELU(), TopKActivation(k))``: the k largest GELU outputs survive).
        filter: optional ``filter(qualified_name, module) -> bool``; only modules for which it returns
            ``True`` are replaced.

    Returns:
        The qualified names of the replaced modules, in ``named_modules()`` order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if (k is None) == (threshold is None):
        raise ValueError("give exactly one of k= (top-k activation) or threshold= (threshold activation)")
    if k is not None:
        SF._check_k_spec(k, "k")
        make = lambda: TopKActivation(k)  # noqa: E731
    else:
        t = SF._check_threshold(threshold)
        make = lambda: ThresholdActivation(t)  # noqa: E731
    types = tuple(types)
    if not types or not all(isinstance(t_, type) and issubclass(t_, nn.Module) for t_ in types):
        raise TypeError("types must be a non-empty iterable of nn.Module subclasses")
    if type(model) in types:
        raise ValueError("model is itself an activation module and cannot be replaced in place; wrap it in a container")
    names = [
        name
        for name, m in model.named_modules()
        if name and type(m) in types and (filter is None or filter(name, m))
    ]
    for name in names:
        old = model.get_submodule(name)
        new = nn.Sequential(old, make()) if compose else make()
        new.train(old.training)
        _replace(model, name, new)
    return names


class ActivationSparsityMeter:
    """Measured activation sparsity: fraction of exact zeros in the outputs of chosen layers.

    Registers forward hooks that count ``(output == 0)`` per layer on the output's device (no host sync
    per step); read the figures with :meth:`sparsity`. Use as a context manager (hooks are removed on
    exit) or call :meth:`remove` yourself::

        with ActivationSparsityMeter(model) as meter:
            model(x)
        meter.sparsity()   # {"blocks.0.mlp.act": 0.75, ...}, fraction of zeros in [0, 1]

    Args:
        model: the model to watch.
        types: module classes whose outputs are measured (exact class match). Default: the sparse
            activations of this package and ``nn.ReLU``/``nn.GELU`` (so dense baselines can be measured too).
        filter: optional ``filter(qualified_name, module) -> bool`` to narrow the layers.
    """

    def __init__(
        self,
        model: nn.Module,
        types: Iterable[type[nn.Module]] | None = None,
        filter: Callable[[str, nn.Module], bool] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        types = tuple(types) if types is not None else (TopKActivation, ThresholdActivation) + DEFAULT_ACTIVATION_TYPES
        self._zeros: dict[str, Tensor] = {}
        self._numel: dict[str, int] = {}
        self._handles = []
        for name, m in model.named_modules():
            if type(m) in types and (filter is None or filter(name, m)):
                self._numel[name] = 0
                self._handles.append(m.register_forward_hook(self._make_hook(name)))
        if not self._handles:
            raise ValueError(
                f"no module of types {[t.__name__ for t in types]} found in the model; pass types= to choose layers"
            )

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not isinstance(output, Tensor):
                return
            with torch.no_grad():
                z = (output == 0).sum()
            prev = self._zeros.get(name)
            self._zeros[name] = z if prev is None else prev + z
            self._numel[name] += output.numel()

        return hook

    @property
    def layers(self) -> list[str]:
        """Qualified names of the watched layers."""
        return list(self._numel)

    def sparsity(self) -> dict[str, float]:
        """Fraction of zeros per watched layer since creation or the last :meth:`reset`.

        Returns ``{qualified_name: fraction in [0, 1]}``; layers that have not run yet are omitted.
        """
        return {n: float(self._zeros[n].item()) / self._numel[n] for n in self._numel if self._numel[n] > 0}

    def overall(self) -> float:
        """Fraction of zeros over all watched outputs together (element-weighted); NaN if nothing ran."""
        total = sum(self._numel.values())
        if total == 0:
            return float("nan")
        return float(sum(float(z.item()) for z in self._zeros.values())) / total

    def reset(self) -> None:
        """Forget the counts (keep the hooks)."""
        self._zeros.clear()
        for n in self._numel:
            self._numel[n] = 0

    def remove(self) -> None:
        """Remove the hooks; the counts stay readable."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ActivationSparsityMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
