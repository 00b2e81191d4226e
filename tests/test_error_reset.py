"""Error reset (sparsedist.optim.error_reset): gradients at the local model ``consensus - residual``, the consensus
restored exactly at step(), consolidation to the mean local model; the DDP hook and ReferenceExchange agree bit for
bit at 2 and 3 ranks, and every rank holds the same parameters between steps."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
import sparsedist.optim as so
import sparsedist.optim.error_reset as error_reset
from sparsedist.optim.error_reset import LocalModels, _buckets
from sparsedist.testing import run_distributed
from test_optim_distributed import _batch, _model, _steps


def _optimizer(m: nn.Module, kind: str, **kw):
    if kind == "adamw":
        return so.AdamW(m.named_parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, warmup_steps=2,
                        max_grad_norm=1.0, error_reset=True, **kw)
    return so.SGD(m.named_parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, warmup_steps=2,
                  error_reset=True, **kw)


def _flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def _same_everywhere(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(gathered[0], x) for x in gathered)


# -- single process --------------------------------------------------------------------------------------------
def test_localize_and_restore_are_exact_and_once_per_step():
    p = nn.Parameter(torch.tensor([1.0, 1e8, -3.0, 0.1]))
    residuals = {"w": torch.tensor([0.3, 1.0, 0.0, 1e-9])}
    local = LocalModels([("w", p), ("absent", nn.Parameter(torch.ones(2)))], lambda: residuals, lambda: None)
    before = p.detach().clone()
    local.localize()
    assert local.localized and torch.equal(p.detach(), before - residuals["w"])
    local.localize()  # a second micro-batch: nothing more is subtracted
    assert torch.equal(p.detach(), before - residuals["w"])
    with pytest.raises(RuntimeError, match="call it after step"):
        local.consolidate()
    local.restore()  # 1e8 - 1.0 + 1.0 would not give 1e8 back in fp32 arithmetic; the copy does
    assert not local.localized and torch.equal(p.detach(), before)


def test_options_are_checked_and_an_unbound_optimizer_refuses_to_step():
    m = _model()
    with pytest.raises(ValueError, match="sync_every must be an int >= 1"):
        so.AdamW(m.parameters(), error_reset=True, sync_every=0)
    with pytest.raises(ValueError, match="drop sync_every or set error_reset=True"):
        so.SGD(m.parameters(), sync_every=5)
    opt = so.AdamW(m.parameters(), warmup_steps=0, error_reset=True, world_size=2)
    nn.functional.cross_entropy(m(_batch(0, 0)[0]), _batch(0, 0)[1]).backward()
    with pytest.raises(RuntimeError, match="no exchange bound its residuals"):
        opt.step()
    with pytest.raises(RuntimeError, match="has no exchange bound"):
        opt.consolidate()
    with pytest.raises(ValueError, match="checkpoint was trained with error_reset=True"):
        so.AdamW(m.parameters(), warmup_steps=0).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="needs error_feedback=True"):
        so.ReferenceExchange(m, opt, error_feedback=False)
    assert opt.stats()["error_reset"] is True and opt.stats()["consolidations"] == 0


# -- real processes --------------------------------------------------------------------------------------------
def _hook_vs_reference(rank, world, kind):
    """8 steps (2 dense, 6 sparse, a consolidation after every 3rd sparse step) through DDP + the hook and
    through ReferenceExchange; also checks that each training forward ran at consensus - residual."""
    out = {}
    for path in ("hook", "reference"):
        m = _model()
        opt = _optimizer(m, kind, sync_every=3)
        if path == "hook":
            model = DDP(m, bucket_cap_mb=0.0005)
            state = sparsedist.register(model, "topk", density=0.1, optimizer=opt)
            residuals = lambda: state.feedback.residuals  # noqa: E731
            exchange = None
        else:
            model, exchange = m, so.ReferenceExchange(m, opt, density=0.1)
            residuals = lambda: exchange.residuals  # noqa: E731
        seen, moved = [], []
        rest = {}

        def check(mod, args):  # runs after the optimizer's pre-hook: the parameters are the local model now
            if torch.is_grad_enabled() and not opt.exchange_is_dense():
                r = residuals()
                moved.append(any(float(v.abs().sum()) > 0 for v in r.values()))
                seen.append(all(torch.equal(p.detach(), rest[n] - r[n].view(p.shape)) if n in r else
                                torch.equal(p.detach(), rest[n]) for n, p in m.named_parameters()))

        m.register_forward_pre_hook(check)
        agree = []
        for t in range(8):
            rest = {n: p.detach().clone() for n, p in m.named_parameters()}
            _steps(model, opt, exchange or (lambda: None), rank, t, t + 1)
            agree.append(_same_everywhere(_flat(m)))
            with torch.no_grad():  # an evaluation between steps does not localise
                model(_batch(rank, t)[0])
        out[path] = {"params": _flat(m), "agree": all(agree), "seen": seen, "moved": moved, "stats": opt.stats(),
                     "pending": sum(float(r.abs().sum()) for r in residuals().values())}
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_the_hook_and_the_reference_agree_with_error_reset(world):
    kinds = ("adamw", "sgd") if world == 2 else ("adamw",)
    for kind in kinds:
        per_rank = run_distributed(_hook_vs_reference, world, args=(kind,), timeout=300)
        for r in per_rank:
            if world == 2:
                assert torch.equal(r["hook"]["params"], r["reference"]["params"]), kind
            else:  # three ranks' values are summed in another order by the hook's allgather (so without error
                # reset too): equal up to that rounding
                torch.testing.assert_close(r["hook"]["params"], r["reference"]["params"], rtol=1e-5, atol=1e-6)
            assert torch.equal(r["hook"]["params"], per_rank[0]["hook"]["params"])
            for path in ("hook", "reference"):
                assert r[path]["agree"], (kind, path)
                assert len(r[path]["seen"]) == 6 and all(r[path]["seen"]), (kind, path)
                assert r[path]["stats"]["consolidations"] == 2  # after sparse steps 3 and 6
                assert r[path]["pending"] == 0.0  # the last step consolidated: nothing pending
                assert sum(r[path]["moved"]) >= 4, (kind, path)  # the local models did differ from the consensus


def _pending(rank: int, world: int, steps: int):
    """A model trained ``steps`` steps through a ReferenceExchange with error reset, and what consolidation must
    give: ``(model, optimizer, exchange, {name: consensus - mean residual})``, the mean by per-parameter
    allreduces."""
    m = _model()
    opt = _optimizer(m, "adamw")
    exchange = so.ReferenceExchange(m, opt, density=0.05)
    for t in range(steps):
        opt.zero_grad()
        x, y = _batch(rank, t)
        nn.functional.cross_entropy(m(x), y).backward()
        exchange()
        opt.step()
    mean = {}
    for n, r in exchange.residuals.items():
        mean[n] = r.clone()
        dist.all_reduce(mean[n])
    expected = {n: p.detach() - (mean[n] / world).view(p.shape) if n in mean else p.detach().clone()
                for n, p in m.named_parameters()}
    return m, opt, exchange, expected


def _consolidate(rank, world):
    m, opt, exchange, expected = _pending(rank, world, 5)
    had_pending = sum(float(r.abs().sum()) for r in exchange.residuals.values()) > 0
    opt.consolidate()
    exact = all(torch.equal(p.detach(), expected[n]) for n, p in m.named_parameters())
    return {"had_pending": had_pending, "exact": exact, "empty": not exchange.residuals,
            "agree": _same_everywhere(_flat(m)), "count": opt.stats()["consolidations"]}


def test_consolidate_gives_every_rank_the_mean_local_model():
    for r in run_distributed(_consolidate, 2, timeout=120):
        assert r == {"had_pending": True, "exact": True, "empty": True, "agree": True, "count": 1}


def test_consolidation_buckets_cut_in_order_by_size_and_device():
    ps = [("a", torch.zeros(3)), ("b", torch.zeros(2)), ("big", torch.zeros(9)), ("c", torch.zeros(1)),
          ("meta", torch.zeros(1, device="meta")), ("d", torch.zeros(1))]
    groups = _buckets(ps, cap_bytes=4 * 5)  # five fp32 elements per call
    assert [[n for n, _ in g] for g in groups] == [["a", "b"], ["big"], ["c"], ["meta"], ["d"]]


def _consolidate_in_buckets(rank, world):
    """Several parameters per call, one larger than the cap alone: the mean local model, in as many calls."""
    error_reset.CONSOLIDATE_BUCKET_BYTES = 4 * 300
    m, opt, exchange, expected = _pending(rank, world, 4)
    backend = opt._local.backend()
    calls = []
    plain = backend.allreduce
    backend.allreduce = lambda t, *a, **kw: calls.append(t.numel()) or plain(t, *a, **kw)
    opt.consolidate()
    backend.allreduce = plain
    sizes = [p.numel() for p in m.parameters()]
    close = all(torch.allclose(p.detach(), expected[n], rtol=0, atol=1e-6) for n, p in m.named_parameters())
    exact = all(torch.equal(p.detach(), expected[n]) for n, p in m.named_parameters())
    return {"calls": calls, "sizes": sizes, "close": close, "exact": exact, "empty": not exchange.residuals,
            "agree": _same_everywhere(_flat(m))}


@pytest.mark.parametrize("world", [2, 3])
def test_consolidate_sums_the_residuals_in_buckets(world):
    for r in run_distributed(_consolidate_in_buckets, world, timeout=120):
        expected = [len(g) for g in _buckets([(str(i), torch.zeros(n)) for i, n in enumerate(r["sizes"])], 4 * 300)]
        assert len(r["calls"]) == len(expected) < len(r["sizes"])  # fewer calls than parameters
        assert sum(r["calls"]) == sum(r["sizes"])
        assert r["close"] and r["empty"] and r["agree"]
        if world == 2:
            assert r["exact"]  # a sum of two is the same in any order


def _refusals(rank, world):
    out = []
    for kw in ({"error_feedback": False}, {"granularity": "bucket"}):
        m = _model()
        try:
            sparsedist.register(DDP(m), "topk", density=0.1, optimizer=_optimizer(m, "adamw"), **kw)
        except ValueError as exc:
            out.append(str(exc))
    return out


def test_configurations_that_cannot_localise_are_refused():
    messages = run_distributed(_refusals, 2, timeout=120)[0]
    assert len(messages) == 2
    assert "error feedback is off" in messages[0] and "granularity='bucket'" in messages[1]


def _overflow(rank, world):
    """DDP hook, error reset, GradScaler; rank 1 overflows at step 4: every rank skips the step and still holds
    the consensus afterwards (restored at the end of backward, not in the step that did not run)."""
    m = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    opt = so.AdamW(m.parameters(), lr=3e-3, warmup_steps=1, grad_scaler=scaler, error_reset=True)
    ddp = DDP(m, bucket_cap_mb=0.0005)
    state = sparsedist.register(ddp, "topk", density=0.1, optimizer=opt, grad_scaler=scaler)
    agree, kept = [], None
    for t in range(7):
        opt.zero_grad()
        x, y = _batch(rank, t)
        if t == 4:
            kept = _flat(m)
            residuals = {n: r.clone() for n, r in state.feedback.residuals.items()}
        loss = nn.functional.cross_entropy(ddp(x), y)
        if t == 4 and rank == 1:
            loss = loss * float("inf")  # every gradient of this rank overflows
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        agree.append(_same_everywhere(_flat(m)))
        if t == 4:
            skipped = torch.equal(_flat(m), kept) and all(
                torch.equal(state.feedback.residuals[n], r) for n, r in residuals.items())
    return {"agree": all(agree), "skipped": skipped, "steps": opt.stats()["steps"], "scale": scaler.get_scale()}


def test_an_overflow_skips_the_step_and_leaves_the_consensus():
    for r in run_distributed(_overflow, 2, timeout=120):
        assert r == {"agree": True, "skipped": True, "steps": 6, "scale": 128.0}
