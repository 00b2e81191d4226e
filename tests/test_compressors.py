"""Selection rules against direct references (no communication)."""


import pytest
import torch

from sparsedist.compressors import (COMPRESSORS, DGCCompressor, RandKCompressor, ThresholdCompressor,
                                    TopKCompressor, WangniCompressor, build_compressor)
from sparsedist.compressors.base import SelectContext, count_for_density
from sparsedist.compressors.dgc import check_optimizer
from sparsedist.compressors.randk import shared_random_indices, wangni_probabilities
from sparsedist.compressors.topk import sampled_topk_indices


def ctx(step=0, key=0, rank=0, world_size=1):
    return SelectContext(step=step, key=f"p{key}", index=key, rank=rank, world_size=world_size)


def test_count_for_density_is_ceil_and_at_least_one():
    assert count_for_density(1000, 0.01) == 10
    assert count_for_density(1001, 0.01) == 11
    assert count_for_density(5, 0.01) == 1
    assert count_for_density(0, 0.5) == 0
    assert count_for_density(7, 1.0) == 7


def test_topk_exact_selects_largest_magnitudes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=g)
    p = TopKCompressor(density=0.02).compress(x, ctx())
    assert p.nnz == 20
    expected = set(torch.argsort(x.abs(), descending=True)[:20].tolist())
    assert set(p.indices.tolist()) == expected
    torch.testing.assert_close(p.values, x[p.indices])


