"""The alpha-beta cost model: fill-in estimate, per-algorithm predictions, the choice, the probe."""

from __future__ import annotations

import math
import time

import pytest
import torch

from sparsedist.collectives import probe, ring_allreduce_bytes
from sparsedist.collectives.base import CostSheet, curve_seconds
from sparsedist.collectives.choose import (ALGORITHMS, EXACT_ALGORITHMS, PRIMITIVES, CostModel, choose,
                                           effective_universe,
                                           expected_union, predict)
from sparsedist.collectives.measure import _isotonic
from sparsedist.collectives.report import extrapolate, format_table
from sparsedist.testing import run_distributed


def test_expected_union_matches_simulation():
    n, k, P = 1000, 60, 5
    g = torch.Generator().manual_seed(0)
    sizes = []
    for _ in range(300):
        mask = torch.zeros(n, dtype=torch.bool)
        for _ in range(P):
            mask[torch.randperm(n, generator=g)[:k]] = True
        sizes.append(int(mask.sum()))
    simulated = sum(sizes) / len(sizes)
    assert abs(expected_union(n, k, P) - simulated) / simulated < 0.01
    assert expected_union(n, k, 1) == pytest.approx(k)
    assert expected_union(n, n, 3) == n and expected_union(n, 0, 3) == 0.0


def test_effective_universe_reproduces_a_measured_union():
    n, k, P = 100_000, 500, 8
    for union in (k, 1.3 * k, 3 * k, 7.5 * k):
        n_eff = effective_universe(n, k, P, union)
        assert expected_union(n, k, P, n_eff) == pytest.approx(union, rel=1e-6)
    assert effective_universe(n, k, P, P * k) == math.inf
    assert expected_union(n, k, P, math.inf) == P * k


