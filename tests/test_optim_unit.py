"""sparsedist.optim in one process: the dense phase against torch.optim, the sparse phase at density 1 against
torch.optim, the contract's guards, state_dict round trips, clipping and GradScaler semantics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import sparsedist.optim as so

torch.set_num_threads(1)
ALWAYS_DENSE = 10 ** 9


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))


def groups(m: nn.Module, lr: float, **decay) -> list[dict]:
    """Two groups as training scripts build them: matrices decayed, vectors not (and a different lr)."""
    return [{"params": [p for p in m.parameters() if p.dim() >= 2], **decay},
            {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0, "lr": lr * 0.5}]


def backward(m: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g)
    y = torch.randn(16, 3, generator=g)
    (m(x) - y).square().mean().backward()


def train(m, opt, steps, sched=None, wire=False, start=0):
    """``steps`` steps; ``wire``: at world size 1 the exchange at density 1 is p.grad <- to_wire(p, p.grad)."""
    for t in range(start, start + steps):
        opt.zero_grad()
        backward(m, t)
        if wire:
            for p in m.parameters():
                p.grad = opt.to_wire(p, p.grad)
        opt.step()
        if sched is not None:
            sched.step()


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def cosine(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 30)))


def test_adamw_dense_phase_is_torch_adamw_bit_for_bit():
    a, b = model(), model()
    ours = so.AdamW(groups(a, 1e-2, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.99), warmup_steps=ALWAYS_DENSE)
    ref = torch.optim.AdamW(groups(b, 1e-2, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.99), foreach=False)
    train(a, ours, 25, cosine(ours))
    train(b, ref, 25, cosine(ref))
    assert same(a, b)
    assert ours.stats() == {"warmup_steps": ALWAYS_DENSE, "warmup_over": False, "steps": 25, "dense_steps": 25,
                            "sparse_steps": 0, "lr_changed_after_backward": 0, "error_reset": False,
                            "sync_every": None, "consolidations": 0}


def test_adamw_sparse_phase_at_density_one_is_adamw():
    """World size 1, everything sent: the local update is the global one, so the trajectory is AdamW's."""
    a, b = model(), model()
    ours = so.AdamW(groups(a, 1e-2, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.99), warmup_steps=3, sparse_beta1=None)
    ref = torch.optim.AdamW(groups(b, 1e-2, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.99), foreach=False)
    train(a, ours, 25, cosine(ours), wire=True)
    train(b, ref, 25, cosine(ref))
    assert 0 < max_diff(a, b) < 1e-6  # different rounding (lr * u subtracted, not addcdiv), same steps
    assert ours.stats()["sparse_steps"] == 22 and ours.stats()["dense_steps"] == 3


@pytest.mark.parametrize("kw", [{"momentum": 0.0}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
                                {"momentum": 0.9, "dampening": 0.5, "weight_decay": 1e-2}])
def test_sgd_matches_torch_sgd_in_both_phases(kw):
    a, b, c = model(), model(), model()
    dense = so.SGD(a.parameters(), lr=0.05, warmup_steps=ALWAYS_DENSE, **kw)
    sparse = so.SGD(b.parameters(), lr=0.05, warmup_steps=2, **kw)
    ref = torch.optim.SGD(c.parameters(), lr=0.05, foreach=False, **kw)
    train(a, dense, 15)
    train(b, sparse, 15, wire=True)
    train(c, ref, 15)
    assert same(a, c)
    assert max_diff(b, c) < 1e-6


def test_warmup_switch_and_to_wire_in_each_phase():
    m = model()
    opt = so.AdamW(m.parameters(), lr=1e-2, warmup_steps=2)
    p = next(m.parameters())
    for t in range(4):
        assert opt.exchange_is_dense() == (t < 2)
        assert opt.stats()["warmup_over"] == (t >= 2)
        opt.zero_grad()
        backward(m, t)
        w = opt.to_wire(p, p.grad)
        assert (w is p.grad) == (t < 2)  # dense: the raw gradient itself; sparse: a new tensor
        if t >= 2:
            assert torch.equal(w, opt.to_wire(p, p.grad))  # no state change: the same answer twice
            for q in m.parameters():
                q.grad = opt.to_wire(q, q.grad)
        opt.step()
    assert opt.stats()["dense_steps"] == 2 and opt.stats()["sparse_steps"] == 2


def test_adamw_wire_is_lr_times_the_bias_corrected_adam_direction():
    m = model()
    opt = so.AdamW(m.parameters(), lr=0.02, betas=(0.8, 0.95), eps=1e-6, warmup_steps=0, sparse_beta1=0.3)
    backward(m, 0)
    p = next(m.parameters())
    g = p.grad.clone()
    expect = 0.02 * (0.2 * g / 0.2) / ((0.05 * g * g / 0.05).sqrt() + 1e-6)  # step 1: m = 0.2 g, v = 0.05 g^2
    torch.testing.assert_close(opt.to_wire(p, p.grad), expect)


