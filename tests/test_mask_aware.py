"""Mask-aware gradient exchange: with identical model-sparsity masks on every rank, the hook allreduces only the
active weights' gradients (no indices), and the dense gradient only on RigL's mask-update steps."""

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist.collectives.backend import ring_allreduce_bytes
from sparsedist.sparsity import RigL
from sparsedist.testing import run_distributed

STEPS = 10


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _train(rank, compressor, mask_aware, optimizer="sgd"):
    model = _net()
    ddp = DDP(model, bucket_cap_mb=100)
    opt = (torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(ddp.parameters(), lr=1e-3))
    rigl = RigL(ddp, opt, density=0.2, distribution="erk", update_every=3, drop_fraction=0.3, stop_at=0.75,
                total_steps=STEPS)
    state = None
    if mask_aware:
        state = sparsedist.register(ddp, compressor, masks=rigl)
    g = torch.Generator().manual_seed(10 + rank)
    log = []
    for step in range(STEPS):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 4, (16,), generator=g)
        dense_step = rigl.needs_dense_gradient()
        before = state.stats()["bytes_sent"] if state else 0
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        sent = (state.stats()["bytes_sent"] - before) if state else 0
        opt.step()
        rigl.step()
        active = sum(int(m.sum()) for m in rigl.masks.values())
        outside_zero = all(bool((p.detach()[~rigl.mask_of(p)] == 0).all())
                           for p in model.parameters() if rigl.mask_of(p) is not None)
        log.append((dense_step, sent, active, outside_zero))
    total = sum(p.numel() for p in model.parameters())
    dense_params = sum(p.numel() for p in model.parameters() if rigl.mask_of(p) is None)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return flat, log, total, dense_params, (state.stats() if state else None)


def scenario(rank, ws):
    out = {}
    for opt in ("sgd", "adam"):
        out[("plain", opt)] = _train(rank, "none", mask_aware=False, optimizer=opt)
        out[("none", opt)] = _train(rank, "none", mask_aware=True, optimizer=opt)
    out[("topk", "sgd")] = _train(rank, "topk", mask_aware=True)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(scenario, 2, timeout=240)


def test_mask_aware_exchange_equals_dense_exchange(results):
    """Inactive weights' gradients are ignored anyway, so skipping them changes nothing."""
    for opt in ("sgd", "adam"):
        for r in results:
            torch.testing.assert_close(r[("none", opt)][0], r[("plain", opt)][0], rtol=1e-6, atol=1e-7)
        assert torch.equal(results[0][("none", opt)][0], results[1][("none", opt)][0])


def test_bytes_are_active_values_only_and_dense_on_update_steps(results):
    world = len(results)
    flat, log, total, dense_params, stats = results[0][("none", "sgd")]
    assert any(d for d, *_ in log) and not all(d for d, *_ in log)
    for i, (dense_step, sent, active, outside_zero) in enumerate(log):
        assert outside_zero, f"masked weights must be exactly zero after step {i}"
        if dense_step:
            assert sent == ring_allreduce_bytes(total, 4, world), i
        else:
            # the active set of this step (masks change only after dense steps) + dense params + the flag
            active_now = log[i - 1][2] if i else log[0][2]
            assert sent == ring_allreduce_bytes(active_now + dense_params + 1, 4, world), i
    assert stats["collectives"].get("values_allreduce", 0) > 0 and stats["collectives"].get("allreduce", 0) > 0
    assert stats["bytes_sent"] < 0.5 * stats["bytes_dense"]


def test_topk_on_the_active_set(results):
    flats = [r[("topk", "sgd")][0] for r in results]
    assert torch.equal(flats[0], flats[1])
    _, log, total, _, stats = results[0][("topk", "sgd")]
    assert all(o for *_, o in log)
    none_bytes = results[0][("none", "sgd")][4]["bytes_sent"]
    assert stats["bytes_sent"] < none_bytes
    assert stats["residual_norm"] > 0
