"""VarianceCompressor against a direct, element-by-element implementation of Tsuzuku et al.'s update."""

from __future__ import annotations

import math

import pytest
import torch

from sparsedist.compressors.base import SelectContext
from sparsedist.compressors.variance import EXPONENT_LEVELS, VarianceCompressor, quantize_pow2
from sparsedist.payload import SparseGrad

torch.set_num_threads(1)


def nearest_pow2(a: float) -> int:
    """Exponent of the power of two nearest to a > 0 (ties go up), by plain float arithmetic."""
    lo = math.floor(math.log2(a))
    while 2.0 ** lo > a:          # guard log2 rounding
        lo -= 1
    while 2.0 ** (lo + 1) <= a:
        lo += 1
    return lo + 1 if a - 2.0 ** lo >= 2.0 ** (lo + 1) - a else lo


def paper_reference(grads, m2s, alpha, zeta, quantize, keep_error):
    """Algorithm of the paper, one element at a time; returns per step (sent dict, r list, v list)."""
    n = len(grads[0])
    r = [0.0] * n
    v = [0.0] * n
    history = []
    for g, m in zip(grads, m2s):
        for i in range(n):
            r[i] += float(g[i])
            v[i] += float(m[i])
        chosen = [i for i in range(n) if r[i] * r[i] > alpha * v[i]]
        sent = {}
        if quantize and chosen:
            exps = {i: nearest_pow2(abs(r[i])) for i in chosen}
            top = max(exps.values())
            for i in chosen:
                if exps[i] >= top - (EXPONENT_LEVELS - 1):
                    sent[i] = math.copysign(2.0 ** exps[i], r[i])
        else:
            sent = {i: r[i] for i in chosen}
        for i in range(n):
            if i in sent:
                r[i] = r[i] - sent[i] if keep_error else 0.0
                v[i] = 0.0
            else:
                v[i] *= zeta
        history.append((sent, list(r), list(v)))
    return history


def run_like_hook(comp, grads, m2s, key=3, dtype=torch.float64):
    """The hook's flow: accumulate -> compress -> residual = acc - sent -> after_send."""
    residual = None
    out = []
    for step, (g, m) in enumerate(zip(grads, m2s)):
        acc = comp.accumulate(g.to(dtype), residual, SelectContext(step=0, key=key))
        payload = comp.compress(acc, SelectContext(step=step, key=key, second_moment=m))
        residual = acc - payload.to_dense(acc.dtype)
        comp.after_send(key, payload)
        r = residual.clone()
        if comp.quantize and not comp.keep_quantization_error:
            r[payload.indices] = 0       # discard mode: the compressor zeroes these at the next accumulate()
        out.append((payload, r, comp.state_dict()["variance"][key].clone(), residual))
    return out


def assert_same_as_reference(out, ref, rtol=1e-6):
    for step, ((payload, residual, v, _), (sent, r, vr)) in enumerate(zip(out, ref)):
        got = dict(zip(payload.indices.tolist(), payload.values.tolist()))
        assert sorted(got) == sorted(sent), f"step {step}: sent {sorted(got)} vs reference {sorted(sent)}"
        for i, val in sent.items():
            assert got[i] == pytest.approx(val, rel=rtol), f"step {step}, element {i}"
        assert torch.allclose(residual, torch.tensor(r, dtype=residual.dtype), rtol=rtol, atol=1e-12)
        assert torch.allclose(v.double(), torch.tensor(vr, dtype=torch.float64), rtol=1e-5, atol=1e-12)