def test_predictions_follow_the_formulas():
    n, k, P = 1_000_000, 1000, 8
    pr = predict(n, k, P, alpha=1e-5, beta=1e-9)
    assert pr["dense"].bytes == pytest.approx(2 * (P - 1) / P * n * 4)
    assert pr["dense"].latency == 2 * (P - 1)
    assert pr["allgather"].bytes == pytest.approx((P - 1) * 16 + (P - 1) * k * 8)  # header, then int32 + fp32
    for name, p in pr.items():
        assert p.time == pytest.approx(1e-5 * p.latency + 1e-9 * p.bytes), name
    # allgather grows linearly with P, the dense ring stays flat
    big = predict(n, k, 64, alpha=1e-5, beta=1e-9)
    assert big["allgather"].bytes > 8 * pr["allgather"].bytes
    assert big["dense"].bytes < 1.2 * pr["dense"].bytes
    # with identical supports recursive doubling sends k entries per round, log2 P rounds
    same = predict(n, k, P, alpha=1e-5, beta=1e-9, union_nnz=k)["ssar_recursive_double"]
    assert same.bytes == pytest.approx(3 * (8 + 8 + k * 8))
    # local work as the code does it: SparCML's merges sort both streams (torch.unique), recursive doubling writes
    # its sparse result entry by entry into a zeroed vector, SSAR split scans its range's flags for the support
    rd = predict(n, k, 2, alpha=0, beta=0)["ssar_recursive_double"]
    assert (rd.sort_work, rd.sparse_work, rd.dense_work) == pytest.approx((k + 2 * k, expected_union(n, k, 2), n))
    dense_rd = predict(n, n // 2 + 1, 2, alpha=0, beta=0)["ssar_recursive_double"]
    assert dense_rd.sparse_work == 0 and dense_rd.dense_work == pytest.approx(2 * n + 2 * n)
    # SSAR split merges what its range received as sparse streams while that fits under delta of the range (a sort
    # of the k entries, no dense accumulator), past it sums densely and scans the range's n/P flags for the support
    low = predict(n, k, 2, alpha=0, beta=0)["ssar_split_allgather"]
    assert (low.sort_work, low.sparse_work, low.dense_work) == pytest.approx((2 * k, expected_union(n, k, 2), n))
    k_hi = 300_000  # > delta * n / P = 250_000
    high = predict(n, k_hi, 2, alpha=0, beta=0)["ssar_split_allgather"]
    assert (high.sort_work, high.sparse_work, high.dense_work) == pytest.approx(
        (k_hi, 2 * k_hi + expected_union(n, k_hi, 2), n / 2 + n + n / 2))
    # Ok-Topk's volume stays under 6k(P-1)/P words (plus headers) and far under allgather's
    assert pr["gtopk"].bytes < 4 * 6 * k * (P - 1) / P + 64 * (P - 1)
    assert pr["gtopk"].bytes < pr["allgather"].bytes / 2


def test_large_beta_chooses_sparse_and_high_latency_at_high_density_chooses_dense():
    n, P = 1_000_000, 8
    slow = choose(n, 0.001 * n, P, alpha=1e-5, beta=1e-8)  # 100 MB/s link, 0.1 % density
    assert slow.algorithm != "dense"
    assert slow.predictions[slow.algorithm].bytes < slow.predictions["dense"].bytes / 10
    # latency-bound at 50 % density: the sparse algorithms gain nothing on bytes and pay more messages (sizes
    # first, two phases) -- at P = 3 the ring's 2(P-1) alphas are the fewest
    fast = choose(n, 0.5 * n, 3, alpha=1e-3, beta=1e-12)
    assert fast.algorithm == "dense"
    # at P = 8 recursive doubling's 2 log2 P alphas beat the ring's 2(P-1) when nothing but latency counts ...
    assert choose(n, 0.5 * n, P, alpha=1e-3, beta=1e-12).algorithm == "ssar_recursive_double"
    # ... and dense wins again once the local work of merging half of a million entries is counted
    work = choose(n, 0.5 * n, P, alpha=1e-4, beta=1e-12, gamma=2e-8, gamma_dense=5e-10)
    assert work.algorithm == "dense"
    # the choice is the argmin of the predictions it reports
    for c in (slow, fast, work):
        assert c.predicted_time == min(p.time for p in c.predictions.values())
    # with only latency mattering and little data, recursive doubling (log P rounds) wins
    lat = choose(n, 10, 64, alpha=1e-3, beta=1e-12, candidates=("allgather", "ssar_recursive_double",
                                                               "ssar_split_allgather"))
    assert lat.algorithm == "ssar_recursive_double"


def test_dense_switch_in_the_model():
    n, k, P = 10_000, 2_000, 8  # random supports: U(2) = 3600 < n/2, U(4) = 5904 > n/2
    assert expected_union(n, k, 2) < n / 2 < expected_union(n, k, 4)
    p = predict(n, k, P, alpha=0, beta=1, algorithms=("ssar_recursive_double",))["ssar_recursive_double"]
    rounds = [8 + 8 + k * 8, 8 + 8 + expected_union(n, k, 2) * 8, 8 + 8 + n * 4]
    assert p.bytes == pytest.approx(sum(rounds))
    never = predict(n, k, P, alpha=0, beta=1, dense_threshold=float("inf"),
                    algorithms=("ssar_recursive_double",))["ssar_recursive_double"]
    assert never.bytes == pytest.approx(8 + 8 + k * 8 + 8 + 8 + expected_union(n, k, 2) * 8
                                        + 8 + 8 + expected_union(n, k, 4) * 8)
    assert never.bytes > p.bytes
    # full overlap: no fill-in, never dense
    same = predict(n, k, P, alpha=0, beta=1, union_nnz=k, algorithms=("ssar_recursive_double",))
    assert same["ssar_recursive_double"].bytes == pytest.approx(3 * (16 + k * 8))


def test_every_registered_collective_prices_itself():
    """The model prices exactly the registry's algorithms, each by its own cost() beside its code."""
    from sparsedist.collectives.registry import COLLECTIVES

    preds = predict(100_000, 500, 4, alpha=1e-5, beta=1e-9)
    assert list(preds) == list(COLLECTIVES) == list(ALGORITHMS)
    for name, pred in preds.items():
        assert pred.bytes > 0 and pred.latency > 0, name


def test_edge_cases_and_validation():
    one = choose(1000, 10, 1, alpha=1e-5, beta=1e-9)
    assert one.algorithm == "dense" and one.predicted_time == 0.0
    with pytest.raises(ValueError, match="unknown algorithm"):
        predict(100, 1, 2, alpha=1, beta=1, algorithms=("ring",))
    with pytest.raises(ValueError, match="at least one"):
        choose(100, 1, 2, alpha=1, beta=1, candidates=())
    with pytest.raises(ValueError, match=">= 0"):
        predict(100, 1, 2, alpha=-1, beta=1)
    with pytest.raises(ValueError, match="CostModel.beta"):
        CostModel(beta=-1.0)
    m = CostModel(alpha=3e-5, beta=2e-9, gamma=1e-8)
    m2 = CostModel()
    m2.load_state_dict(m.state_dict())
    assert (m2.alpha, m2.beta, m2.gamma) == (3e-5, 2e-9, 1e-8)
    with pytest.raises(ValueError, match="world_size"):
        CostModel(call_latency={"allreduce": 1e-4, "allgather": 1e-4, "sendrecv": 1e-4, "alltoall": 1e-4})
    # measured per-call costs replace alpha at the world size they were measured at, and only there
    cl = {"allreduce": 1e-3, "allgather": 1e-3, "sendrecv": 1e-6, "alltoall": 1e-3}
    mc = CostModel(alpha=1e-5, beta=1e-12, call_latency=cl, world_size=8)
    p8 = mc.predict(10**6, 10, 8)
    assert p8["dense"].time == pytest.approx(1e-3 + 1e-12 * p8["dense"].bytes)
    assert p8["ssar_recursive_double"].time == pytest.approx(6e-6 + 1e-12 * p8["ssar_recursive_double"].bytes)
    assert mc.predict(10**6, 10, 4)["dense"].time == pytest.approx(6e-5 + 1e-12 * 2 * 3 / 4 * 4e6)
    m3 = CostModel()
    m3.load_state_dict(mc.state_dict())
    assert m3.call_latency == cl and m3.world_size == 8
    assert m.choose(10**6, 10**3, 8).algorithm == choose(10**6, 10**3, 8, alpha=3e-5, beta=2e-9,
                                                         gamma=1e-8).algorithm
    assert set(ALGORITHMS) == set(EXACT_ALGORITHMS) | {"gtopk"}


def test_cost_sheet_keeps_bytes_per_primitive_kind():
    sheet = CostSheet()
    sheet.step(3, 100.0, "alltoall")
    sheet.step(1, 40.0, "sendrecv", calls=2)
    sheet.step(1, 10.0, "alltoall")
    assert sheet.kind_bytes == {"alltoall": 110.0, "sendrecv": 40.0} and sheet.bytes == 150.0
    assert sheet.calls == {"alltoall": 2.0, "sendrecv": 2.0}
    amortised = CostSheet()
    amortised.add(sheet, 0.25)
    assert amortised.kind_bytes == {"alltoall": 27.5, "sendrecv": 10.0} and amortised.bytes == 37.5
    # priced per kind: 110 bytes at 1 s/B, 40 at 2 s/B; per call: 2 * 0.5 + 2 * 3
    p = sheet.done("x", 7.0, 1e9, 0.0, 0.0, {"alltoall": 0.5, "sendrecv": 3.0, "allgather": 0, "allreduce": 0},
                   {"alltoall": 1.0, "sendrecv": 2.0, "allgather": 9.0, "allreduce": 9.0})
    assert p.time == pytest.approx(110 + 80 + 1 + 6) and p.bytes == 150.0 and p.latency == 5


def test_call_beta_prices_each_primitive_by_its_own_measured_rate():
    n, k, P, beta = 2_000_000, 20_000, 6, 1e-9
    kw = dict(alpha=1e-5, beta=beta, gamma=1e-8, gamma_dense=1e-10)
    plain = predict(n, k, P, **kw)
    # absent, or every kind at beta: the same predictions as ever, to the last bit
    same = predict(n, k, P, **kw, call_beta=dict.fromkeys(PRIMITIVES, beta))
    assert all(same[a].time == pytest.approx(plain[a].time, rel=1e-12) for a in ALGORITHMS)
    # the kinds partition every algorithm's bytes: making one kind free removes exactly its bytes' share
    for a in ALGORITHMS:
        saved = 0.0
        for kind in PRIMITIVES:
            free = predict(n, k, P, **kw, call_beta={**dict.fromkeys(PRIMITIVES, beta), kind: 0.0},
                           algorithms=(a,))[a]
            assert free.bytes == plain[a].bytes and free.sparse_work == plain[a].sparse_work
            saved += plain[a].time - free.time
        assert saved == pytest.approx(beta * plain[a].bytes, rel=1e-9), a
    # which kinds each algorithm uses: dense only the allreduce, SSAR recursive doubling only send/recv
    slow_p2p = predict(n, k, P, **kw, call_beta={**dict.fromkeys(PRIMITIVES, beta), "sendrecv": 3 * beta})
    assert slow_p2p["dense"].time == pytest.approx(plain["dense"].time)
    assert slow_p2p["allgather"].time == pytest.approx(plain["allgather"].time)
    rd = plain["ssar_recursive_double"]
    assert slow_p2p["ssar_recursive_double"].time == pytest.approx(rd.time + 2 * beta * rd.bytes)
    # a send/recv twice as slow per byte as the allgather turns a tie into the allgather's win
    n2, k2 = 1_000_000, 10_000
    tied = choose(n2, k2, 2, alpha=0, beta=beta, candidates=("allgather", "ssar_recursive_double"))
    assert tied.predictions["allgather"].bytes == pytest.approx(tied.predictions["ssar_recursive_double"].bytes,
                                                                rel=1e-3)
    for p2p, expect in ((2 * beta, "allgather"), (beta / 2, "ssar_recursive_double")):
        cb = {**dict.fromkeys(PRIMITIVES, beta), "sendrecv": p2p}
        assert choose(n2, k2, 2, alpha=0, beta=beta, call_beta=cb,
                      candidates=("allgather", "ssar_recursive_double")).algorithm == expect
    with pytest.raises(ValueError, match=r"call_beta\['alltoall'\]"):
        predict(n, k, P, **kw, call_beta={"allreduce": 1e-9, "allgather": 1e-9, "sendrecv": 1e-9})
    with pytest.raises(ValueError, match="seconds per byte"):
        predict(n, k, P, **kw, call_beta={**dict.fromkeys(PRIMITIVES, beta), "allgather": -1.0})


def test_cost_model_uses_call_beta_only_at_its_world_size():
    cb = {"allreduce": 1e-9, "allgather": 2e-9, "sendrecv": 4e-9, "alltoall": 3e-9}
    m = CostModel(alpha=1e-5, beta=1e-9, call_beta=cb, world_size=4)
    at4, at8 = m.predict(10**6, 10**4, 4), m.predict(10**6, 10**4, 8)
    assert at4["allgather"].time == pytest.approx(1e-5 * at4["allgather"].latency + 2e-9 * at4["allgather"].bytes)
    assert at8["allgather"].time == pytest.approx(1e-5 * at8["allgather"].latency + 1e-9 * at8["allgather"].bytes)
    assert m.choose(10**6, 10**4, 4).predictions == {a: at4[a] for a in EXACT_ALGORITHMS}
    # a configured model (no call_beta) predicts exactly what predict() with its parameters does
    plain = CostModel(alpha=1e-5, beta=1e-9, gamma=2e-9)
    assert plain.call_beta is None
    assert plain.predict(10**6, 10**4, 4) == predict(10**6, 10**4, 4, alpha=1e-5, beta=1e-9, gamma=2e-9)
    with pytest.raises(ValueError, match="world_size"):
        CostModel(call_beta=cb)
    with pytest.raises(ValueError, match=r"CostModel.call_beta\['sendrecv'\]"):
        CostModel(call_beta={**cb, "sendrecv": float("inf")}, world_size=4)
    with pytest.raises(ValueError, match=r"CostModel.call_beta\['allgather'\]"):
        CostModel(call_beta={**cb, "allgather": True}, world_size=4)
    m2 = CostModel()
    m2.load_state_dict(m.state_dict())
    assert m2.call_beta == cb and m2.world_size == 4 and m2.predict(10**6, 10**4, 4) == at4
    old = plain.state_dict()
    del old["call_beta"]  # a state saved before call_beta existed
    m2.load_state_dict(old)
    assert m2.call_beta is None and m2.world_size is None


def test_curve_seconds_interpolates_per_segment_and_extrapolates_the_last():
    pts = ((8.0, 1e-4), (1000.0, 2e-4), (3000.0, 1e-3))
    assert curve_seconds(pts, 0) == curve_seconds(pts, 8) == 1e-4  # below the first point: its latency
    assert curve_seconds(pts, 504) == pytest.approx(1.5e-4)  # halfway along the first segment
    assert curve_seconds(pts, 2000) == pytest.approx(6e-4)
    assert curve_seconds(pts, 5000) == pytest.approx(1e-3 + 2000 * 4e-7)  # the last segment's seconds per byte


def test_a_straight_curve_prices_exactly_like_call_latency_and_call_beta():
    """Per call, ``a + b * bytes``: the same as ``call_latency = a`` and ``call_beta = b``, for every algorithm, at
    2 (power of two), 3 and 6 ranks -- i.e. each cost formula's calls and their sizes add up (SparCML's size
    messages priced apart from their payloads, the global top-k's amortised steps by their weights)."""
    cl = {"allreduce": 3e-4, "allgather": 2e-4, "sendrecv": 1e-4, "alltoall": 5e-4}
    cb = {"allreduce": 1e-9, "allgather": 2e-9, "sendrecv": 3e-9, "alltoall": 4e-9}
    curve = {kind: ((0.0, cl[kind]), (1e6, cl[kind] + 1e6 * cb[kind])) for kind in PRIMITIVES}
    kw = dict(alpha=1e-5, beta=1e-9, gamma=1e-8, gamma_dense=1e-10, gamma_sort=3e-8)
    for P in (2, 3, 6):
        for k in (200, 20_000):
            lin = predict(2_000_000, k, P, **kw, call_latency=cl, call_beta=cb)
            cur = predict(2_000_000, k, P, **kw, call_curve=curve)
            for a in ALGORITHMS:
                assert cur[a].time == pytest.approx(lin[a].time, rel=1e-9), (P, k, a)
                assert (cur[a].bytes, cur[a].latency) == (lin[a].bytes, lin[a].latency)


def test_call_curve_prices_each_call_at_its_own_size():
    """A link whose calls slow down past 1 MB (gloo's allgather over TCP, docs/estimate.md): a 1 % allgather of
    0.2 MB is priced at the fast rate, a 10 % one of 2 MB mostly at the slow rate; one call_beta cannot do both."""
    fast, slow = 1e-8, 2e-8  # seconds per byte below and above 1 MB
    curve = {kind: ((0.0, 1e-4), (2**20, 1e-4 + 2**20 * fast), (2**23, 1e-4 + 2**20 * fast + 7 * 2**20 * slow))
             for kind in PRIMITIVES}
    n, P = 2_500_000, 2
    for d in (0.01, 0.1):
        k = d * n
        pred = predict(n, k, P, alpha=0, beta=0, call_curve=curve, algorithms=("allgather",))["allgather"]
        payload = k * 8  # int32 index + fp32 value, one peer
        expect = 2e-4 + 16 * fast + (payload * fast if payload <= 2**20 else 2**20 * fast + (payload - 2**20) * slow)
        assert pred.time == pytest.approx(expect, rel=1e-6)
    m = CostModel(alpha=1e-5, beta=1e-9, call_curve=curve, world_size=2)
    assert m.predict(n, 0.01 * n, 2)["allgather"].time == pytest.approx(2e-4 + (16 + 0.08 * n) * fast, rel=1e-6)
    assert m.predict(n, 0.01 * n, 4) == predict(n, 0.01 * n, 4, alpha=1e-5, beta=1e-9)  # other world sizes
    m2 = CostModel()
    m2.load_state_dict(m.state_dict())
    assert m2.call_curve == curve and m2.predict(n, 1000, 2) == m.predict(n, 1000, 2)
    with pytest.raises(ValueError, match="world_size"):
        CostModel(call_curve=curve)
    bad = ({kind: curve[kind][:1] for kind in PRIMITIVES}, {**curve, "sendrecv": curve["sendrecv"][::-1]},
           {kind: curve[kind] for kind in PRIMITIVES[:3]}, {**curve, "allgather": ((0, 1e-4), (10, float("inf")))})
    for c in bad:
        with pytest.raises(ValueError, match=r"call_curve\['\w+'\] must be at least two"):
            predict(n, 1000, 2, alpha=0, beta=0, call_curve=c)


def test_gamma_sort_prices_sparcmls_input_sort_and_nothing_else():
    n, k, P = 1_000_000, 10_000, 4
    kw = dict(alpha=1e-5, beta=1e-9, gamma=1e-8, gamma_dense=1e-10)
    plain, sorted_ = predict(n, k, P, **kw), predict(n, k, P, **kw, gamma_sort=5e-8)
    for a in ALGORITHMS:
        extra = sorted_[a].time - plain[a].time
        if a in ("ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather", "gtopk"):
            assert sorted_[a].sort_work >= k and extra == pytest.approx(5e-8 * sorted_[a].sort_work), a
        else:
            assert sorted_[a].sort_work == 0 and extra == 0, a
    # 0 (the default, and a configured model's) adds nothing, to the last bit; an old state loads as 0
    assert predict(n, k, P, **kw, gamma_sort=0.0) == plain
    state = CostModel(alpha=1e-5, gamma_sort=5e-8).state_dict()
    assert state["gamma_sort"] == 5e-8
    del state["gamma_sort"]
    m = CostModel(gamma_sort=1.0)
    m.load_state_dict(state)
    assert m.gamma_sort == 0.0
    with pytest.raises(ValueError, match="gamma_sort"):
        CostModel(gamma_sort=-1.0)


def test_isotonic_fit_of_the_probe_curves():
    assert _isotonic([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    # one noisy median is averaged with its neighbours instead of lifting every later point
    assert _isotonic([3.0, 0.2, 0.4, 4.0, 17.0]) == pytest.approx([1.2, 1.2, 1.2, 4.0, 17.0])
    assert _isotonic([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]


def test_extrapolation_table_to_1024_ranks():
    rows = extrapolate(25_000_000, [0.001, 0.01], [8, 64, 1024], CostModel(alpha=5e-6, beta=1 / 12.5e9))
    assert len(rows) == 6 and all(r["best"] in EXACT_ALGORITHMS for r in rows)
    at = {(r["density"], r["P"]): r for r in rows}
    # allgather's bytes grow ~linearly with P; at P=1024 and 1 % it costs far more than the dense ring
    assert at[(0.01, 1024)]["allgather"]["bytes"] > 10 * at[(0.01, 1024)]["dense"]["bytes"]
    assert at[(0.01, 1024)]["best"] != "allgather"
    text = format_table(rows)
    assert "1024" in text and "ssar_rd" in text and len(text.splitlines()) == 8


def _probe_worker(rank, ws):
    from sparsedist.collectives.backend import TorchBackend
    from sparsedist.collectives.sparse_allreduce import sparse_allreduce

    be = TorchBackend(timeout=60)
    be.bytes_sent = 123
    t0 = time.perf_counter()
    model = probe(be)
    elapsed = time.perf_counter() - t0
    counters = (be.bytes_sent, be.bytes_received)
    t0 = time.perf_counter()
    full = probe(be, sizes=(1, 2**12, 2**16), call_latency=False, call_beta=True, work_numel=2**16,
                 call_sizes=(2**10, 2**16))
    full_elapsed = time.perf_counter() - t0
    full_counters = (be.bytes_sent, be.bytes_received)
    g = torch.Generator().manual_seed(rank)
    idx = torch.randperm(5000, generator=g)[:50]
    val = torch.randn(50, generator=g)
    out = sparse_allreduce(idx, val, 5000, algorithm="auto", backend=be, cost_model=model)
    ref = torch.zeros(5000)
    for r in range(ws):
        g = torch.Generator().manual_seed(r)
        i = torch.randperm(5000, generator=g)[:50]
        ref.index_add_(0, i, torch.randn(50, generator=g))
    return {"params": (model.alpha, model.beta, model.gamma, model.gamma_dense, model.call_latency,
                       model.world_size), "elapsed": elapsed,
            "counters": counters, "err": float((out - ref).abs().max()),
            "full": (full.call_beta, full.call_latency, full.world_size, full.gamma, full.gamma_dense,
                     full.measured["call_s"], full.call_curve, full.gamma_sort), "model_extras": (
                model.call_curve, model.gamma_sort), "full_elapsed": full_elapsed, "full_counters": full_counters}


def test_probe_measures_and_agrees_across_ranks():
    res = run_distributed(_probe_worker, 2, timeout=120)
    assert res[0]["params"] == res[1]["params"], "ranks must get the same model, or they choose differently"
    alpha, beta, gamma, gamma_dense, calls, world = res[0]["params"]
    assert 0 < alpha < 0.05 and 0 < beta < 1e-6 and gamma > 0 and gamma_dense > 0
    assert world == 2 and set(calls) == {"allreduce", "allgather", "sendrecv", "alltoall"}
    assert all(0 < v < 0.05 for v in calls.values())
    for r in res:
        assert r["counters"] == (123, 0), "the probe must leave the byte counters as they were"
        assert r["elapsed"] < 5.0  # well under 1 s on an idle machine; generous for a loaded CI box
        assert r["err"] < 1e-5
    # the optional measurements: each primitive's seconds per byte (the per-call latencies come with them) and the
    # local work at a given size; averaged over ranks like the rest, byte counters untouched
    assert res[0]["full"] == res[1]["full"]
    call_beta, calls, world, gamma, gamma_dense, call_s, curve, gamma_sort = res[0]["full"]
    assert res[0]["model_extras"] == (None, 0.0), "the default probe (collective='auto') measures no curve or sort"
    assert gamma_sort > 0 and set(curve) == set(PRIMITIVES)
    for kind, pts in curve.items():  # the tiny call, then 2**10 and 2**16 elements; a larger call never cheaper
        assert [b for b, _ in pts] == [b for b, _ in sorted(pts)] and len(pts) == 3, (kind, pts)
        assert pts[-1][0] == call_s[kind][0] and all(t1 >= t0 > 0 for (_, t0), (_, t1) in zip(pts, pts[1:]))
    assert world == 2 and set(call_beta) == set(calls) == set(PRIMITIVES)
    assert all(0 <= v < 1e-6 for v in call_beta.values()) and sum(call_beta.values()) > 0
    assert gamma > 0 and gamma_dense > 0
    part = 2**16 // 2
    assert {kind: b for kind, (b, _) in call_s.items()} == {
        "allreduce": ring_allreduce_bytes(2**16, 4, 2), "allgather": part * 4, "sendrecv": part * 4,
        "alltoall": part * 4}
    for kind, (b, seconds) in call_s.items():
        assert call_beta[kind] == pytest.approx(max(seconds - calls[kind], 0.0) / b)
    for r in res:
        assert r["full_counters"] == (123, 0) and r["full_elapsed"] < 10.0
    with pytest.raises(ValueError, match="work_numel"):
        probe(_SumOfTwo([0.0]), work_numel=0)
    with pytest.raises(ValueError, match="call_sizes"):
        probe(_SumOfTwo([0.0]), call_sizes=(2**10, 0))


class _SumOfTwo:
    """A stand-in backend of world size 2 whose other rank measured ``other`` (allreduce = mine + other)."""

    size = 2

    def __init__(self, other):
        self.other = other
        self.calls = 0

    def allreduce(self, t):
        self.calls += 1
        return t + torch.tensor(self.other, dtype=t.dtype)


def test_autotuner_tries_plausible_candidates_then_follows_measured_ratios():
    from sparsedist.collectives.tuner import AutoTuner

    model = CostModel(alpha=20e-6, beta=1e-9)
    choice = model.choose(1_000_000, 10_000, 2)  # every exact candidate, with predictions
    preds = {a: p.time for a, p in choice.predictions.items()}
    best = min(preds.values())
    plausible = [a for a in preds if preds[a] <= 4 * best]
    assert choice.algorithm in plausible and len(plausible) >= 2

    tuner = AutoTuner(trials=2)
    # pretend the model's favourite is 10x slower than predicted and every other candidate exactly as predicted
    tried = []
    for _ in range(2 * len(plausible)):
        assert tuner.tuning("b0")
        algo = tuner.choose("b0", choice, backend=None)  # no collective during the trials
        tried.append(algo)
        tuner.observe("b0", algo, preds[algo], preds[algo] * (10.0 if algo == choice.algorithm else 1.0))
    assert tried == plausible * 2, "each plausible candidate twice, interleaved"
    be = _SumOfTwo([10.0 if a == choice.algorithm else 1.0 for a in plausible])  # the other rank agrees
    pick = tuner.choose("b0", choice, backend=be)
    assert be.calls == 1 and not tuner.tuning("b0")
    expect = min((a for a in plausible if a != choice.algorithm), key=lambda a: preds[a])
    assert pick == expect != choice.algorithm
    assert tuner.ratios()["b0"][choice.algorithm] == pytest.approx(10.0)
    assert tuner.choose("b0", choice, backend=be) == pick and be.calls == 1  # no further collective

    # ranks that measured differently still agree: the ratios are averaged
    other = AutoTuner(trials=2)
    other.load_state_dict(tuner.state_dict())
    assert other.choose("b0", choice, backend=None) == pick and other.ratios() == tuner.ratios()

    # trials=0: the model alone; a bucket is tuned on its own
    assert AutoTuner(trials=0).choose("b0", choice, backend=None) == choice.algorithm
    assert tuner.tuning("b1")
    with pytest.raises(ValueError, match="trials"):
        AutoTuner(trials=-1)
    with pytest.raises(ValueError, match="explore_factor"):
        AutoTuner(explore_factor=0.5)


def test_autotuner_second_look_and_untried_candidates():
    """Left out by the model, a candidate is still tried when its bare prediction is within explore_factor of the
    best measured time; candidates never tried take the largest agreed ratio."""
    from sparsedist.collectives.tuner import AutoTuner

    model = CostModel(alpha=20e-6, beta=1e-9)
    choice = model.choose(1_000_000, 10_000, 2)
    preds = {a: p.time for a, p in choice.predictions.items()}
    pick = choice.algorithm
    tuner = AutoTuner(trials=1, explore_factor=1.0)  # first only the model's pick
    assert tuner.choose("b", choice, backend=None) == pick
    tuner.observe("b", pick, preds[pick], 3 * preds[pick])  # 3x slower than predicted
    extra = [a for a in preds if a != pick and preds[a] <= 3 * preds[pick]]
    assert extra, "the test needs a candidate priced between 1x and 3x the pick"
    tried = []
    for _ in extra:  # the second look: one trial each (the first agreement is one allreduce)
        algo = tuner.choose("b", choice, backend=_SumOfTwo([3.0]))
        tried.append(algo)
        tuner.observe("b", algo, preds[algo], preds[algo])  # exactly as predicted
    assert tried == extra and tuner.tuning("b")
    final = tuner.choose("b", choice, backend=_SumOfTwo([1.0] * len(extra)))
    assert not tuner.tuning("b")
    ratios = tuner.ratios()["b"]
    assert ratios[pick] == pytest.approx(3.0) and all(ratios[a] == pytest.approx(1.0) for a in extra)
    never = [a for a in preds if a not in ratios]
    expect = min(preds, key=lambda a: (ratios.get(a, 3.0) * preds[a], a != "dense", list(preds).index(a)))
    assert final == expect
    assert all(a not in tried for a in never)


def test_autotuner_prefers_a_measured_dense_sum_within_its_margin():
    from sparsedist.collectives.tuner import AutoTuner

    model = CostModel(alpha=20e-6, beta=1e-9)
    choice = model.choose(1_000_000, 10_000, 2)
    preds = {a: p.time for a, p in choice.predictions.items()}
    sparse = min((a for a in preds if a != "dense"), key=lambda a: preds[a])
    for margin, dense_slower, expect in ((0.25, 1.2, "dense"), (0.25, 1.3, sparse), (0.0, 1.01, sparse)):
        tuner = AutoTuner(trials=1, explore_factor=1e9, dense_margin=margin)  # every candidate tried once
        measured = {}
        for _ in preds:
            algo = tuner.choose("b", choice, backend=None)
            measured[algo] = preds[sparse] * (dense_slower if algo == "dense" else 1.0 if algo == sparse else 5.0)
            tuner.observe("b", algo, preds[algo], measured[algo])
        ratios = [measured[a] / preds[a] for a in dict.fromkeys(preds)]
        # the other rank measured the same: the agreed ratios are these
        assert tuner.choose("b", choice, backend=_SumOfTwo(ratios)) == expect, (margin, dense_slower)
    with pytest.raises(ValueError, match="dense_margin"):
        AutoTuner(dense_margin=-0.1)


class _Twice:
    """World size 2, the other rank measured exactly the same (allreduce doubles)."""

    size = 2

    def allreduce(self, t):
        return t * 2


def _tuner_after_trials(refresh_every: int, trial_times):
    """A model's choice, its predictions, and an AutoTuner whose trials measured ``trial_times(preds)[algo]``."""
    from sparsedist.collectives.tuner import AutoTuner

    model = CostModel(alpha=20e-6, beta=1e-9)
    choice = model.choose(1_000_000, 10_000, 2)
    preds = {x: p.time for x, p in choice.predictions.items()}
    tuner = AutoTuner(trials=1, explore_factor=1e9, dense_margin=0.0, refresh_every=refresh_every)
    a, b = sorted((x for x in preds if x != "dense"), key=lambda x: preds[x])[:2]
    times = trial_times(preds, a, b)
    for _ in preds:
        algo = tuner.choose("b", choice, backend=_Twice())
        tuner.observe("b", algo, preds[algo], times[algo])
    return choice, preds, tuner, a, b


def test_autotuner_refresh_corrects_a_choice_made_on_noisy_trials():
    def true_times(preds, a, b):  # b is really the fastest
        return {x: preds[x] * (3.0 if x == a else 1.0 if x == b else 10.0) for x in preds}

    def lucky(preds, a, b):  # a's single trial was lucky
        return {**true_times(preds, a, b), a: preds[a] * 0.5}

    choice, preds, tuner, a, b = _tuner_after_trials(4, lucky)
    true = true_times(preds, a, b)
    picks = []
    for _ in range(12):
        algo = tuner.choose("b", choice, backend=_Twice())
        picks.append(algo)
        tuner.observe("b", algo, preds[algo], true[algo])
    assert picks[0] == a, "the lucky trial wins first"
    assert picks[-1] == b and tuner.ratios()["b"][a] == pytest.approx(3.0), picks


def test_autotuner_refresh_judges_the_runner_up_on_its_last_runs_not_one():
    """The runner-up runs once per period; one lucky run must not flip the choice (its median spans periods)."""
    def true_times(preds, a, b):  # b is 10 % slower than a, close enough to be re-measured every period
        return {**{x: preds[x] * (1.0 if x == a else 10.0) for x in preds}, b: preds[a] * 1.1}

    choice, preds, tuner, a, b = _tuner_after_trials(4, true_times)
    true = true_times(preds, a, b)
    b_runs, picks = 0, []
    for _ in range(40):
        algo = tuner.choose("b", choice, backend=_Twice())
        picks.append(algo)
        t = true[algo]
        if algo == b:
            b_runs += 1
            t = preds[a] * 0.5 if b_runs == 3 else t  # b's third re-measurement is lucky (half of a's time)
        tuner.observe("b", algo, preds[algo], t)
    assert b_runs >= 4, picks  # the runner-up was re-measured every period
    assert set(picks) == {a, b}, picks
    # the lucky sample was outvoted by b's earlier runs: b never runs twice within a period (4 calls)
    assert all(picks[i:i + 4].count(b) <= 1 for i in range(len(picks) - 3)), picks
    assert b_runs <= len(picks) // 4 + 1, picks
    assert tuner.ratios()["b"][b] * preds[b] == pytest.approx(preds[a] * 1.1)
