"""``state.stats()`` as flat ``{name: float}`` scalars, the one form every logger takes.

TensorBoard (:mod:`.tensorboard`), Lightning's ``log_dict``, the Hugging Face Trainer's ``log`` and Accelerate's
``accelerator.log`` all want flat names and numbers; :func:`stats_scalars` turns the nested telemetry of
:meth:`sparsedist.SparsifyState.stats` (keys documented in :mod:`sparsedist.stats`) into exactly that. No
optional dependency is needed here.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["stats_scalars"]

_PLAIN = ("steps", "bytes_sent", "bytes_received", "bytes_dense", "compression_ratio", "density", "last_density",
          "residual_norm", "overflow_steps")


def stats_scalars(stats: Mapping[str, Any], prefix: str = "sparsedist/") -> dict[str, float]:
    """Flatten ``stats()`` into ``{prefix + name: float}``; non-finite values (e.g. an infinite ratio) are left out.

    Names (all values are this rank's, cumulative unless said otherwise):

    * ``steps``, ``bytes_sent``, ``bytes_received``, ``bytes_dense`` (bytes), ``bytes_saved`` (``bytes_dense -
      bytes_sent``), ``compression_ratio``, ``density`` (mean over steps), ``last_density``, ``residual_norm``
      (L2, unscaled units), ``overflow_steps``;
    * ``collectives/<path>``: how often each exchange path ran (the chosen collectives), and
      ``collective_share/<path>``: the same as a fraction of all bucket exchanges;
    * ``collective_time/<algorithm>/{calls,measured_s,predicted_s}`` (seconds, summed over calls);
    * ``auto_ratios/<bucket>/<algorithm>``: ``collective="auto"``'s measured/predicted time ratios;
    * ``step_check/sparse`` (1: the whole-step check's verdict is sparse, 0: dense), ``step_check/checks``, and the
      last check's ``step_check/sparse_step_s`` and ``step_check/dense_step_s`` (median seconds per step).

    Args:
        stats: the dict :meth:`sparsedist.SparsifyState.stats` returned.
        prefix: prepended to every name (a TensorBoard tag group).

    Returns:
        A new dict of floats, in a stable order.
    """
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[prefix + name] = float(value)

    for key in _PLAIN:
        put(key, stats.get(key))
    if isinstance(stats.get("bytes_dense"), (int, float)) and isinstance(stats.get("bytes_sent"), (int, float)):
        put("bytes_saved", stats["bytes_dense"] - stats["bytes_sent"])
    counts = dict(stats.get("collectives") or {})
    total = sum(counts.values())
    for path in sorted(counts):
        put(f"collectives/{path}", counts[path])
        if total:
            put(f"collective_share/{path}", counts[path] / total)
    for algorithm, entry in sorted((stats.get("collective_time") or {}).items()):
        for field in ("calls", "measured_s", "predicted_s"):
            put(f"collective_time/{algorithm}/{field}", entry.get(field))
    for bucket, ratios in sorted((stats.get("auto_ratios") or {}).items()):
        for algorithm, ratio in sorted(ratios.items()):
            put(f"auto_ratios/{bucket}/{algorithm}", ratio)
    check = stats.get("step_check")
    if check:
        put("step_check/sparse", 1.0 if check.get("verdict") == "sparse" else 0.0)
        checks = check.get("checks") or []
        put("step_check/checks", len(checks))
        if checks:
            put("step_check/sparse_step_s", checks[-1].get("sparse_step_s"))
            put("step_check/dense_step_s", checks[-1].get("dense_step_s"))
    return out
