"""Tables of docs/estimate.md from the runs in docs/estimate_emulated.json (or a directory of run JSONs).

    python benchmarks/estimate_tables.py docs/estimate_emulated.json

Per configuration (rate, parameters) and row: the median over runs of the predicted and the measured time, and
the median and range of the runs' ratios measured/predicted, for the model before (``before_*`` runs: the earlier
code, named in the JSON's note) and after (``after_*``); the configured model (``--link RATE``) against the after
runs' measurements. **Bold**: every run's ratio within 25 %.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

from sparsedist.estimate import estimate, link_model, parse_rate


def load(path: Path) -> dict:
    if path.is_dir():
        return {p.stem: json.loads(p.read_text()) for p in sorted(path.glob("*.json"))}
    return json.loads(path.read_text())["runs"]


def config_of(name: str) -> str:
    """``after_1gbit8M_2`` -> ``1gbit8M``."""
    return name.split("_", 1)[1].rsplit("_", 1)[0]


def cell(ratios: list[float]) -> str:
    text = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    return f"**{text}**" if all(0.75 <= r <= 1.25 for r in ratios) else text


def table(runs: dict, config: str) -> str:
    before = [r for name, r in runs.items() if name.startswith("before_") and config_of(name) == config]
    after = [r for name, r in runs.items() if name.startswith("after_") and config_of(name) == config]
    rate = re.match(r"\d+[kmgt]?bit", config).group(0)
    first = after[0]
    conf = estimate(first["params"], first["ranks"], link_model(parse_rate(rate)),
                    sorted({r["density"] for r in first["rows"][2:]}))
    conf = {(r.exchange, r.density, r.collective): r.predicted_s for r in conf}
    lines = ["| exchange | density | collective | MB/rank | configured: ratio | before: predicted ms | ratio | "
             "after: predicted ms | measured ms | ratio |", "|---" * 10 + "|"]
    for i, row in enumerate(first["rows"]):
        if row["measured_s"] is None:
            continue
        key = (row["exchange"], row["density"], row["collective"])
        b = [r["rows"][i] for r in before]
        a = [r["rows"][i] for r in after]
        med = statistics.median
        lines.append(
            f"| {row['exchange']} | {row['density']:g} | {row['collective']} | {row['bytes'] / 1e6:.3f} | "
            f"{cell([x['measured_s'] / conf[key] for x in a])} | "
            + (f"{med(x['predicted_s'] for x in b) * 1e3:.1f} | "
               f"{cell([x['measured_s'] / x['predicted_s'] for x in b])} | " if b else "- | - | ")
            + f"{med(x['predicted_s'] for x in a) * 1e3:.1f} | {med(x['measured_s'] for x in a) * 1e3:.1f} | "
              f"{cell([x['measured_s'] / x['predicted_s'] for x in a])} |")
    return "\n".join(lines)


def curves(runs: dict, config: str) -> str:
    """What the after runs' probes measured: per primitive, the payload rate (Mbit/s of modelled bytes, latency
    included) of one call at each size, median over runs; then the local-work terms (range over runs) and, where
    probed, the local-work curves (median over runs)."""
    models = [r["model"] for name, r in runs.items() if name.startswith("after_") and config_of(name) == config]
    sizes = [b for b, _ in models[0]["call_curve"]["allgather"]][1:]
    lines = ["| primitive | " + " | ".join(f"{b / 1e3:.0f} kB" for b in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for kind in models[0]["call_curve"]:
        rates = [statistics.median(8 * m["call_curve"][kind][j + 1][0] / m["call_curve"][kind][j + 1][1] / 1e6
                                   for m in models) for j in range(len(sizes))]
        lines.append(f"| {kind} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")
    terms = {t: [m[t] * 1e9 for m in models] for t in ("gamma", "gamma_sort", "gamma_dense")}
    lines.append("\nLocal work (ns per entry, per entry sorted, per element and pass): " + ", ".join(
        f"{t} {min(v):.3g}-{max(v):.3g}" for t, v in terms.items()))
    work = [m["work_curve"] for m in models if m.get("work_curve")]
    if work:  # microseconds per operation at each measured count, median over runs
        lines.append("\nLocal work per operation (us, median over runs; count: entries, dense: elements per pass):\n")
        for kind in work[0]:
            pts = work[0][kind]
            med = [statistics.median(w[kind][j][1] for w in work) * 1e6 for j in range(len(pts))]
            lines.append(f"* {kind}: " + ", ".join(f"{m:.0f}: {t:.3g}" for (m, _), t in zip(pts, med)))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    runs = load(Path(argv[0]))
    configs = sorted({config_of(name) for name in runs if name.startswith("after_")})
    for config in configs:
        print(f"#### {config}\n\n{table(runs, config)}\n\nProbed curves:\n\n{curves(runs, config)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