def random_stream(n=40, steps=25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
    grads, m2s = [], []
    for _ in range(steps):
        noise = torch.randn(n, generator=gen, dtype=torch.float64)
        grads.append(mean + noise * 0.5)
        m2s.append((mean.square() + 0.25) * torch.rand(n, generator=gen, dtype=torch.float64) * 2)
    return grads, m2s


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("keep_error", [True, False])
def test_matches_paper_reference_over_many_steps(quantize, keep_error):
    grads, m2s = random_stream()
    comp = VarianceCompressor(alpha=2.0, zeta=0.9, quantize=quantize, keep_quantization_error=keep_error)
    out = run_like_hook(comp, grads, m2s)
    ref = paper_reference(grads, m2s, 2.0, 0.9, quantize, keep_error)
    assert_same_as_reference(out, ref)
    # the stream exercises every branch: sends, delays, and elements delayed and then sent
    sent_steps = [set(s) for s, _, _ in ref]
    assert all(sent_steps[1:]) and not all(len(s) == 40 for s in sent_steps)
    delayed_then_sent = [i for i in range(40) if i not in sent_steps[0] and any(i in s for s in sent_steps[1:])]
    assert delayed_then_sent


def test_hand_worked_delay_decay_and_reset():
    # one element, g = 1 and m2 = 1 every step, alpha = 2
    g = [torch.tensor([1.0], dtype=torch.float64)] * 4
    m = [torch.tensor([1.0], dtype=torch.float64)] * 4
    # zeta = 0.9: step 0: r=1, v=1, 1 < 2 -> wait, v=0.9; step 1: r=2, v=1.9, 4 > 3.8 -> send 2, reset
    # step 2: r=1, v=1 -> wait (v=0.9); step 3: r=2, v=1.9 -> send
    out = run_like_hook(VarianceCompressor(alpha=2.0, zeta=0.9, quantize=False), g, m)
    assert [p.nnz for p, *_ in out] == [0, 1, 0, 1]
    assert out[1][0].values.item() == 2.0 and out[1][1].item() == 0.0 and out[1][2].item() == 0.0
    assert out[0][2].item() == pytest.approx(0.9)
    # zeta = 1 (no decay): step 1: 4 > 4 is false -> wait; step 2: r=3, v=3, 9 > 6 -> send 3
    out = run_like_hook(VarianceCompressor(alpha=2.0, zeta=1.0, quantize=False), g, m)
    assert [p.nnz for p, *_ in out] == [0, 0, 1, 0]
    assert out[2][0].values.item() == 3.0
    # zeta = 0 forgets the variance at once: step 1 has v = 1 only, 4 > 2 -> send
    out = run_like_hook(VarianceCompressor(alpha=2.0, zeta=0.0, quantize=False), g, m)
    assert [p.nnz for p, *_ in out] == [0, 1, 0, 1]


def test_quantized_error_feedback_keeps_remainder_in_r():
    # r = 3 is sent as 4 (nearest power of two); the residual keeps -1 and v resets
    comp = VarianceCompressor(alpha=1.0, zeta=0.5)
    acc = torch.tensor([3.0, 0.1])
    payload = comp.compress(acc, SelectContext(step=0, key=0, second_moment=torch.tensor([1.0, 1.0])))
    assert payload.indices.tolist() == [0] and payload.values.tolist() == [4.0]
    assert (acc - payload.to_dense()).tolist() == pytest.approx([-1.0, 0.1])
    comp.after_send(0, payload)
    assert comp.state_dict()["variance"][0].tolist() == [0.0, 0.5]
    # discard mode: next accumulate starts sent elements from r = 0
    comp = VarianceCompressor(alpha=1.0, zeta=0.5, keep_quantization_error=False)
    payload = comp.compress(acc, SelectContext(step=0, key=0, second_moment=torch.tensor([1.0, 1.0])))
    comp.after_send(0, payload)
    residual = acc - payload.to_dense()
    nxt = comp.accumulate(torch.tensor([0.25, 0.25]), residual, SelectContext(step=0, key=0))
    assert nxt.tolist() == pytest.approx([0.25, 0.35])


def test_elements_below_the_exponent_range_wait():
    # both pass the variance rule, but 1e-3 is 2^-10, more than 7 exponents below 1024: not sent this step,
    # kept whole in r, and its v decays like any unsent element
    comp = VarianceCompressor(alpha=1.0, zeta=0.5)
    acc = torch.tensor([1000.0, 1e-3, 0.0])
    payload = comp.compress(acc, SelectContext(step=0, key=0, second_moment=torch.tensor([1.0, 1e-8, 1.0])))
    assert payload.indices.tolist() == [0] and payload.values.tolist() == [1024.0]
    assert (acc - payload.to_dense()).tolist() == pytest.approx([-24.0, 1e-3, 0.0])
    comp.after_send(0, payload)
    assert comp.state_dict()["variance"][0].tolist() == pytest.approx([0.0, 0.5e-8, 0.5])


def test_quantize_pow2_values_and_range():
    x = torch.tensor([3.0, -3.0, 2.9, 1.5, -0.74, 0.75, 0.0, 5.0])
    q, keep = quantize_pow2(x)
    # nearest power of two in linear distance (ties up): 3 -> 4, 2.9 -> 2, 1.5 -> 2, 0.74 -> 0.5, 0.75 -> 1
    assert q.tolist() == [4.0, -4.0, 2.0, 2.0, -0.5, 1.0, 0.0, 4.0]
    assert keep.tolist() == [True] * 6 + [False, True]
    # 8 exponents below the largest (1024 = 2^10): 2^3 .. 2^10; smaller entries are not kept
    x = torch.tensor([1024.0, -1000.0, 8.0, 6.0, 5.9, 1e-3, 12.0])   # 6 ties up to 8, 5.9 -> 4
    q, keep = quantize_pow2(x)
    assert q.tolist() == [1024.0, -1024.0, 8.0, 8.0, 0.0, 0.0, 16.0]
    assert keep.tolist() == [True, True, True, True, False, False, True]
    kept = q[keep].abs()
    exps = torch.log2(kept)
    assert torch.equal(exps, exps.round()) and exps.max() - exps.min() <= EXPONENT_LEVELS - 1
    # dtypes: exact powers of two, no overflow to inf in fp16
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        qd, kd = quantize_pow2(torch.tensor([65504.0, -3.0, 0.3]).to(dtype))
        assert qd.dtype == dtype and torch.isfinite(qd).all()
        vals = qd[kd].double().abs()
        assert torch.equal(torch.log2(vals), torch.log2(vals).round())


def test_quantization_reduces_to_few_exponents_and_error_is_bounded():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=gen) * 0.01
    q, keep = quantize_pow2(x)
    rel = ((q[keep] - x[keep]).abs() / x[keep].abs())
    assert rel.max() <= 1 / 3 + 1e-6       # nearest power of two: at most 1/3 relative error
    assert torch.unique(q[keep].abs()).numel() <= EXPONENT_LEVELS