def test_noise_correction_estimates_the_mean_gradients_second_moment():
    """P ranks: v_hat / P + (1 - 1/P) m_hat^2 in place of v_hat; P = 1 (or the option off) leaves Adam alone."""
    m = model()
    p = next(m.parameters())
    kw = {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "warmup_steps": 0, "sparse_beta1": None}
    four, one = so.AdamW(m.parameters(), world_size=4, **kw), so.AdamW(m.parameters(), world_size=1, **kw)
    off = so.AdamW(m.parameters(), world_size=4, noise_correction=False, **kw)
    for t in range(3):  # several steps, so that m_hat^2 and v_hat differ
        m.zero_grad()
        backward(m, t)
        grads = {q: q.grad.clone() for q in m.parameters()}
        seen = []
        for o, corrected in ((four, True), (one, False), (off, False)):
            state = o.state[p]
            step = state["step"].item() + 1 if state else 1
            m_hat = (state["exp_avg"] * 0.8 if state else 0) + 0.2 * grads[p]
            v_hat = (state["exp_avg_sq"] * 0.95 if state else 0) + 0.05 * grads[p] ** 2
            m_hat, v_hat = m_hat / (1 - 0.8 ** step), v_hat / (1 - 0.95 ** step)
            v = v_hat / 4 + 0.75 * m_hat ** 2 if corrected else v_hat
            wires = {q: o.to_wire(q, g) for q, g in grads.items()}
            torch.testing.assert_close(wires[p], 0.02 * m_hat / (v.sqrt() + 1e-6))
            seen.append(wires[p])
            for q, w in wires.items():
                q.grad = w
            o.step()
        if t:  # (at the first step m_hat^2 = v_hat = g^2: nothing to correct)
            assert (seen[0] - seen[1]).abs().max() > 1e-3 * seen[1].abs().max()
    assert four.world_size == 4 and so.AdamW(m.parameters()).world_size == 1  # no process group here


def test_sparse_beta1_takes_over_after_the_warmup_with_exact_bias_correction():
    m = model()
    p = next(m.parameters())
    opt = so.AdamW(m.parameters(), lr=0.01, betas=(0.9, 0.99), warmup_steps=2, sparse_beta1=0.5, world_size=1)
    mom, weight = torch.zeros_like(p), 0.0
    for t in range(5):
        m.zero_grad()
        backward(m, t)
        beta1 = 0.9 if t < 2 else 0.5
        g = p.grad.clone()
        mom, weight = beta1 * mom + (1 - beta1) * g, beta1 * weight + (1 - beta1)  # sum of the EMA's weights
        if t >= 2:
            v_hat = opt.state[p]["exp_avg_sq"] * 0.99 + 0.01 * g * g
            v_hat = v_hat / (1 - 0.99 ** (t + 1))
            wires = {q: opt.to_wire(q, q.grad) for q in m.parameters()}
            torch.testing.assert_close(wires[p], 0.01 * (mom / weight) / (v_hat.sqrt() + 1e-8))
            for q, w in wires.items():
                q.grad = w
        opt.step()
        torch.testing.assert_close(opt.state[p]["exp_avg"], mom)
    assert opt.state[p]["exp_avg_weight"] == pytest.approx(weight)


def test_sparse_step_without_exchange_raises_and_foreign_param_is_rejected():
    m = model()
    opt = so.AdamW(m.named_parameters(), lr=1e-2, warmup_steps=0)
    backward(m, 0)
    with pytest.raises(RuntimeError, match="no exchange produced it"):
        opt.step()
    with pytest.raises(KeyError, match="not a parameter"):
        opt.to_wire(torch.zeros(3, requires_grad=True), torch.zeros(3))
    p = next(m.parameters())
    with pytest.raises(ValueError, match="shape"):
        opt.to_wire(p, torch.zeros(2))
    for bad in ({"warmup_steps": -1}, {"warmup_steps": 1.5}, {"max_grad_norm": 0}, {"grad_scaler": object()}):
        with pytest.raises((ValueError, TypeError)):
            so.AdamW(m.parameters(), **bad)


def test_lr_set_between_backward_and_step_is_counted():
    m = model()
    opt = so.AdamW(m.parameters(), lr=1e-2, warmup_steps=0)
    backward(m, 0)
    for p in m.parameters():
        p.grad = opt.to_wire(p, p.grad)
    opt.param_groups[0]["lr"] = 5e-3
    opt.step()
    assert opt.stats()["lr_changed_after_backward"] == 1


