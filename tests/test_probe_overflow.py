"""Probe: a non-finite gradient on one rank, on every collective.

Rank 1's loss is multiplied by inf at step 5 (a GradScaler is in use). Every rank must see the overflow (the
GradScaler skips the step there, so the parameters do not move), count it, and keep its state: residuals,
compressor state (DGC's momentum) and the collective's own state (global top-k's threshold and ranges) after
the step are those before it. Training then goes on with identical parameters on every rank. Before the fix,
``collective="gtopk"`` failed here: rank 1 raised "corrupt sparse block", rank 0 committed its state and died
at the next step.
"""

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist.collectives import CostModel
from sparsedist.collectives.gtopk import GlobalTopK
from sparsedist.testing import run_distributed

BAD_STEP, STEPS = 5, 8
COLLECTIVES = ["allgather", "dense", "ssar_recursive_double", "ssar_split_allgather", "dsar_split_allgather",
               "gtopk"]
CASES = {**{f"topk/{c}": ("topk", dict(density=0.1, collective=c)) for c in COLLECTIVES},
         "topk/auto": ("topk", dict(density=0.1, collective="auto", cost_model=CostModel(alpha=1e-5, beta=1e-7),
                                    auto_trials=0)),
         "topk/timeout": ("topk", dict(density=0.1, timeout=60.0)),
         "dgc/gtopk": ("dgc", dict(density=0.1, collective="gtopk")),
         "dgc/allgather": ("dgc", dict(density=0.1)),
         "threshold/allgather": ("threshold", dict(threshold=0.01)),
         "randk/allgather": ("randk", dict(density=0.1)),
         "none": ("none", {})}


def _snapshot(state):
    sd = state.state_dict()
    return {"residuals": sd["feedback"]["residuals"], "compressor": sd["compressor"],
            "collectives": {k: v for k, v in sd["auto"]["collectives"].items() if v}}  # (those with state)


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _run_case(rank, compressor, options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    ddp = DDP(model, bucket_cap_mb=0.004)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    opts = dict(options, grad_scaler=scaler)
    if compressor == "dgc":
        opts["optimizer"] = opt
    state = sparsedist.register(ddp, compressor, **opts)
    g = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        loss = ddp(torch.randn(16, 20, generator=g)).pow(2).mean()
        if step == BAD_STEP and rank == 1:
            loss = loss * float("inf")
        if step == BAD_STEP:
            before = _snapshot(state), [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step == BAD_STEP:
            kept_state = _same(before[0], _snapshot(state))
            unmoved = all(torch.equal(a, p) for a, p in zip(before[1], model.parameters()))
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return state.stats()["overflow_steps"], kept_state, unmoved, params


def _direct_gtopk(rank, threshold_interval):
    """GlobalTopK itself, NaN on rank 1 at call 3: on a threshold-reuse call (the owner says so in the count
    allgather) and on an estimation call (the owner's largest magnitude in the head is NaN)."""
    topk = GlobalTopK(threshold_interval=threshold_interval)
    g = torch.Generator().manual_seed(rank)
    out = []
    for call in range(5):
        idx = torch.randperm(1000, generator=g)[:50]
        val = torch.randn(50, generator=g)
        if call == 3 and rank == 1:
            val[7] = float("nan")
        before = topk.state_dict()
        res = topk(idx, val, 1000, 50)
        out.append((res.finite, res.indices.numel(), bool(res.kept.any()), before == topk.state_dict()))
    return out


def _worker(rank, ws):
    return {**{name: _run_case(rank, *case) for name, case in CASES.items()},
            "direct": {interval: _direct_gtopk(rank, interval) for interval in (32, 1)}}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2, timeout=240, collective_timeout=60)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_rank_sees_the_overflow_skips_the_step_and_keeps_its_state(results, name):
    for rank, r in enumerate(results):
        overflow_steps, kept_state, unmoved, _ = r[name]
        assert overflow_steps == 1, f"{name}: rank {rank} counted {overflow_steps} overflow steps"
        assert kept_state, f"{name}: rank {rank}'s state changed on the overflow step"
        assert unmoved, f"{name}: rank {rank}'s parameters moved on the overflow step"
    assert torch.equal(results[0][name][3], results[1][name][3]), f"{name}: ranks differ after training on"


@pytest.mark.parametrize("interval", [32, 1])
def test_global_topk_itself_reports_a_non_finite_sum_on_every_rank_and_keeps_its_state(results, interval):
    for r in results:
        calls = r["direct"][interval]
        assert [c[0] for c in calls] == [True, True, True, False, True], calls
        finite_call = calls[3]
        assert finite_call[1] == 0 and not finite_call[2] and finite_call[3], finite_call
        assert all(c[1] == 50 for i, c in enumerate(calls) if i != 3 and interval == 1), calls
