"""``python -m sparsedist estimate``: the alpha-beta prediction per step, the verdict, the command line, and the
predictions against exchanges measured on the emulated cluster (network namespaces, tc tbf links; root only).

The emulated-cluster check runs ``--probe --measure`` and checks every collective's measured/predicted ratio
against gross-error bounds (:data:`BOUNDS`), for rows that move more than four times the links' token-bucket
burst. The 25 % agreement is a measurement on a shared machine, not an assertion: docs/estimate.md
reports it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from sparsedist.__main__ import main
from sparsedist.collectives import CostModel, ring_allreduce_bytes
from sparsedist.estimate import (INDEXED, PACKED, SHARED, Row, buckets, estimate, format_curves, link_model,
                                 parse_count, parse_rate, parse_seconds, verdict)

ROOT = Path(__file__).resolve().parents[1]


def test_parsers_accept_the_usual_spellings_and_name_bad_input():
    assert parse_count("124M") == 124_000_000 and parse_count("1.5B") == 1_500_000_000
    assert parse_count("350k") == 350_000 and parse_count(17) == 17
    assert parse_rate("25gbit") == 25e9 and parse_rate("100Mbit/s") == 1e8 and parse_rate("1gbps") == 1e9
    assert parse_seconds("20us") == pytest.approx(2e-5) and parse_seconds("0.5ms") == pytest.approx(5e-4)
    assert parse_seconds("2e-5") == pytest.approx(2e-5)
    for fn, bad in ((parse_count, "12 apples"), (parse_count, "0"), (parse_rate, "25 GB"), (parse_rate, "0gbit"),
                    (parse_seconds, "fast")):
        with pytest.raises(ValueError, match="looks like|must be"):
            fn(bad)


def test_rows_follow_the_wire_formats_and_ddp_buckets():
    n, P = 15_000_000, 8
    model = link_model(10e9, latency_s=20e-6, efficiency=1.0)
    rows = estimate(n, P, model, densities=[0.01], bucket_mb=25)
    parts = buckets(n, 4, 25)
    assert parts == [6_553_600, 6_553_600, 1_892_800]  # 60 MB of fp32 gradients in buckets of 25 MiB
    dense, fp16 = rows[0], rows[1]
    assert dense.bytes == sum(ring_allreduce_bytes(b, 4, P) for b in parts)
    assert fp16.bytes == pytest.approx(dense.bytes / 2)
    # bandwidth term 8 bits per byte at 10 Gbit/s, plus 2(P-1) latencies per bucket
    assert dense.predicted_s == pytest.approx(dense.bytes * 8e-10 + len(parts) * 2 * (P - 1) * 20e-6)
    by = {(r.exchange, r.collective): r for r in rows[2:]}
    packed, shared = by[PACKED, "allgather"], by[SHARED, "values allreduce"]
    k = [max(1, -(-b // 100)) for b in parts]
    assert shared.bytes == sum(ring_allreduce_bytes(kb, 4, P) for kb in k)  # k values, no indices
    assert packed.bytes == pytest.approx(sum((P - 1) * 16 + (P - 1) * 4 * kb for kb in k))  # 4-byte words
    indexed = [r for r in rows[2:] if r.collective == "allgather" and r.exchange not in (PACKED,)][0]
    assert indexed.bytes == pytest.approx(sum((P - 1) * 16 + (P - 1) * 8 * kb for kb in k))
    assert {r.collective for r in rows[2:]} >= {"allgather", "ssar_recursive_double", "ssar_split_allgather",
                                                 "dsar_split_allgather", "gtopk", "values allreduce"}


def test_overlap_flags_and_the_shared_rows_local_work():
    """Fixed counts overlap the backward pass (top-k/DGC through the allgather, rand-k's values allreduce); the
    rand-k row pays the scatter of its k values into the zeroed bucket, at the model's local-work rates."""
    n, P = 15_000_000, 4
    rows = estimate(n, P, link_model(1e9), densities=[0.01])
    overlapped = {(r.exchange, r.collective) for r in rows if r.overlap}
    assert overlapped == {(INDEXED, "allgather"), (SHARED, "values allreduce")}
    gamma, gamma_dense = 3e-8, 2e-10
    worked = estimate(n, P, CostModel(alpha=2e-5, beta=8e-9, gamma=gamma, gamma_dense=gamma_dense),
                      densities=[0.01])
    bare = estimate(n, P, CostModel(alpha=2e-5, beta=8e-9), densities=[0.01])
    parts = buckets(n, 4, 25)
    shared = [r for r in worked if r.exchange == SHARED][0]
    shared_bare = [r for r in bare if r.exchange == SHARED][0]
    k = [max(1, -(-b // 100)) for b in parts]
    extra = sum(gamma * kb + gamma_dense * b for kb, b in zip(k, parts)) + sum(gamma_dense * 2 * kb for kb in k)
    assert shared.predicted_s == pytest.approx(shared_bare.predicted_s + extra)
    assert shared.bytes == shared_bare.bytes


def _rows(dense_s: float, sparse_s: float, select_s: float, overlap: bool) -> list[Row]:
    return [Row("dense allreduce (DDP)", 1.0, "ring allreduce", 1e9, dense_s),
            Row("fp16 allreduce", 1.0, "ring allreduce", 5e8, dense_s),
            Row(INDEXED, 0.01, "allgather" if overlap else "ssar_recursive_double", 1e7, sparse_s,
                select_s=select_s, overlap=overlap)]


def test_verdict_per_step_accounts_for_which_exchanges_overlap():
    # compute 1.0 s, dense 0.8 s: dense DDP takes 1.0-1.8 s per step
    overlapped = verdict(_rows(0.8, 0.3, 0.05, True), compute_s=1.0)
    # selection joins the computation: the step is max(1.05, 0.3) s with overlap, 1.35 s without
    assert "by allgather 1,050 ms to 1,350 ms (with/without overlap)" in overlapped
    assert "Compression may pay" in overlapped
    assert "hides behind the backward pass" in overlapped
    # the same exchange run synchronously: 1.35 s, still under 0.9 * 1.8 s
    synchronous = verdict(_rows(0.8, 0.3, 0.05, False), compute_s=1.0)
    assert "at least 1,350 ms (synchronous in the hook)" in synchronous
    assert "Compression may pay" in synchronous and "collective='auto'" in synchronous
    # an exchange longer than the computation: overlapped it can still pay off against a worse dense step ...
    long = verdict(_rows(3.0, 2.0, 0.1, True), compute_s=1.0)  # dense 3-4 s, sparse 2.0-3.1 s
    assert "Compression may pay" in long
    # ... and when even its worst case beats dense at its best, it pays
    assert "Compression pays" in verdict(_rows(3.0, 0.5, 0.1, True), compute_s=1.0)
    assert "will not help" in verdict(_rows(0.8, 0.9, 0.1, True), compute_s=10.0)


def test_verdict_says_plainly_when_compression_will_not_help():
    slow = estimate(124_000_000, 16, link_model(1e9), densities=[0.01])
    assert verdict(slow).startswith("Compression can pay")
    fast = estimate(1_000_000, 2, link_model(400e9, latency_s=50e-6), densities=[0.001, 0.01])
    assert verdict(fast).startswith("Compression will not help")
    bound = verdict(slow, compute_s=100.0)  # 100 s of computation per step: the exchange does not matter
    assert "Compression will not help" in bound and "bound by computation" in bound
    assert "Compression pays" in verdict(slow, compute_s=0.01)


def test_the_probed_curves_are_printed_as_they_price_the_calls():
    assert format_curves(link_model(1e9)) == ""  # a configured model has none
    pts = ((8.0, 2e-4), (32768.0, 5e-4), (8e6, 0.0654))
    model = CostModel(world_size=2, call_curve={kind: pts for kind in ("allreduce", "allgather", "sendrecv",
                                                                       "alltoall")})
    lines = format_curves(model).splitlines()
    assert lines[0].startswith("ms per call at 2 ranks") and len(lines) == 5
    assert lines[1].split() == ["allreduce", "8", "B", "0.2", "32.8", "kB", "0.5", "8", "MB", "65.4"]


def test_command_line_prints_the_table_and_verdict(capsys, tmp_path):
    assert main(["estimate", "--params", "124M", "--ranks", "16", "--link", "25gbit", "--densities", "0.001,0.01",
                 "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "dense allreduce (DDP)" in out and "fp16 allreduce" in out and "ssar_recursive_double" in out
    assert "Compression can pay" in out
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["ranks"] == 16 and len(saved["rows"]) == 2 + 2 * 7
    with pytest.raises(SystemExit) as exc:
        main(["estimate", "--params", "124M", "--ranks", "16"])  # no link and no probe
    assert exc.value.code == 2
    assert "--link" in capsys.readouterr().err


_spec = importlib.util.spec_from_file_location("sparsedist_emulate_cluster_estimate",
                                               ROOT / "launch" / "emulate_cluster.py")
emu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = emu
_spec.loader.exec_module(emu)


#: Bounds of measured/predicted with --probe, asserted per collective, for rows above four token-bucket bursts. The
#: 25 % agreement itself is a measurement (timings on a shared machine vary): docs/estimate.md reports it, with
#: medians and spread of repeated runs and the command that produced them (every 10 % row at 100 Mbit/s within
#: 0.76-1.19 there). These bounds only catch a model that is wrong by a factor (a unit, a missing message, a wrong
#: curve); they are kept wide so that a loaded host does not fail the suite. Smaller rows are printed, not asserted.
BOUNDS = {
    "100mbit": {"ring allreduce": (0.67, 1.5), "values allreduce": (0.5, 2.0), "allgather": (0.5, 2.0),
                "ssar_recursive_double": (0.5, 2.0), "ssar_split_allgather": (0.5, 2.0),
                "dsar_split_allgather": (0.5, 2.0)},
    "1gbit": {"ring allreduce": (0.67, 1.5), "allgather": (0.4, 2.0), "ssar_split_allgather": (0.4, 2.0),
              "dsar_split_allgather": (0.4, 2.5), "ssar_recursive_double": (0.4, 3.0)},
}


@pytest.mark.system
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("ip", "tc", "bridge")),
                    reason="iproute2 not installed: run scripts/install_system.sh")
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.parametrize("rate, params", [("100mbit", "4M"), ("1gbit", "8M")])
def test_probed_predictions_against_the_emulated_cluster(tmp_path, rate, params):
    out = tmp_path / "estimate.json"
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
           "OMP_NUM_THREADS": "1"}
    emu.emulate_cluster([sys.executable, "-m", "sparsedist", "estimate", "--params", params, "--probe",
                         "--densities", "0.1", "--measure", "--repeats", "3", "--json", str(out)],
                        2, rate, env=env, cwd=str(ROOT), timeout=300)
    saved = json.loads(out.read_text())
    model, rows = saved["model"], saved["rows"]
    assert model["world_size"] == 2 and set(model["call_beta"]) == {"allreduce", "allgather", "sendrecv",
                                                                     "alltoall"}
    # the per-call curves: a tiny call, then 2**14 .. 2**22 elements (capped at the largest bucket)
    assert set(model["call_curve"]) == set(model["call_beta"]) and model["gamma_sort"] > 0
    for kind, pts in model["call_curve"].items():
        assert len(pts) == 6 and all(t1 >= t0 > 0 for (_, t0), (_, t1) in zip(pts, pts[1:])), (kind, pts)
    # the local-work curves that price every local operation: 16 entries up to 10 % of the bucket (dense: up to
    # it), and the size of every operation the rows price
    assert set(model["work_curve"]) == {"sparse", "packed", "sort", "dense"}
    for kind, pts in model["work_curve"].items():
        assert pts[0][0] == 16 and all(t > 0 for _, t in pts), (kind, pts)
    planned = {(kind, round(m)) for r in rows for kind, _, m in r["work"]}  # every operation priced was timed
    assert planned <= {(kind, round(m)) for kind, pts in model["work_curve"].items() for m, _ in pts}
    burst = max(32 * 1024, parse_rate(rate) / 8 / 100)  # emulate_cluster's tbf bucket: 10 ms at line rate
    report, checked = [], set()
    for r in rows:
        if r["measured_s"] is None:
            continue
        ratio = r["measured_s"] / r["predicted_s"]
        report.append(f"{r['exchange']} {r['density']} {r['collective']}: {ratio:.2f}")
        bounds = BOUNDS[rate].get(r["collective"])
        if bounds is not None and r["bytes"] > 4 * burst:
            checked.add(r["collective"])
            assert bounds[0] <= ratio <= bounds[1], (r, report)
    print("\n".join(report))
    assert checked == set(BOUNDS[rate]), (checked, report)
    # the configured model (--link) against the same measurements: the ring allreduces of dense and fp16
    configured = estimate(parse_count(params), 2, link_model(parse_rate(rate)), densities=[0.1])
    for conf, r in zip(configured[:2], rows[:2]):
        assert conf.exchange == r["exchange"] and 0.67 <= r["measured_s"] / conf.predicted_s <= 1.5, (conf, r)
