"""sparsedist.optim with the reference exchange on real processes over gloo (2 and 3 ranks): identical parameters
on every rank, conservation of the compressed quantity, overflow handling, bit-identical resume."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import sparsedist.checkpoint
import sparsedist.optim as so
from sparsedist.testing import run_distributed


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 8), nn.Flatten(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 11))


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
    return torch.randint(0, 11, (12, 4), generator=g), torch.randint(0, 11, (12,), generator=g)


def _optimizer(m: nn.Module, kind: str, warmup: int, error_reset: bool = False):
    if kind == "adamw":
        decay = [p for p in m.parameters() if p.dim() >= 2]
        rest = [p for p in m.parameters() if p.dim() < 2]
        return so.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.99),
                        weight_decay=0.1, warmup_steps=warmup, max_grad_norm=1.0, error_reset=error_reset)
    return so.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, warmup_steps=warmup,
                  error_reset=error_reset)


def _steps(m, opt, exchange, rank, start, stop, record=None):
    for t in range(start, stop):
        opt.zero_grad()
        x, y = _batch(rank, t)
        nn.functional.cross_entropy(m(x), y).backward()
        exchange()
        if record is not None:
            record(t)
        opt.step()


def _train(rank, world, kind, density, value_dtype, error_reset=False):
    """Returns the final parameters, and checks on every step that they agree across ranks and that the
    averaged updates plus the residuals account for every rank's wire."""
    m = _model()
    opt = _optimizer(m, kind, warmup=2, error_reset=error_reset)
    exchange = so.ReferenceExchange(m, opt, density=density, value_dtype=value_dtype)
    names = [n for n, _ in m.named_parameters()]
    wires = {n: torch.zeros(p.numel()) for n, p in m.named_parameters()}
    applied = {n: torch.zeros(p.numel()) for n, p in m.named_parameters()}
    to_wire = opt.to_wire

    def spy(p, grad):  # what this rank put on the wire, summed over the sparse steps
        w = to_wire(p, grad)
        wires[names[[q is p for q in m.parameters()].index(True)]] += w.reshape(-1)
        return w

    opt.to_wire = spy

    def record(t):
        if not opt.exchange_is_dense():
            for n, p in m.named_parameters():
                applied[n] += p.grad.reshape(-1)

    for t in range(8):
        _steps(m, opt, exchange, rank, t, t + 1, record)
        flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], x) for x in gathered), f"parameters differ across ranks at step {t}"
    # sum_t mean_r sent_{r,t} = mean_r (sum_t wire_{r,t} - residual_r): nothing lost, nothing invented (up to
    # the rounding of the sum itself, in the value dtype: half precision sums are rounded to it)
    tol = {"rtol": 1e-5, "atol": 1e-6} if value_dtype is None else {"rtol": 2e-3, "atol": 2e-5}
    pending = {n: wires[n] - exchange.residuals[n] for n in names}
    for n in names:
        dist.all_reduce(pending[n])
        torch.testing.assert_close(applied[n], pending[n] / world, **tol)
    s = exchange.stats()
    return {"params": torch.cat([p.detach().reshape(-1) for p in m.parameters()]), "stats": s,
            "residual_norm": s["residual_norm"]}


@pytest.mark.parametrize("world,kind,density,value_dtype,error_reset", [
    (2, "adamw", 0.05, None, False), (3, "adamw", 0.02, "float16", False), (2, "sgd", 0.05, "bfloat16", False),
    (3, "adamw", 0.05, "float16", True), (2, "sgd", 0.05, None, True)])
def test_ranks_agree_and_the_wire_is_conserved(world, kind, density, value_dtype, error_reset):
    out = run_distributed(_train, world, args=(kind, density, value_dtype, error_reset), timeout=120)
    s = out[0]["stats"]
    assert s["steps"] == 8 and s["dense_steps"] == 2 and s["overflow_steps"] == 0
    assert s["optimizer"]["warmup_over"] and s["optimizer"]["sparse_steps"] == 6
    assert s["compression_ratio"] > 2  # two dense steps of eight, the rest sparse
    assert all(r["residual_norm"] > 0 for r in out)  # something was held back ...
    assert out[0]["residual_norm"] != out[1]["residual_norm"]  # ... and it differs per rank