def test_fp16_and_bf16_accumulators():
    grads, m2s = random_stream(n=16, steps=6, seed=3)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        comp = VarianceCompressor(alpha=1.5, zeta=0.95)
        out = run_like_hook(comp, [g.to(dtype) for g in grads], [m.float() for m in m2s], dtype=dtype)
        for payload, residual, v, _ in out:
            assert payload.values.dtype == dtype and residual.dtype == dtype and v.dtype == torch.float32
            a = payload.values.double().abs()
            assert torch.equal(torch.log2(a), torch.log2(a).round())


def test_state_dict_round_trip_continues_identically():
    grads, m2s = random_stream(n=20, steps=12, seed=5)
    for keep in (True, False):
        full = run_like_hook(VarianceCompressor(zeta=0.8, keep_quantization_error=keep), grads, m2s)
        a = VarianceCompressor(zeta=0.8, keep_quantization_error=keep)
        first = run_like_hook(a, grads[:6], m2s[:6])
        state = a.state_dict()
        b = VarianceCompressor(zeta=0.8, keep_quantization_error=keep)
        b.load_state_dict(state)
        # continue from step 6 with the residual the hook holds (acc - sent; in discard mode the reset of the
        # sent elements is still pending inside the compressor state)
        residual = first[-1][3]
        for step in range(6, 12):
            acc = b.accumulate(grads[step], residual, SelectContext(step=0, key=3))
            payload = b.compress(acc, SelectContext(step=step, key=3, second_moment=m2s[step]))
            residual = acc - payload.to_dense(acc.dtype)
            b.after_send(3, payload)
            assert torch.equal(payload.indices, full[step][0].indices)
            assert torch.equal(payload.values, full[step][0].values)
            assert torch.equal(residual, full[step][3])
        assert torch.equal(b.state_dict()["variance"][3], full[-1][2])


def test_abandoned_step_leaves_state_unchanged():
    comp = VarianceCompressor(alpha=1.0, zeta=0.5, quantize=False)
    ctx = SelectContext(step=0, key=1, second_moment=torch.tensor([1.0, 4.0]))
    comp.after_send(1, comp.compress(torch.tensor([0.1, 0.1]), ctx))
    before = comp.state_dict()["variance"][1].clone()
    comp.compress(torch.tensor([float("inf"), 0.1]), SelectContext(step=1, key=1,
                                                                   second_moment=torch.tensor([float("inf"), 1.0])))
    comp.discard_pending(1)
    comp.after_send(1, SparseGrad.empty(2, torch.float32))   # no pending: nothing to commit
    assert torch.equal(comp.state_dict()["variance"][1], before)


def test_abandoned_step_keeps_pending_reset_in_discard_mode():
    comp = VarianceCompressor(alpha=1.0, zeta=0.5, keep_quantization_error=False)
    acc = comp.accumulate(torch.tensor([3.0, 0.1]), None, SelectContext(step=0, key=0))
    payload = comp.compress(acc, SelectContext(step=0, key=0, second_moment=torch.tensor([1.0, 1.0])))
    comp.after_send(0, payload)
    residual = acc - payload.to_dense()                      # [-1, 0.1]: the -1 must be discarded
    g = torch.tensor([0.5, 0.5])
    first = comp.accumulate(g, residual, SelectContext(step=0, key=0))
    comp.compress(first, SelectContext(step=1, key=0, second_moment=torch.ones(2)))
    comp.discard_pending(1)                                   # the exchange failed: retry from the same state
    again = comp.accumulate(g, residual, SelectContext(step=0, key=0))
    assert torch.equal(first, again) and again.tolist() == pytest.approx([0.5, 0.6])


