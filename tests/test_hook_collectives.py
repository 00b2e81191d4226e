"""The hook over SparCML's collectives, global top-k and the auto choice, with real processes (2 and 3 ranks)."""

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist.collectives.choose import CostModel
from sparsedist.testing import run_distributed

EXACT = ["dense", "ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather"]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4))


def _train(rank, compressor, opts, steps=4, overflow_at=None):
    model = _net()
    ddp = DDP(model, bucket_cap_mb=0.005)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    if compressor == "dgc":
        opts = dict(opts, optimizer=opt)
    state = sparsedist.register(ddp, compressor, **opts)
    g = torch.Generator().manual_seed(50 + rank)
    for t in range(steps):
        x, y = torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        if overflow_at == t and rank == 0:
            loss = loss * float("inf")
        loss.backward()
        if not all(torch.isfinite(p.grad).all() for p in model.parameters()):
            continue  # the step shows the overflow on every rank: skip it, as GradScaler would
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return flat, state.stats()


class Const(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))

    def forward(self, c):
        return (self.w * c).sum()


def _mass(rank, collective):
    """sent + residual = raw, summed over ranks: P*(w0 - wT)/lr + sum_r residual_r = sum_r sum_t g_r,t."""
    model = Const(400)
    ddp = DDP(model)
    state = sparsedist.register(ddp, "topk", density=0.05, collective=collective)
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(3 + rank)
    raw = torch.zeros(400)
    for _ in range(6):
        c = torch.randn(400, generator=g)
        raw += c
        opt.zero_grad()
        ddp(c).backward()
        opt.step()
    return -model.w.detach().clone(), state.feedback.residuals["w"].clone(), raw


def scenario(rank, ws):
    out = {}
    for comp, opts in (("topk", {"density": 0.1}), ("threshold", {"threshold": 0.02}),
                       ("dgc", {"density": 0.1}), ("threshold", {"threshold": 100.0})):
        label = f"{comp}-{opts}"
        out[(label, "allgather")] = _train(rank, comp, opts)
        for algo in EXACT:
            out[(label, algo)] = _train(rank, comp, dict(opts, collective=algo))
    out["overflow"] = _train(rank, "topk", {"density": 0.1, "collective": "ssar_split_allgather"}, overflow_at=1)
    out["gtopk"] = _train(rank, "topk", {"density": 0.1, "collective": "gtopk"})
    out["gtopk_mass"] = _mass(rank, "gtopk")
    out["ssar_mass"] = _mass(rank, "ssar_recursive_double")
    # auto with configured models: at 90% density the sparse encoding (8 bytes/entry) outgrows the dense one
    # (4 bytes/element), so dense is cheapest; on a slow link at 1% density a sparse algorithm is
    out["auto_dense"] = _train(rank, "topk", {"density": 0.9, "collective": "auto", "auto_trials": 0,
                                               "cost_model": CostModel(alpha=1e-6, beta=1e-9)})
    out["auto_slow"] = _train(rank, "topk", {"density": 0.01, "collective": "auto", "auto_trials": 0,
                                              "cost_model": CostModel(alpha=1e-6, beta=1e-6)})
    out["auto_probe"] = _train(rank, "topk", {"density": 0.01, "collective": "auto"})
    out["plain"] = _train(rank, "none", {})
    # the same through the synchronous path (a timeout makes every exchange synchronous)
    out["auto_dense_sync"] = _train(rank, "topk", {"density": 0.9, "collective": "auto", "auto_trials": 0,
                                                    "timeout": 60.0, "cost_model": CostModel(alpha=1e-6, beta=1e-9)})
    # measured choice: each plausible collective timed twice per bucket, ratios agreed, then the fastest
    out["auto_tuned"] = _train(rank, "topk", {"density": 0.05, "collective": "auto",
                                               "cost_model": CostModel(alpha=1e-5, beta=1e-9)}, steps=14)
    return out


@pytest.fixture(scope="module", params=[2, 3])
def results(request):
    return run_distributed(scenario, request.param, timeout=400)


def test_every_exact_collective_gives_the_allgather_result(results):
    labels = {k[0] for k in results[0] if isinstance(k, tuple)}
    for label in labels:
        ref = results[0][(label, "allgather")][0]
        for algo in EXACT:
            flats = [r[(label, algo)][0] for r in results]
            for f in flats[1:]:
                assert torch.equal(flats[0], f), f"ranks diverged: {label} {algo}"
            torch.testing.assert_close(flats[0], ref, rtol=1e-5, atol=1e-6, msg=f"{label} {algo}")
            stats = results[0][(label, algo)][1]
            assert stats["collectives"].get(algo, 0) > 0
            assert stats["collective_time"][algo]["calls"] > 0


def test_zero_count_rank_through_sparcml(results):
    label = next(k[0] for k in results[0] if isinstance(k, tuple) and "100.0" in k[0])
    for algo in EXACT:
        assert results[0][(label, algo)][1]["density"] == 0.0


def test_overflow_through_sparcml_reaches_every_rank(results):
    flats = [r["overflow"][0] for r in results]
    assert all(torch.equal(flats[0], f) for f in flats)
    assert all(r["overflow"][1]["overflow_steps"] == 1 for r in results)
    assert torch.isfinite(flats[0]).all()


