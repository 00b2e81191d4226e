"""The DDP hook with an exchange-aware optimizer (sparsedist.optim): it sends the optimizer's update (to_wire)
instead of the gradient, densely during the warm-up, and reproduces sparsedist.optim.ReferenceExchange -- the
plain, one-parameter-at-a-time implementation of the contract -- bit for bit at 2 ranks."""

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
import sparsedist.optim as so
from sparsedist.testing import run_distributed


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 8), nn.Flatten(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 11))


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 11, (12, 4), generator=g), torch.randint(0, 11, (12,), generator=g)


def _optimizer(m: nn.Module, kind: str):
    if kind == "adamw":
        return so.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, warmup_steps=2,
                        max_grad_norm=1.0)
    return so.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, warmup_steps=2)


def _flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def _hook_vs_reference(rank, world, kind, compressor, density):
    """The same 6 steps (2 dense warm-up steps, then sparse) through DDP + the hook and through the reference."""
    out = {}
    for path in ("hook", "reference"):
        m = _model()
        opt = _optimizer(m, kind)
        if path == "hook":
            model = DDP(m, bucket_cap_mb=0.0005)
            opts = {"density": density} if compressor == "topk" else {}
            state = sparsedist.register(model, compressor, optimizer=opt, **opts)
            exchange = None
        else:
            model, exchange = m, so.ReferenceExchange(m, opt, density=density)
        for t in range(6):
            opt.zero_grad()
            x, y = _batch(rank, t)
            nn.functional.cross_entropy(model(x), y).backward()
            if exchange is not None:
                exchange()
            opt.step()
        out[path] = _flat(m)
        if path == "hook":
            out["stats"] = state.stats()
    return out


CASES = [(kind, compressor, density) for kind in ("adamw", "sgd") for compressor, density in (("topk", 0.1),
                                                                                              ("none", 1.0))]


def _all_cases(rank, world):
    return [_hook_vs_reference(rank, world, *case) for case in CASES]


def test_the_hook_sends_the_optimizers_update_as_the_reference_exchange_does():
    per_rank = run_distributed(_all_cases, 2, timeout=300)
    for i, (kind, compressor, _) in enumerate(CASES):
        results = [r[i] for r in per_rank]
        for r in results:
            assert torch.equal(r["hook"], r["reference"]), (kind, compressor)
            assert torch.equal(r["hook"], results[0]["hook"])  # identical on every rank
            assert r["stats"]["optimizer"]["warmup_steps"] == 2 and r["stats"]["optimizer"]["warmup_over"]
        if compressor == "topk":  # the sparse steps overlapped the backward pass; the warm-up's dense ones too
            stats = results[0]["stats"]
            assert stats["overlapped"] == stats["buckets"] > 0 and stats["collectives"]["allreduce"] > 0


def _refusals(rank, world):
    m = _model()
    opt = _optimizer(m, "adamw")
    msgs = []
    for name, opts in (("dgc", {"density": 0.01}), ("variance", {})):
        try:
            sparsedist.register(DDP(m), name, optimizer=opt, **opts)
        except ValueError as exc:
            msgs.append(str(exc))
    return msgs


def test_compressors_that_work_on_gradients_are_refused_with_an_exchange_aware_optimizer():
    for msgs in run_distributed(_refusals, 2, timeout=120):
        assert len(msgs) == 2 and all("sends its update" in m for m in msgs)


def _sampled(rank, world):
    """DGC's sampled threshold selection (topk mode="sampled") through the exchange-aware AdamW, fp16 values, on
    tensors large enough for sampling (>= 4000 elements), 60 steps of a learnable task."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 8))
    opt = so.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, warmup_steps=1, max_grad_norm=1.0)
    ddp = DDP(m)
    state = sparsedist.register(ddp, "topk", density=0.01, mode="sampled", value_dtype="float16", optimizer=opt)
    data, teacher = torch.Generator().manual_seed(rank), torch.randn(64, 8, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(60):
        x = torch.randn(32, 64, generator=data)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), (x @ teacher).argmax(1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return _flat(m), losses, state.stats()


def test_sampled_selection_through_the_exchange_aware_optimizer():
    results = run_distributed(_sampled, 2, timeout=180)
    for flat, losses, stats in results:
        assert torch.equal(flat, results[0][0])  # identical on every rank
        assert sum(losses[-10:]) / 10 < 0.7 * losses[0]
        assert stats["overlapped"] == stats["buckets"] == 60 and stats["optimizer"]["warmup_over"]
        assert stats["density"] < 0.05  # 1 % of each weight matrix, at least one entry of each small tensor