def test_topk_sampled_is_within_half_and_k_and_keeps_the_largest():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200_000, generator=g)
    k = 2000
    idx = sampled_topk_indices(x, k, sample_ratio=0.01, generator=torch.Generator().manual_seed(0))
    assert k // 2 <= idx.numel() <= k
    assert idx.unique().numel() == idx.numel()
    # every selected entry is at least as large as every entry left out among the true top-(k/2)
    chosen = x.abs()[idx]
    true_top = torch.topk(x.abs(), k // 2).values
    assert chosen.min() >= true_top.min() * 0.9


def test_threshold_strom_sends_plus_minus_tau():
    x = torch.tensor([0.5, -0.05, -2.0, 0.09, 0.11, 0.0])
    p = ThresholdCompressor(threshold=0.1).compress(x, ctx())
    assert p.indices.tolist() == [0, 2, 4]
    assert p.values.tolist() == pytest.approx([0.1, -0.1, 0.1])
    assert p.constant == pytest.approx(0.1)
    exact = ThresholdCompressor(threshold=0.1, quantize=False).compress(x, ctx())
    torch.testing.assert_close(exact.values, x[[0, 2, 4]])
    assert exact.constant is None


def test_threshold_can_select_nothing():
    p = ThresholdCompressor(threshold=10.0).compress(torch.randn(100), ctx())
    assert p.nnz == 0


def test_randk_uniform_indices_shared_and_step_keyed():
    a = shared_random_indices(10_000, 100, seed=3, step=5, key=2)
    b = shared_random_indices(10_000, 100, seed=3, step=5, key=2)
    c = shared_random_indices(10_000, 100, seed=3, step=6, key=2)
    d = shared_random_indices(10_000, 100, seed=3, step=5, key=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert a.unique().numel() == 100
    x = torch.randn(10_000)
    p = RandKCompressor(0.01).compress(x, ctx(step=5, key=2))
    assert p.shared_indices and p.nnz == 100
    torch.testing.assert_close(p.values, x[p.indices])  # no rescaling (Stich et al. 2018)


def test_wangni_probabilities_sum_to_k_and_are_capped():
    mag = torch.tensor([100.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    p = wangni_probabilities(mag, 3)
    assert p[0] == 1.0 and p[-1] == 0.0
    assert float(p.sum()) == pytest.approx(3.0)
    torch.testing.assert_close(p[1:5], torch.full((4,), 0.5))
    assert float(wangni_probabilities(torch.zeros(4), 2).sum()) == 0.0


def test_wangni_runs_without_error_feedback_and_refuses_it():
    from sparsedist.options import ExchangeOptions

    wangni, topk = build_compressor("randk", density=0.1, variant="wangni"), build_compressor("topk", density=0.1)
    assert not ExchangeOptions().feedback_for(wangni) and ExchangeOptions().feedback_for(topk)
    assert not ExchangeOptions(error_feedback=False).feedback_for(topk)
    with pytest.raises(ValueError, match="rescales what it keeps by 1/p.*leave error_feedback unset"):
        ExchangeOptions(error_feedback=True).check_compressor(wangni)
    ExchangeOptions(error_feedback=False).check_compressor(wangni)
    with pytest.raises(TypeError, match="True, False or None"):
        ExchangeOptions(error_feedback=1)
    # a checkpoint of such a run (error feedback on, as the default was) is refused, not silently resumed
    import sparsedist
    model = torch.nn.Linear(4, 3)
    state = sparsedist.SparsifyState(list(model.named_parameters()), "randk", density=0.5, variant="wangni")
    saved = state.state_dict()
    saved["feedback"] = {"enabled": True, "residuals": {"weight": torch.ones(12)}}
    with pytest.raises(ValueError, match="drop them to resume"):
        state.load_state_dict(saved)
    saved["feedback"] = {"enabled": False, "residuals": {}}
    state.load_state_dict(saved)
    assert not state.feedback.enabled
    # why: an entry kept with probability p leaves acc (1 - 1/p) behind, here 19x what it was given
    acc = torch.full((100,), 0.01)
    sent = WangniCompressor(density=0.05).compress(acc, SelectContext(step=0, key="w", world_size=1, rank=0))
    left = acc.clone()
    left[sent.indices] -= sent.values
    assert sent.nnz > 0 and float(left.norm()) > 1.5 * float(acc.norm())


def test_wangni_is_unbiased():
    torch.manual_seed(0)
    x = torch.randn(50)
    comp = WangniCompressor(density=0.2)
    total = torch.zeros(50)
    trials = 4000
    for t in range(trials):
        total += comp.compress(x, ctx(step=t)).to_dense()
    torch.testing.assert_close(total / trials, x, atol=0.15, rtol=0.0)


def _dgc_reference(grads, density, m):
    """Literal DGC (Lin et al. 2018, Alg. 1 + momentum factor masking) with exact top-k."""
    u = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    sent = []
    for g in grads:
        u = m * u + g
        v = v + u
        k = count_for_density(g.numel(), density)
        idx = torch.topk(v.abs(), k).indices
        out = torch.zeros_like(v)
        out[idx] = v[idx]
        sent.append(out)
        v[idx] = 0
        u[idx] = 0
    return sent, v


def test_dgc_matches_reference_momentum_correction_and_masking():
    torch.manual_seed(0)
    grads = [torch.randn(500) for _ in range(6)]
    ref_sent, ref_v = _dgc_reference(grads, 0.02, 0.9)
    comp = DGCCompressor(density=0.02, momentum=0.9, sample_ratio=1.0)
    residual = torch.zeros(500)
    for t, g in enumerate(grads):
        acc = comp.accumulate(g, residual, ctx(step=t))
        p = comp.compress(acc, ctx(step=t))
        residual = acc.clone()
        residual[p.indices] -= p.values
        comp.after_send("p0", p)
        torch.testing.assert_close(p.to_dense(), ref_sent[t])
    torch.testing.assert_close(residual, ref_v)


def test_dgc_abandoned_step_leaves_momentum_unchanged():
    comp = DGCCompressor(density=0.1, momentum=0.9, sample_ratio=1.0)
    g = torch.randn(100)
    comp.after_send("p0", comp.compress(comp.accumulate(g, torch.zeros(100), ctx()), ctx()))
    before = comp.state_dict()["momentum"]["p0"].clone()
    comp.accumulate(torch.randn(100), torch.zeros(100), ctx())
    comp.discard_pending("p0")
    torch.testing.assert_close(comp.state_dict()["momentum"]["p0"], before)


def test_dgc_warmup_is_the_papers_exponential_schedule():
    comp = DGCCompressor(density=0.001, warmup_steps=400, warmup_stages=4)
    got = [comp.density_at(s) for s in (0, 100, 200, 300, 400, 10_000)]
    expected = [0.001 ** (1 / 5), 0.001 ** (2 / 5), 0.001 ** (3 / 5), 0.001 ** (4 / 5), 0.001, 0.001]
    assert got == pytest.approx(expected)
    assert got[0] == pytest.approx(0.251, abs=1e-3) and got[3] == pytest.approx(0.00398, abs=1e-5)


def test_dgc_local_clipping_scales_with_world_size():
    comp = DGCCompressor(density=1.0, momentum=0.0, clip_norm=1.0, sample_ratio=1.0)
    acc = comp.accumulate(torch.full((4,), 10.0), torch.zeros(4), ctx(world_size=4))
    assert float(acc.norm()) == pytest.approx(0.5, rel=1e-4)  # 1.0 * 4 ** -0.5


def test_dgc_rejects_optimizers_with_momentum():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="momentum=0.9"):
        check_optimizer(torch.optim.SGD([w], lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="betas"):
        check_optimizer(torch.optim.Adam([w]))
    check_optimizer(torch.optim.SGD([w], lr=0.1))


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "0.1", True, None])
def test_bad_density_is_rejected_with_its_name(bad):
    with pytest.raises((TypeError, ValueError), match="density"):
        TopKCompressor(density=bad)


def test_bad_threshold_and_names():
    with pytest.raises(ValueError, match="threshold"):
        ThresholdCompressor(threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        ThresholdCompressor(threshold=0.0)
    with pytest.raises(ValueError, match="valid names"):
        build_compressor("topkk")
    with pytest.raises(ValueError, match="desnity"):
        build_compressor("topk", desnity=0.1)
    with pytest.raises(ValueError, match="variant"):
        build_compressor("randk", variant="gaussian")
    assert set(COMPRESSORS) >= {"none", "topk", "threshold", "randk", "variance", "dgc"}


def test_error_feedback_conserves_gradient_mass():
    """sent + residual = raw sum, step after step (topk, threshold, wangni)."""
    from sparsedist.feedback import ErrorFeedback

    torch.manual_seed(0)
    for comp in (TopKCompressor(0.05), ThresholdCompressor(0.5), WangniCompressor(0.1)):
        fb = ErrorFeedback()
        raw = torch.zeros(300)
        sent_total = torch.zeros(300)
        for t in range(8):
            g = torch.randn(300)
            raw += g
            acc = comp.accumulate(g, fb.get("p0", g), ctx(step=t))
            p = comp.compress(acc, ctx(step=t))
            sent_total += p.to_dense()
            fb.update("p0", acc, p)
        torch.testing.assert_close(sent_total + fb.residuals["p0"], raw, atol=1e-4, rtol=1e-5)


def test_randk_shared_indices_are_a_uniform_subset():
    """k << n takes the O(k log k) path (draw with replacement, distinct, random k of them): every index is as
    likely as any other, and pairs too (a chi-square test over seeded draws; deterministic)."""
    n, k, draws = 40, 4, 6000
    single = torch.zeros(n)
    pairs = torch.zeros(n, n)
    for s in range(draws):
        idx = shared_random_indices(n, k, seed=s, step=0, key=0)
        assert idx.numel() == k and idx.unique().numel() == k and 0 <= int(idx.min()) and int(idx.max()) < n
        single[idx] += 1
        pairs[idx.unsqueeze(1), idx.unsqueeze(0)] += 1
    expect = draws * k / n
    chi2 = float(((single - expect) ** 2 / expect).sum())
    assert chi2 < 80, chi2  # 39 degrees of freedom: p < 1e-4 above 80
    off = pairs[~torch.eye(n, dtype=torch.bool)]
    expect_pair = draws * k * (k - 1) / (n * (n - 1))
    chi2_pairs = float(((off - expect_pair) ** 2 / expect_pair).sum()) / 2  # each unordered pair counted twice
    assert chi2_pairs < 900, chi2_pairs  # 779 pairs: mean 779, sd ~39
    big = shared_random_indices(25_000_000, 25_000, seed=1, step=2, key=3)
    assert big.numel() == 25_000 and big.unique().numel() == 25_000


def test_selection_workspace_gives_the_same_indices_and_reuses_its_buffers():
    from sparsedist.compressors.base import Workspace
    from sparsedist.compressors.topk import topk_indices

    g = torch.Generator().manual_seed(3)
    ws = Workspace()
    for n, k in ((1 << 19, 500), (1 << 19, 5000), (300_000, 3000), (1000, 10)):  # prefiltered and plain paths
        x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4
        plain = topk_indices(x, k)
        reused = topk_indices(x, k, ws)
        assert torch.equal(plain.sort().values, reused.sort().values)
        assert torch.equal(reused.sort().values, x.abs().topk(k).indices.sort().values)
        s1 = sampled_topk_indices(x, k, generator=torch.Generator().manual_seed(0))
        s2 = sampled_topk_indices(x, k, generator=torch.Generator().manual_seed(0), workspace=ws)
        assert torch.equal(s1, s2)
    ptr = ws.get("abs", 1 << 19, torch.float32, torch.device("cpu")).data_ptr()
    assert ws.get("abs", 1000, torch.float32, torch.device("cpu")).data_ptr() == ptr  # smaller: the same buffer
    comp = build_compressor("topk", density=0.01)
    import pickle
    assert pickle.loads(pickle.dumps(comp))._workspace._buffers == {}  # scratch is not pickled


def test_entries_by_row_maxima_are_exactly_those_at_or_above_the_threshold():
    from sparsedist.compressors.base import Workspace, entries_at_least

    g = torch.Generator().manual_seed(5)
    for n in (1 << 16, (1 << 16) + 13, 31, 64):  # whole rows, a ragged tail, fewer entries than a row
        mag = torch.randn(n, generator=g).abs()
        mag[n // 2] = float("nan")  # never a candidate, as with mag >= t
        for q in (0.999, 0.99, 0.5, 0.0):  # few rows reach it (row scan), most rows reach it (whole comparison)
            t = mag.nan_to_num(0.0).quantile(q) if n > 1 else mag[0]
            for strict in (False, True):
                expected = ((mag > t) if strict else (mag >= t)).nonzero().view(-1)
                for ws in (None, Workspace()):
                    found, values = entries_at_least(mag, t, ws, strict=strict)
                    assert torch.equal(found, expected) and torch.equal(values, mag[expected]), (n, q, strict)
        tie = mag[3].clone()  # an entry equal to the threshold is a candidate, unless strict
        assert 3 in entries_at_least(mag, tie)[0].tolist() and 3 not in entries_at_least(mag, tie, strict=True)[0]


def test_threshold_with_workspace_selects_strictly_above_tau():
    comp = build_compressor("threshold", threshold=0.5)
    for x in (torch.tensor([0.5, -0.6, 0.4, 2.0, -0.5]), torch.tensor([1.0, 0.1])):  # reuse a larger buffer
        p = comp.compress(x, SelectContext(step=0, key="p0", world_size=1, rank=0, seed=0))
        assert torch.equal(p.indices, (x.abs() > 0.5).nonzero().view(-1))


def test_all_finite_is_exact_even_when_the_sum_overflows():
    from sparsedist.payload import all_finite

    big = torch.full((4,), 3e38)  # finite entries whose fp32 sum is inf
    assert all_finite(big) and all_finite(torch.zeros(0)) and all_finite(torch.randn(1000))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1000)
        x[123] = bad
        assert not all_finite(x)
        assert not all_finite(torch.cat([big, x]))
    half = torch.full((10,), 60000.0, dtype=torch.float16)  # the fp16 sum would overflow; fp32 does not
    assert all_finite(half) and not all_finite(torch.cat([half, torch.tensor([float("nan")], dtype=torch.float16)]))
    assert all_finite(torch.tensor([1e308, 1e308], dtype=torch.float64))
