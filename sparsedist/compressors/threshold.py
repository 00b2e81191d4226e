"""Threshold quantisation (Strom 2015, "Scalable distributed DNN training using commodity GPU cloud computing").

Each element whose accumulated value exceeds the fixed threshold tau in magnitude is sent as ``+tau`` or
``-tau``; the residual keeps ``acc - (+/-tau)`` there and the whole accumulator elsewhere. Because every value
is +/-tau, the wire format packs a 31-bit index and the sign into one 32-bit word
(:func:`sparsedist.collectives.wire.encode`), 4 bytes per sent element. The count varies per rank and step,
zero included.

With ``quantize=False`` the selected entries are sent with their exact values instead (plain "threshold
sparsification"); the residual then keeps zero there.
"""

from __future__ import annotations

from typing import Any

import torch

from ..payload import SparseGrad
from .base import Compressor, SelectContext, Workspace, check_nonnegative, entries_at_least

__all__ = ["ThresholdCompressor"]


class ThresholdCompressor(Compressor):
    """Send the entries with ``|acc| > threshold`` (as ``+/-threshold`` when ``quantize``, Strom's rule).

    Args:
        threshold: tau, a finite number > 0, in gradient units.
        quantize: send ``sign(acc) * tau`` (Strom 2015) instead of the exact values.
    """

    name = "threshold"

    def __init__(self, threshold: float = 1e-3, quantize: bool = True):
        tau = check_nonnegative(threshold, "threshold")
        if tau == 0:
            raise ValueError("threshold must be > 0 (tau = 0 would send every non-zero entry); e.g. threshold=1e-3")
        self.threshold = tau
        self.quantize = bool(quantize)
        self._workspace = Workspace()  # |acc| and the mask, reused between calls (no page faults per call)

    def compress(self, acc: torch.Tensor, ctx: SelectContext) -> SparseGrad:
        idx = entries_at_least(self._workspace.abs(acc), self.threshold, self._workspace, strict=True)[0]
        if not self.quantize:
            return SparseGrad(idx, acc[idx], acc.numel())
        values = torch.where(acc[idx] >= 0, self.threshold, -self.threshold).to(acc.dtype)
        return SparseGrad(idx, values, acc.numel(), constant=self.threshold)

    def options(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "quantize": self.quantize}
