"""sparsedist.optim.AdamW under FSDP2's sparse reduce-scatter (register_fsdp(..., optimizer=opt)), gloo processes.

Every rank also runs, in its own process, a plain single-process reference of the same rule for all P ranks:
P unsharded replicas, each with its own sparsedist.optim.AdamW and its own residuals, the dense warm-up as a mean
of the raw gradients, then ``to_wire`` -> :func:`sparsedist.optim.local_selection` (top-k with error feedback)
-> sum over ranks / P -> ``step()``. The FSDP2 run must give each rank's shard of the reference's parameters,
each rank's full-size moments and residuals, through the warm-up, the sparse phase and a skipped non-finite step;
a run resumed from a sharded checkpoint must be bit-identical to an uninterrupted one; with a GradScaler an
overflow on one rank skips the step on every rank; unsupported combinations raise.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_fsdp_exchange import loss_of, net

import sparsedist.checkpoint as ckpt
from sparsedist.compressors.base import count_for_density
from sparsedist.fsdp import register_fsdp, training_memory
from sparsedist.optim import SGD, AdamW, commit_residual, local_selection
from sparsedist.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
DENSITY, LR, STEPS, POISON = 0.3, 1e-2, 6, 4  # the step before POISON overflows on the last rank (skipped)


def adamw(model, warmup, world, clip=None):
    return AdamW(model.named_parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.1, warmup_steps=warmup,
                 world_size=world, max_grad_norm=clip)


def build(warmup, world, clip=None):
    m = net()
    opt = adamw(m, warmup, world, clip)
    return m, opt, register_fsdp(m, "topk", density=DENSITY, optimizer=opt)


def fsdp_step(m, opt, rank, world, step):
    """One training step on this rank's batch ``step``."""
    opt.zero_grad()
    loss_of(m, step, rank).backward()
    opt.step()