def test_state_dict_round_trip_across_the_warmup_switch_is_bit_identical():
    straight, resumed = model(), model()
    o1 = so.AdamW(groups(straight, 1e-2, weight_decay=0.1), lr=1e-2, warmup_steps=4, max_grad_norm=0.5)
    train(straight, o1, 12, wire=True)

    o2 = so.AdamW(groups(resumed, 1e-2, weight_decay=0.1), lr=1e-2, warmup_steps=4, max_grad_norm=0.5)
    train(resumed, o2, 3, wire=True)  # save inside the warm-up ...
    saved, weights = copy.deepcopy(o2.state_dict()), copy.deepcopy(resumed.state_dict())
    fresh = model(seed=5)
    fresh.load_state_dict(weights)
    o3 = so.AdamW(groups(fresh, 1e-2, weight_decay=0.1), lr=1e-2, warmup_steps=99, max_grad_norm=0.5)
    o3.load_state_dict(saved)  # ... the saved warm-up length wins
    assert o3.warmup_steps == 4 and o3.stats()["steps"] == 3
    train(fresh, o3, 5, wire=True, start=3)  # ... and again in the sparse phase
    saved = copy.deepcopy(o3.state_dict())
    o4 = so.AdamW(groups(fresh, 1e-2, weight_decay=0.1), lr=1e-2, max_grad_norm=0.5)
    o4.load_state_dict(saved)
    train(fresh, o4, 4, wire=True, start=8)
    assert same(straight, fresh)
    with pytest.raises(ValueError, match="not written by a sparsedist.optim"):
        o4.load_state_dict(torch.optim.AdamW(fresh.parameters()).state_dict())


def test_clipping_dense_phase_is_clip_grad_norm_then_adamw():
    a, b = model(), model()
    ours = so.AdamW(a.parameters(), lr=1e-2, warmup_steps=ALWAYS_DENSE, max_grad_norm=0.05)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False)
    train(a, ours, 5)
    for t in range(5):
        ref.zero_grad()
        backward(b, t)
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
        ref.step()
    assert same(a, b)


def test_clipping_sparse_phase_bounds_each_local_tensor():
    m = model()
    n = sum(p.numel() for p in m.parameters())
    clipped = so.SGD(m.parameters(), lr=1.0, warmup_steps=0, max_grad_norm=1e-3)
    free = so.SGD(m.parameters(), lr=1.0, warmup_steps=0)
    backward(m, 0)
    wires = [clipped.to_wire(p, p.grad) for p in m.parameters()]
    for p, w in zip(m.parameters(), wires):  # plain SGD: the wire is lr * the clipped gradient
        limit = 1e-3 * math.sqrt(p.numel() / n)
        assert float(w.norm()) <= limit * (1 + 1e-5)
        torch.testing.assert_close(w, free.to_wire(p, p.grad) * min(1.0, limit / (float(p.grad.norm()) + 1e-6)))
    assert math.sqrt(sum(float(w.norm()) ** 2 for w in wires)) <= 1e-3 * (1 + 1e-5)


def test_grad_scaler_unscales_the_update_and_skips_overflow_without_touching_state():
    a, b = model(), model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    ours = so.AdamW(a.parameters(), lr=1e-2, warmup_steps=1, grad_scaler=scaler)
    ref = so.AdamW(b.parameters(), lr=1e-2, warmup_steps=1)
    for t in range(6):
        for m, o, s in ((a, ours, scaler), (b, ref, None)):
            o.zero_grad()
            backward(m, t) if s is None else _scaled_backward(m, t, s)
            for p in m.parameters():
                p.grad = o.to_wire(p, p.grad)
            o.step() if s is None else (s.step(o), s.update())
    assert scaler.get_scale() > 2.0 ** 10  # it grew, so the wire was rescaled at several scales
    assert max_diff(a, b) < 1e-6
    state = copy.deepcopy(ours.state_dict())
    weights = [p.clone() for p in a.parameters()]
    ours.zero_grad()
    _scaled_backward(a, 6, scaler)
    next(a.parameters()).grad[0, 0] = float("inf")  # this rank overflowed
    for p in a.parameters():
        p.grad = ours.to_wire(p, p.grad)
    scaler.step(ours)
    scaler.update()
    assert all(torch.equal(p, w) for p, w in zip(a.parameters(), weights))
    after = ours.state_dict()
    assert after["exchange"] == state["exchange"]
    for i, saved in state["state"].items():
        for k, value in saved.items():
            now = after["state"][i][k]
            assert torch.equal(now, value) if torch.is_tensor(value) else now == value, (i, k)


def _scaled_backward(m, step, scaler):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g)
    y = torch.randn(16, 3, generator=g)
    scaler.scale((m(x) - y).square().mean()).backward()


def test_local_selection_conserves_and_flags_non_finite():
    torch.manual_seed(0)
    wire, res = torch.randn(4, 25), torch.randn(100)
    idx, values, acc = so.local_selection(wire, res, 7, torch.float16)
    assert idx.numel() == 7 and values.dtype == torch.float16
    kept = so.commit_residual(acc, idx, values)
    sent = torch.zeros(100).index_put_((idx,), values.float())
    torch.testing.assert_close(sent + kept, wire.reshape(-1) + res, rtol=0, atol=0)
    assert set(idx.tolist()) == set(torch.topk(acc.abs(), 7).indices.tolist())
    wire[1, 3] = float("inf")
    _, values, _ = so.local_selection(wire, res, 7)
    assert torch.isnan(values).all()
