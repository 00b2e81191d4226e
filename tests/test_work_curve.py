"""Local work priced per operation, at its own size: ``CostSheet.local``, ``work_curve`` and the probe that measures it.

A curve of seconds against entries keeps what a kernel costs however few its entries (its launches, its Python):
a per-entry rate timed on hundreds of thousands of entries prices a sort of a few thousand at a tenth of what it
takes. A straight curve through the origin must price exactly like the gammas it replaces.
"""

from __future__ import annotations

import pytest
import torch

from sparsedist.collectives import probe
from sparsedist.collectives.backend import TorchBackend
from sparsedist.collectives.base import WORK_KINDS, CostSheet, work_seconds
from sparsedist.collectives.choose import ALGORITHMS, CostModel, predict
from sparsedist.collectives.measure import WORK_DENSITY, _work_curves
from sparsedist.estimate import SHARED, buckets, estimate, format_curves
from sparsedist.testing import run_distributed

RATES = {"sparse": 1e-8, "packed": 3e-8, "sort": 5e-8, "dense": 1e-10}


def _straight(fixed: float = 0.0) -> dict:
    return {kind: ((1.0, fixed + rate), (1e7, fixed + 1e7 * rate)) for kind, rate in RATES.items()}


def test_a_straight_curve_through_the_origin_prices_like_the_gammas():
    """Each formula's local operations add up to the totals the gammas price (packed words priced as sparse
    entries when both rates are equal), at 2, 3 and 6 ranks, sparse and past SparCML's dense switch."""
    same = dict(RATES, packed=RATES["sparse"])
    curve = {kind: ((1.0, rate), (1e7, 1e7 * rate)) for kind, rate in same.items()}
    kw = dict(alpha=1e-5, beta=1e-9)
    for P in (2, 3, 6):
        for k in (200, 20_000, 900_000):
            gam = predict(2_000_000, k, P, **kw, gamma=same["sparse"], gamma_dense=same["dense"],
                          gamma_sort=same["sort"])
            cur = predict(2_000_000, k, P, **kw, work_curve=curve)
            for a in ALGORITHMS:
                assert cur[a].time == pytest.approx(gam[a].time, rel=1e-9), (P, k, a)
                assert (cur[a].sparse_work, cur[a].dense_work, cur[a].sort_work) == \
                    (gam[a].sparse_work, gam[a].dense_work, gam[a].sort_work)
            packed = predict(2_000_000, k, P, **kw, index_bytes=0, work_curve=curve, algorithms=("allgather",))
            assert packed["allgather"].time == pytest.approx(predict(
                2_000_000, k, P, **kw, index_bytes=0, gamma=same["sparse"], gamma_dense=same["dense"],
                algorithms=("allgather",))["allgather"].time, rel=1e-9)


def test_every_operation_pays_its_fixed_cost():
    """A fixed cost per operation is charged once per operation the formula counts: recursive doubling at 2
    ranks sorts its input, merges once, zeroes the result and writes the sum (4 operations); the allgather decodes
    one payload per rank (P) and zeroes the result (1)."""
    fixed = 1e-4
    base, fixed_curve = _straight(), _straight(fixed)
    n, k = 4_000_000, 4_000
    for a, ops in (("ssar_recursive_double", 4), ("allgather", 2 + 1), ("dense", 2)):
        plain = predict(n, k, 2, alpha=0, beta=0, work_curve=base, algorithms=(a,))[a].time
        more = predict(n, k, 2, alpha=0, beta=0, work_curve=fixed_curve, algorithms=(a,))[a].time
        assert more - plain == pytest.approx(ops * fixed, rel=1e-6), a
    sheet = CostSheet()
    sheet.local("sort", 0)  # nothing to do costs nothing and is not an operation
    sheet.local("sparse", 10, ops=0)
    assert sheet.work == [] and work_seconds(fixed_curve, "sort", 0) == 0.0
    with pytest.raises(ValueError, match="unknown kind of local work 'scatter'"):
        sheet.local("scatter", 10)