def reference(world, warmup, steps, clip=None):
    """The rule for all ``world`` ranks in this process: (models, optimizers, residuals) after ``steps`` steps."""
    models = [net(shard=False) for _ in range(world)]
    opts = [adamw(m, warmup, world, clip) for m in models]
    residuals = [{} for _ in range(world)]
    for step in steps:
        for r, (m, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            loss_of(m, step, r).backward()
        named = [dict(m.named_parameters()) for m in models]
        for name in named[0]:
            ps = [n[name] for n in named]
            if opts[0].exchange_is_dense():
                mean = sum(p.grad for p in ps) / world
                for p in ps:
                    p.grad = mean.clone()
                continue
            total = torch.zeros(ps[0].numel())
            sent = []
            for r, p in enumerate(ps):
                idx, values, acc = local_selection(opts[r].to_wire(p, p.grad), residuals[r].get(name),
                                                   count_for_density(p.numel(), DENSITY))
                total.index_add_(0, idx, values)
                sent.append((idx, values, acc))
            for r, (p, (idx, values, acc)) in enumerate(zip(ps, sent)):
                p.grad = (total / world).view_as(p)
                residuals[r][name] = commit_residual(acc, idx, values)
        for opt in opts:
            opt.step()
    return models, opts, residuals


def shard_of(full, like):
    """This rank's Shard(0) chunk of ``full``, the shape of the DTensor ``like``'s local tensor."""
    local = like.to_local()
    rows = -(-full.shape[0] // like.device_mesh.size()) if full.dim() else 1
    start = dist.get_rank() * rows
    return full.reshape(-1, *full.shape[1:])[start: start + local.shape[0]].reshape(local.shape)


def check_against_reference(rank, world, warmup, clip=None):
    """Shards, per-rank moments and residuals equal the reference's, through warm-up, sparse steps and a skip
    (with ``clip``: gradient clipping, of the averaged shards in the warm-up and of local gradients after)."""
    m, opt, state = build(warmup, world, clip)
    steps = [s for s in range(STEPS + 1) if s != POISON - 1]
    for step in range(STEPS + 1):
        if step == POISON - 1:  # the last rank overflows: every rank's shards NaN, nothing committed, step skipped
            before = {n: r.clone() for n, r in state.feedback.residuals.items()}
            moments = {n: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                       for n, p in m.named_parameters()}
            opt.zero_grad()
            loss_of(m, step, rank, poison=rank == world - 1).backward()
            assert all(torch.isnan(p.grad.to_local()).all() for p in m.parameters() if p.grad.to_local().numel())
            assert before.keys() == state.feedback.residuals.keys()
            assert all(torch.equal(before[n], state.feedback.residuals[n]) for n in before)
            assert len(opt.kept_gradients()) == len(moments)  # the optimizer heard of every parameter ...
            opt.zero_grad()  # ... and a skipped step forgets them; its state never moved
            assert not opt.kept_gradients()
            for n, p in m.named_parameters():
                assert all(torch.equal(v, opt.state[p][k]) for k, v in moments[n].items()), n
            continue
        fsdp_step(m, opt, rank, world, step)
    models, opts, residuals = reference(world, warmup, steps, clip)
    # at 2 ranks bit for bit; at 3 FSDP2's dense warm-up sums in gloo's ring order, and a clipping norm of shards
    # adds the squares in another order
    tol = {"rtol": 0, "atol": 0} if world == 2 and clip is None else {"rtol": 1e-5, "atol": 1e-7}
    for (n, p), q, mine_ref in zip(m.named_parameters(), models[0].parameters(), models[rank].parameters()):
        torch.testing.assert_close(p.to_local(), shard_of(q.detach(), p), **tol)
        for key in ("exp_avg", "exp_avg_sq"):
            mine = opt.state[p][key]
            assert not hasattr(mine, "full_tensor") and mine.shape == q.shape, (n, key)  # full size, local
            torch.testing.assert_close(mine, opts[rank].state[mine_ref][key], **tol)
        torch.testing.assert_close(state.feedback.residuals[n], residuals[rank][n], **tol)
    s = state.stats()
    sparse_steps = len(steps) - warmup
    expected = {"reduce_scatter": 3 * warmup, "sparse_reduce_scatter": 3 * (sparse_steps + 1)}
    assert s["collectives"] == {k: v for k, v in expected.items() if v}
    assert s["optimizer"]["dense_steps"] == warmup and s["optimizer"]["sparse_steps"] == sparse_steps
    assert s["overflow_steps"] == 1
    # the cost, stated: per-rank moments of the full parameters (2 x 4 bytes per parameter), on every rank
    n_total = sum(p.numel() for p in m.parameters())
    assert training_memory(m, opt, state)["optimizer"] == 8 * n_total


def check_resume(rank, world, directory):
    """A run resumed from a sharded checkpoint, saved in the warm-up or in the sparse phase, is bit-identical."""
    whole = build(2, world)
    for step in range(STEPS):
        fsdp_step(*whole[:2], rank, world, step)
    for stop in (1, 3):  # during the warm-up (sharded moments), after it (full-size per-rank moments)
        first = build(2, world)
        for step in range(stop):
            fsdp_step(*first[:2], rank, world, step)
        ckpt.save(f"{directory}/{stop}", model=first[0], optimizer=first[1], state=first[2])
        resumed = build(2, world)
        ckpt.load(f"{directory}/{stop}", model=resumed[0], optimizer=resumed[1], state=resumed[2])
        for step in range(stop, STEPS):
            fsdp_step(*resumed[:2], rank, world, step)
        for (n, p), q in zip(whole[0].named_parameters(), resumed[0].parameters()):
            assert torch.equal(p.to_local(), q.to_local()), n
            a, b = whole[1].state[p], resumed[1].state[q]
            assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq")), n
            assert a["exp_avg_weight"] == b["exp_avg_weight"]
        r1, r2 = whole[2].feedback.residuals, resumed[2].feedback.residuals
        assert r1.keys() == r2.keys() and r1 and all(torch.equal(r1[n], r2[n]) for n in r1)


def check_grad_scaler(rank, world):
    """With a GradScaler, an overflow on one rank makes every rank skip the step (the scale halves); the run equals
    an unscaled one without that step, bit for bit (the scales are powers of two)."""
    m = net()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = AdamW(m.named_parameters(), lr=LR, warmup_steps=1, grad_scaler=scaler)
    state = register_fsdp(m, "topk", density=DENSITY, optimizer=opt, grad_scaler=scaler)
    for step in range(5):
        opt.zero_grad()
        before = [p.to_local().clone() for p in m.parameters()]
        scaler.scale(loss_of(m, step, rank, poison=step == 2 and rank == world - 1)).backward()
        scaler.step(opt)
        scaler.update()
        skipped = all(torch.equal(a, p.to_local()) for a, p in zip(before, m.parameters()))
        assert skipped == (step == 2), step
    assert scaler.get_scale() == 512.0 and opt.stats()["steps"] == 4
    plain = net()
    plain_opt = AdamW(plain.named_parameters(), lr=LR, warmup_steps=1)
    plain_state = register_fsdp(plain, "topk", density=DENSITY, optimizer=plain_opt)
    for step in (0, 1, 3, 4):
        fsdp_step(plain, plain_opt, rank, world, step)
    assert all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(m.parameters(), plain.parameters()))
    r1, r2 = state.feedback.residuals, plain_state.feedback.residuals
    assert r1.keys() == r2.keys() and all(torch.equal(r1[n], r2[n]) for n in r1)


def check_errors(rank, world):
    m = net()
    opt = adamw(m, 1, world)
    with pytest.raises(ValueError, match="PackedAdamW"):
        register_fsdp(m, "topk", optimizer=opt, masks=_Masks())
    with pytest.raises(ValueError, match="must be sparsedist.optim.AdamW"):
        register_fsdp(m, "topk", optimizer=SGD(m.parameters(), lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="same GradScaler"):
        register_fsdp(m, "topk", optimizer=opt, grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="does not hold parameters"):
        register_fsdp(m, "topk", optimizer=AdamW(list(m.parameters())[:2], warmup_steps=0))
    with pytest.raises(ValueError, match="DGC"):
        register_fsdp(m, "dgc", optimizer=opt)
    with pytest.raises(ValueError, match="error_reset=True is not supported under FSDP2"):
        register_fsdp(m, "topk", optimizer=AdamW(m.parameters(), warmup_steps=0, error_reset=True))


class _Masks:
    """The least a mask provider must have for register_fsdp's option checks."""

    def mask_of(self, p):
        return None

    def needs_dense_gradient(self):
        return False


def checks(rank, world, directory):
    check_against_reference(rank, world, warmup=2)
    check_against_reference(rank, world, warmup=0)
    if world == 2:
        check_against_reference(rank, world, warmup=2, clip=0.05)
        check_resume(rank, world, directory)
        check_grad_scaler(rank, world)
        check_errors(rank, world)
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_exchange_aware_adamw(world, tmp_path):
    assert run_distributed(checks, world, args=(str(tmp_path),), timeout=240) == [True] * world


def test_benchmark_config_topk_adamx(tmp_path):
    """benchmarks/fsdp_char_gpt.py's topk_adamx: the example's training with the exchange-aware AdamW, 2 ranks:
    one dense warm-up step on FSDP2's reduce-scatter, then sparse ones; per-rank moments of the full model."""
    out = tmp_path / "runs.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fsdp_char_gpt.py"), "--configs", "topk_adamx",
                    "--steps", "6", "--extra", "--eval-every 3 --eval-batches 2 --width 32 --layers 2",
                    "--timeout", "240", "--json", str(out)], check=True, timeout=300, cwd=ROOT,
                   stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    (run,) = json.loads(out.read_text())["runs"]
    modules = 3  # two blocks and the root
    assert run["exchange"]["collectives"] == {"reduce_scatter": modules, "sparse_reduce_scatter": 5 * modules}
    assert math.isfinite(run["val_loss"]) and run["reduce_scatter_ratio"] > 1
    memory, n = run["memory_bytes"], run["parameters"]
    assert memory["optimizer"] == 8 * n  # this rank's moments of every parameter, unsharded
    assert memory["gradients"] >= 4 * n  # the kept local gradient, plus the gradient shards