def test_global_topk_keeps_ranks_identical_and_conserves_mass(results):
    flats = [r["gtopk"][0] for r in results]
    assert all(torch.equal(flats[0], f) for f in flats)
    world = len(results)
    for key in ("gtopk_mass", "ssar_mass"):
        delta = results[0][key][0]
        total_res = sum(r[key][1] for r in results)
        total_raw = sum(r[key][2] for r in results)
        torch.testing.assert_close(world * delta + total_res, total_raw, rtol=1e-4, atol=1e-4, msg=key)


def test_auto_follows_the_cost_model(results):
    dense = results[0]["auto_dense"][1]["collectives"]
    slow = results[0]["auto_slow"][1]["collectives"]
    assert set(dense) == {"dense"}, f"90% density: the dense sum is cheapest, got {dense}"
    assert "dense" not in slow and sum(slow.values()) > 0, f"slow link at 1% density: sparse, got {slow}"
    timing = results[0]["auto_slow"][1]["collective_time"]
    assert all(v["predicted_s"] is not None and v["measured_s"] > 0 for v in timing.values())
    probed = results[0]["auto_probe"][1]
    assert sum(probed["collectives"].values()) > 0
    assert all(torch.equal(results[0]["auto_probe"][0], r["auto_probe"][0]) for r in results)


def test_auto_tuning_agrees_across_ranks(results):
    stats = [r["auto_tuned"][1] for r in results]
    flats = [r["auto_tuned"][0] for r in results]
    assert all(torch.equal(flats[0], f) for f in flats), "ranks diverged under auto tuning"
    ratios = stats[0]["auto_ratios"]
    assert ratios, "the trials never finished"
    assert all(s["auto_ratios"] == ratios for s in stats), "ranks agreed on different ratios"
    assert all(s["collectives"] == stats[0]["collectives"] for s in stats), "ranks chose differently"
    tried = {a for r in ratios.values() for a in r}
    assert len(tried) >= 2 and tried <= set(stats[0]["collectives"]), (tried, stats[0]["collectives"])
    assert all(v > 0 for r in ratios.values() for v in r.values())


def test_auto_dense_sends_everything_and_flushes_the_residual(results):
    """When auto picks the dense sum it skips selection: the step is an uncompressed one (no residual left)."""
    for r in results:
        for key in ("auto_dense", "auto_dense_sync"):  # the model prices the dense sum cheapest at 90 % density
            flat, stats = r[key]
            assert set(stats["collectives"]) == {"dense"}, stats["collectives"]
            assert stats["density"] == 1.0 and stats["residual_norm"] == 0.0
            torch.testing.assert_close(flat, r["plain"][0], rtol=1e-6, atol=1e-7)
    assert all(torch.equal(results[0]["auto_dense"][0], r["auto_dense"][0]) for r in results)


def _auto_resume(rank, ws):
    """collective='auto' state (probed model, agreed ratios, fill-in) survives state_dict()/load_state_dict()."""
    torch.manual_seed(0)
    model = _net()
    ddp = DDP(model, bucket_cap_mb=0.005)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    state = sparsedist.register(ddp, "topk", density=0.05, collective="auto", auto_trials=1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(8):
        opt.zero_grad()
        x, y = torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    saved = state.state_dict()
    fresh = sparsedist.SparsifyState(ddp, sparsedist.compressors.TopKCompressor(0.05), collective="auto")
    fresh.load_state_dict(saved)
    return (state.planner.tuner.ratios(), fresh.planner.tuner.ratios(), state.planner.cost_model.state_dict(),
            fresh.planner.cost_model.state_dict(), state.planner.last_union, fresh.planner.last_union)


def test_auto_state_round_trips_through_state_dict():
    for ratios, restored, model, restored_model, union, restored_union in run_distributed(_auto_resume, 2, timeout=120):
        assert ratios and ratios == restored
        assert model == restored_model
        assert union and union == restored_union


def _auto_dense_flush(rank, ws):
    """auto's dense choice flushes a residual into the sum; on an overflow step the residual is kept untouched."""
    model = Const(400)
    ddp = DDP(model)
    state = sparsedist.register(ddp, "topk", density=0.9, collective="auto", auto_trials=0,
                                cost_model=CostModel(alpha=1e-6, beta=1e-9))
    key = "w"
    residual = torch.full((400,), 0.5 + rank)  # as if earlier sparse steps had left it
    state.feedback.residuals[key] = residual.clone()
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    c = torch.ones(400)
    opt.zero_grad()
    (ddp(c) * (float("inf") if rank == 0 else 1.0)).backward()  # rank 0 overflows
    kept = state.feedback.residuals.get(key)
    overflow_grad_finite = bool(torch.isfinite(model.w.grad).all())
    opt.zero_grad()
    ddp(c).backward()  # a good step: gradient 1 everywhere plus the residual, averaged over ranks
    return kept, overflow_grad_finite, model.w.grad.clone(), state.feedback.residuals.get(key), state.stats()


def test_auto_dense_flushes_the_residual_and_keeps_it_on_overflow():
    out = run_distributed(_auto_dense_flush, 2, timeout=60)
    for rank, (kept, finite, grad, after, stats) in enumerate(out):
        torch.testing.assert_close(kept, torch.full((400,), 0.5 + rank))  # untouched by the overflow step
        assert not finite and stats["overflow_steps"] == 1
        torch.testing.assert_close(grad, torch.full((400,), 1.0 + (0.5 + 1.5) / 2))  # mean of (1 + r_i)
        assert after is None and stats["collectives"] == {"dense": 2}