def test_packed_words_have_their_own_curve_and_fall_back_to_the_sparse_one():
    n, k, P = 4_000_000, 40_000, 2
    curve = _straight()
    packed = predict(n, k, P, alpha=0, beta=0, index_bytes=0, work_curve=curve, algorithms=("allgather",))
    indexed = predict(n, k, P, alpha=0, beta=0, work_curve=curve, algorithms=("allgather",))
    zero_fill = RATES["dense"] * n
    assert packed["allgather"].time == pytest.approx(P * k * RATES["packed"] + zero_fill, rel=1e-9)
    assert indexed["allgather"].time == pytest.approx(P * k * RATES["sparse"] + zero_fill, rel=1e-9)
    assert work_seconds({kind: pts for kind, pts in curve.items() if kind != "packed"}, "packed", k) == \
        pytest.approx(k * RATES["sparse"])


def test_the_model_validates_saves_and_loads_its_work_curve():
    curve = _straight(2e-6)
    m = CostModel(alpha=1e-5, beta=1e-9, gamma=1.0, work_curve=curve)  # the curve, not gamma, prices
    assert m.predict(10**6, 10**4, 4) == predict(10**6, 10**4, 4, alpha=1e-5, beta=1e-9, work_curve=curve)
    assert m.work_seconds("sort", 1000) == pytest.approx(2e-6 + 1000 * RATES["sort"])
    assert CostModel(gamma=1e-8, gamma_sort=2e-8).work_seconds("sort", 1000) == pytest.approx(2e-5)
    assert CostModel(gamma=1e-8).work_seconds("packed", 1000) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="unknown kind of local work"):
        m.work_seconds("merge", 10)
    loaded = CostModel()
    loaded.load_state_dict(m.state_dict())
    assert loaded.work_curve == curve and loaded.predict(10**6, 10**4, 3) == m.predict(10**6, 10**4, 3)
    old = m.state_dict()
    del old["work_curve"]  # a state saved before work curves existed
    loaded.load_state_dict(old)
    assert loaded.work_curve is None
    bad = ({**curve, "sort": curve["sort"][:1]}, {k: v for k, v in curve.items() if k != "dense"},
           {**curve, "dense": ((10.0, 1e-3), (5.0, 2e-3))})
    for c in bad:
        with pytest.raises(ValueError, match=r"work_curve\['\w+'\] must be at least two \(count, seconds\)"):
            CostModel(work_curve=c)
        with pytest.raises(ValueError, match=r"work_curve\['\w+'\] must be at least two"):
            predict(1000, 10, 2, alpha=0, beta=0, work_curve=c)