def _overflow(rank, world):
    """Rank 1 overflows on step 4: every rank skips the step (GradScaler), nothing changes but the scale."""
    m = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    opt = so.AdamW(m.parameters(), lr=3e-3, warmup_steps=2, grad_scaler=scaler)
    exchange = so.ReferenceExchange(m, opt, density=0.1)
    for t in range(6):
        opt.zero_grad()
        x, y = _batch(rank, t)
        scaler.scale(nn.functional.cross_entropy(m(x), y)).backward()
        if t == 4:
            before = ([p.clone() for p in m.parameters()], {n: r.clone() for n, r in exchange.residuals.items()},
                      [s["exp_avg"].clone() for s in opt.state.values()], opt.stats()["steps"])
            if rank == 1:
                m[2].weight.grad[0, 0] = float("inf")
        exchange()
        scaler.step(opt)
        scaler.update()
        if t == 4:
            assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before[0]))
            assert all(torch.equal(exchange.residuals[n], r) for n, r in before[1].items())
            assert all(torch.equal(s["exp_avg"], e) for s, e in zip(opt.state.values(), before[2]))
            assert opt.stats()["steps"] == before[3]
    return {"params": torch.cat([p.detach().reshape(-1) for p in m.parameters()]), "scale": scaler.get_scale(),
            "overflow_steps": exchange.stats()["overflow_steps"]}


def test_overflow_on_one_rank_skips_the_step_everywhere():
    out = run_distributed(_overflow, 2, timeout=120)
    assert [o["overflow_steps"] for o in out] == [1, 1]
    assert out[0]["scale"] == out[1]["scale"] == 128.0
    assert torch.equal(out[0]["params"], out[1]["params"])


def _resume(rank, world, directory, error_reset):
    """10 steps straight, against 5 steps, a checkpoint, fresh objects, load, 5 more steps."""
    results = []
    for split in (None, 5):
        m = _model()
        opt = _optimizer(m, "adamw", warmup=3, error_reset=error_reset)
        exchange = so.ReferenceExchange(m, opt, density=0.05)
        if split is None:
            _steps(m, opt, exchange, rank, 0, 10)
        else:
            _steps(m, opt, exchange, rank, 0, split)
            sparsedist.checkpoint.save(f"{directory}/step5", model=m, optimizer=opt, state=exchange)
            m = _model()
            for p in m.parameters():
                p.data.add_(1.0)  # spoil it: the checkpoint must restore everything
            opt = _optimizer(m, "adamw", warmup=0, error_reset=error_reset)
            exchange = so.ReferenceExchange(m, opt, density=0.05)
            sparsedist.checkpoint.load(f"{directory}/step5", model=m, optimizer=opt, state=exchange)
            assert opt.warmup_steps == 3 and opt.stats()["steps"] == split
            _steps(m, opt, exchange, rank, split, 10)
        results.append((torch.cat([p.detach().reshape(-1) for p in m.parameters()]), exchange.stats()["bytes_sent"],
                        {n: r.clone() for n, r in exchange.residuals.items()}))
    (a, sent_a, res_a), (b, sent_b, res_b) = results
    return torch.equal(a, b) and sent_a == sent_b and all(torch.equal(res_a[n], res_b[n]) for n in res_a)


@pytest.mark.parametrize("error_reset", [False, True])
def test_resume_from_a_checkpoint_is_bit_identical(error_reset):
    """With error reset the checkpoint holds the consensus and each rank's residual: the local models follow."""
    with tempfile.TemporaryDirectory() as d:
        assert run_distributed(_resume, 2, args=(d, error_reset), timeout=120) == [True, True]


def _save_two(rank, world, directory):
    m = _model()
    opt = _optimizer(m, "adamw", warmup=1)
    exchange = so.ReferenceExchange(m, opt, density=0.05)
    _steps(m, opt, exchange, rank, 0, 4)
    sparsedist.checkpoint.save(directory, model=m, optimizer=opt, state=exchange)
    pending = {n: r.clone() for n, r in exchange.residuals.items()}
    for n in pending:
        dist.all_reduce(pending[n])
    return {n: r / world for n, r in pending.items()}


def _load_three(rank, world, directory):
    m = _model()
    opt = _optimizer(m, "adamw", warmup=1)
    exchange = so.ReferenceExchange(m, opt, density=0.05)
    with pytest.warns(UserWarning, match="written at 2 ranks and is loaded at 3"):
        sparsedist.checkpoint.load(directory, model=m, optimizer=opt, state=exchange)
    loaded = {n: r.clone() for n, r in exchange.residuals.items()}
    _steps(m, opt, exchange, rank, 4, 6)
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return loaded, all(torch.equal(gathered[0], x) for x in gathered)


def test_resume_on_a_different_world_size_keeps_the_pending_update():
    """2 ranks save, 3 ranks load (residuals re-sharded to their mean, so the mean pending update is kept)."""
    with tempfile.TemporaryDirectory() as d:
        pending = run_distributed(_save_two, 2, args=(f"{d}/ckpt",), timeout=120)[0]
        out = run_distributed(_load_three, 3, args=(f"{d}/ckpt",), timeout=120)
    for loaded, agree in out:
        assert agree
        for n, r in pending.items():
            torch.testing.assert_close(loaded[n], r)
