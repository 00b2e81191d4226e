"""Which parameter is which: every piece of per-parameter state is keyed by the parameter's *name*.

DDP hands the hook tensors, not names. :class:`ParamIndex` maps a parameter tensor to its name and its position
in ``model.named_parameters()`` (the position seeds shared randomness; the name keys residuals and compressor
state). The map from tensors to names is rebuilt from the model, never pickled: after unpickling a state, attach
it to the (possibly rebuilt) model with :meth:`ParamIndex.attach`, and every residual lands on the parameter of
the same name.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["ParamIndex", "named_parameters_of"]


def named_parameters_of(model) -> tuple[torch.nn.Module | None, list[tuple[str, torch.Tensor]]]:
    """``(module or None, [(name, parameter), ...])`` from a DDP model, a module, or ``named_parameters()``."""
    if isinstance(model, torch.nn.Module):
        module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        return module, list(module.named_parameters())
    named = list(model)
    if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)
               for x in named):
        raise TypeError("model must be an nn.Module or an iterable of (name, parameter) pairs "
                        "(model.named_parameters())")
    return None, named


class ParamIndex:
    """Names and positions of the parameters the hook sees.

    Args:
        named: ``(name, parameter)`` pairs in model order, or None: then parameters are named ``param0``,
            ``param1``, ... in the order the hook first sees them (DDP visits its buckets in the same order on every
            rank, and after unpickling the first step visits them in the same order again).
    """

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]] | None):
        self.first_seen = named is None
        self.names: list[str] = []
        self._by_id: dict[int, tuple[int, str]] = {}
        self.attached = True
        if named is not None:
            self.attach(named, check=False)

    def attach(self, named: Iterable[tuple[str, torch.Tensor]], check: bool = True) -> None:
        """Map the parameters of ``named`` (``model.named_parameters()``) to their names and positions.

        ``check``: the names must be the ones this index was built with (a rebuilt model of the same
        architecture); a state unpickled into a different model raises ``ValueError`` naming the difference.
        """
        pairs = list(named)
        for name, param in pairs:
            if param.requires_grad and (param.dtype.is_complex or not param.dtype.is_floating_point):
                raise TypeError(f"parameter {name!r} has dtype {param.dtype}; sparsedist exchanges real "
                                f"floating-point gradients only (float32, float16, bfloat16, float64)")
        names = [n for n, _ in pairs]
        if check and self.names and names != self.names:
            missing, extra = sorted(set(self.names) - set(names)), sorted(set(names) - set(self.names))
            raise ValueError(f"this state was built for parameters named differently (missing {missing[:5]}, "
                             f"unknown {extra[:5]}); attach it to the model it was saved from")
        self.names = names
        self.first_seen = False
        self._by_id = {id(p): (i, n) for i, (n, p) in enumerate(pairs)}
        self.attached = True

    def of(self, param: torch.Tensor) -> tuple[int, str]:
        """``(position, name)`` of ``param``."""
        entry = self._by_id.get(id(param))
        if entry is not None:
            return entry
        if not self.attached:
            raise RuntimeError("this SparsifyState was unpickled without its model, so it cannot tell which "
                               "parameter is which: call state.attach(ddp_model) (or sparsedist.register(ddp_model, "
                               "state)) before the first step")
        if not self.first_seen:
            raise RuntimeError(f"a parameter of shape {tuple(param.shape)} is not in the model this state was "
                               f"built with; build the state (sparsedist.register) with the model DDP wraps")
        entry = (len(self._by_id), f"param{len(self._by_id)}")
        self._by_id[id(param)] = entry
        self.names.append(entry[1])
        return entry

    def name_of(self, param: torch.Tensor) -> str:
        entry = self._by_id.get(id(param))
        return entry[1] if entry else "<unknown>"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_by_id"] = {}  # tensor identities mean nothing in another process (or after a rebuild)
        if self.first_seen:
            state["names"] = []  # first-seen names are assigned again, in the same order
        else:
            state["attached"] = False
        return state