def test_estimate_prices_rand_k_scatter_and_prints_the_curves():
    n, P = 15_000_000, 4
    curve = _straight(3e-6)
    with_curve = estimate(n, P, CostModel(alpha=2e-5, beta=8e-9, work_curve=curve), densities=[0.01])
    bare = estimate(n, P, CostModel(alpha=2e-5, beta=8e-9), densities=[0.01])
    shared = [r for r in with_curve if r.exchange == SHARED][0]
    shared_bare = [r for r in bare if r.exchange == SHARED][0]
    extra = 0.0
    for b in buckets(n, 4, 25):
        kb = max(1, -(-b // 100))
        # the scatter of k values, the zeroed bucket, and the dense formula's own two passes over the k values
        extra += work_seconds(curve, "sparse", kb) + work_seconds(curve, "dense", b) + \
            2 * work_seconds(curve, "dense", kb)
    assert shared.predicted_s == pytest.approx(shared_bare.predicted_s + extra)
    lines = format_curves(CostModel(work_curve=curve)).splitlines()
    assert lines[0].startswith("ms per local operation") and len(lines) == 1 + len(WORK_KINDS)
    assert lines[1].split()[:3] == ["sparse", "1", "0.00301"]


def _probe_worker(rank, ws):
    be = TorchBackend(timeout=60)
    plain = probe(be, sizes=(1, 2**12))
    n = 2**17
    model = probe(be, sizes=(1, 2**12), call_latency=False, work_numel=n,
                  work_counts={"sort": [5000.4, 300_000], "dense": [777]})
    return {"plain": plain.work_curve, "curve": model.work_curve}


@pytest.mark.parametrize("ws", [2, 3])
def test_the_probe_measures_every_kind_from_a_few_entries_to_the_bucket(ws):
    res = run_distributed(_probe_worker, ws, timeout=180)
    assert res[0]["plain"] is None, "the default probe (collective='auto') measures no work curve"
    curve = res[0]["curve"]
    assert all(r["curve"] == curve for r in res), "every rank must get the same model"
    assert set(curve) == set(WORK_KINDS)
    top = int(WORK_DENSITY * 2**17)
    for kind, pts in curve.items():
        counts = [m for m, _ in pts]
        assert counts == sorted(set(counts)) and len(counts) >= 3, (kind, pts)
        if kind == "dense":  # the bucket, then down by factors of 4 while at least 4096 elements, 16, and 777 asked
            assert counts == [16, 777, 2**13, 2**15, 2**17]
        elif kind == "sort":  # the grid, and the asked counts (rounded; one larger than 10 % of the bucket)
            assert {5000, 300_000} <= set(counts) and counts[-1] == 300_000 and counts[0] == 16
        else:  # 10 % of the bucket, then down by factors of 4 while at least 64 entries, and 16
            assert counts[-1] == top and counts[0] == 16 and counts[1] >= 64
        assert all(0 < t < 1.0 for _, t in pts), (kind, pts)  # as measured: a larger operation may cost less
    with pytest.raises(ValueError, match="work_counts"):
        probe(TorchBackend.__new__(TorchBackend), work_numel=100, work_counts={"scatter": [10]})
    with pytest.raises(ValueError, match="work_counts"):
        probe(TorchBackend.__new__(TorchBackend), work_numel=100, work_counts={"sort": [0]})


def test_a_tiny_bucket_still_gets_curves_of_two_points_or_more():
    for n in (1, 10, 100):
        counts, seconds = _work_curves(n, 1, torch.device("cpu"))
        assert set(counts) == set(WORK_KINDS) and len(seconds) == sum(len(c) for c in counts.values())
        assert all(len(c) >= 2 and c == sorted(set(c)) for c in counts.values()), (n, counts)
        at, curve = 0, {}
        for kind, c in counts.items():
            curve[kind] = tuple(zip(map(float, c), sorted(seconds[at:at + len(c)])))
            at += len(c)
        CostModel(work_curve=curve)  # a valid curve


def test_predictions_and_rows_name_the_operations_they_price():
    """``Prediction.work`` lists every local operation, and each estimate row carries its buckets' operations (what
    ``--probe`` times exactly: ``probe_model`` plans them with a configured model first)."""
    pred = predict(4_000_000, 4_000, 2, alpha=0, beta=0, algorithms=("ssar_recursive_double",))
    kinds = [(kind, ops) for kind, ops, _ in pred["ssar_recursive_double"].work]
    assert kinds == [("sort", 1.0), ("sort", 1.0), ("dense", 1.0), ("sparse", 1.0)]
    n = 8_000_000
    rows = estimate(n, 2, CostModel(), densities=[0.01])
    shared = [r for r in rows if r.exchange == SHARED][0]
    parts = buckets(n, 4, 25)
    assert len(parts) == 2
    for b in parts:  # the dense formula on the k values (two passes), the scatter of k values, the zeroed bucket
        kb = float(-(-b // 100))
        assert {("sparse", 1.0, kb), ("dense", 1.0, float(b)), ("dense", 1.0, kb)} <= set(shared.work)
    assert len(shared.work) == 8