def test_loss_scale_changes_do_not_change_the_rule():
    # GradScaler: gradients and residuals carry the current scale S, the second moment S^2; the hook keeps
    # residuals unscaled and passes S. Powers of two, as GradScaler uses, keep everything exact.
    grads, m2s = random_stream(n=30, steps=10, seed=7)
    scales = [1.0, 2.0 ** 10, 2.0 ** 10, 2.0 ** 9, 2.0 ** 11, 2.0 ** 11, 2.0 ** 8, 1.0, 2.0 ** 3, 2.0 ** 3]
    plain = run_like_hook(VarianceCompressor(zeta=0.9), grads, m2s)
    comp = VarianceCompressor(zeta=0.9)
    residual_unscaled = None
    for step, (g, m, s) in enumerate(zip(grads, m2s, scales)):
        residual = None if residual_unscaled is None else residual_unscaled * s
        acc = comp.accumulate(g * s, residual, SelectContext(step=0, key=0))
        payload = comp.compress(acc, SelectContext(step=step, key=0, second_moment=m * s * s,
                                                   extra={"loss_scale": s}))
        residual_unscaled = (acc - payload.to_dense(acc.dtype)) / s
        comp.after_send(0, payload)
        assert torch.equal(payload.indices, plain[step][0].indices), step
        assert torch.equal(payload.values / s, plain[step][0].values), step
    assert torch.equal(comp.state_dict()["variance"][0], plain[-1][2])
    with pytest.raises(ValueError, match="loss_scale"):
        comp.compress(torch.ones(30), SelectContext(step=0, key=0, second_moment=torch.ones(30),
                                                    extra={"loss_scale": 0.0}))


def test_whole_bucket_payload_split_per_tensor_is_refused():
    comp = VarianceCompressor(quantize=False)
    payload = comp.compress(torch.tensor([5.0, 0.0, 5.0, 0.0]),
                            SelectContext(step=0, key=0, second_moment=torch.ones(4)))
    with pytest.raises(ValueError, match="once per tensor"):
        comp.after_send(0, SparseGrad(payload.indices[:1], payload.values[:1], 2))


def test_zero_gradient_sends_nothing_and_keys_are_independent():
    comp = VarianceCompressor()
    z = comp.compress(torch.zeros(5), SelectContext(step=0, key=0, second_moment=torch.zeros(5)))
    assert z.nnz == 0
    comp.after_send(0, z)
    p = comp.compress(torch.tensor([1.0, 0.0]), SelectContext(step=0, key=1, second_moment=torch.tensor([0.1, 0.0])))
    assert p.indices.tolist() == [0]
    comp.after_send(1, p)
    assert comp.state_dict()["variance"][0].numel() == 5 and comp.state_dict()["variance"][1].numel() == 2


def test_bad_options_and_inputs():
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            VarianceCompressor(alpha=bad)
    for bad in (-0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="zeta"):
            VarianceCompressor(zeta=bad)
    with pytest.raises(TypeError, match="alpha"):
        VarianceCompressor(alpha="2")
    with pytest.raises(TypeError, match="zeta"):
        VarianceCompressor(zeta=True)
    comp = VarianceCompressor()
    with pytest.raises(ValueError, match="second_moment.*SecondMomentCollector"):
        comp.compress(torch.ones(3), SelectContext(step=0, key=0))
    with pytest.raises(ValueError, match="elements"):
        comp.compress(torch.ones(3), SelectContext(step=0, key=0, second_moment=torch.ones(4)))
    comp.after_send(0, comp.compress(torch.ones(3), SelectContext(step=0, key=0, second_moment=torch.ones(3))))
    with pytest.raises(ValueError, match="key 0"):
        comp.compress(torch.ones(5), SelectContext(step=1, key=0, second_moment=torch.ones(5)))
    with pytest.raises(ValueError, match="unknown entries"):
        comp.load_state_dict({"momentum": {}})


def test_attributes_and_options():
    comp = VarianceCompressor()
    assert comp.name == "variance" and comp.needs_second_moment and not comp.shared_indices
    assert comp.options() == {"alpha": 2.0, "zeta": 0.999, "quantize": True, "keep_quantization_error": True}
    assert "alpha=2.0" in repr(comp)
