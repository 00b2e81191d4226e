"""SecondMomentCollector against an exact per-example reference (autograd, one example at a time)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsedist.second_moment import SecondMomentCollector
from sparsedist.testing import run_distributed

torch.set_num_threads(1)


def sq_loss(out: torch.Tensor) -> torch.Tensor:
    """Per-example loss (B,): mean of squares over the non-example dims."""
    return out.square().reshape(out.shape[0], -1).mean(1)


def reference(model: nn.Module, x: torch.Tensor, per_example_loss=sq_loss) -> dict[str, torch.Tensor]:
    """sum_n (grad of l_n / B)^2 per parameter: the loss is the mean of l_n, example n contributes l_n / B."""
    out = model(x)
    losses = per_example_loss(out)
    b = losses.shape[0]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    for i in range(b):
        grads = torch.autograd.grad(losses[i] / b, [p for _, p in named], retain_graph=True, allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None:
                ref[n] += g.double().square()
    return ref


def collect(model: nn.Module, xs, per_example_loss=sq_loss, **kw) -> dict[str, torch.Tensor]:
    """Forward/backward each batch in ``xs`` (mean loss), then pop every covered parameter."""
    col = SecondMomentCollector(model, **kw)
    for x in xs:
        per_example_loss(model(x)).mean().backward()
    out = {n: col.pop(p) for n, p in model.named_parameters()}
    col.remove()
    return out


def assert_matches(got: dict, ref: dict, rtol: float = 2e-5) -> None:
    for name, r in ref.items():
        g = got[name]
        assert g is not None, f"{name} not covered"
        assert g.dtype == torch.float32 and g.shape == (r.numel(),)
        scale = r.abs().max().item()
        assert scale > 0, f"degenerate reference for {name}"
        err = (g.double().view_as(r) - r).abs().max().item()
        assert err <= rtol * scale, f"{name}: max abs error {err:.3e} vs scale {scale:.3e}"


def check_model(model: nn.Module, x: torch.Tensor, **kw) -> None:
    model = model.double()
    ref = reference(model, x)
    got = collect(model, [x], **kw)
    assert_matches(got, ref)


# ------------------------------------------------------------------------------------------- exactness


def test_linear_2d_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    check_model(model, torch.randn(6, 5, dtype=torch.float64))


def test_linear_2d_cross_entropy():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 4, (7,))
    ce = lambda out: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    assert_matches(collect(model, [x], ce), reference(model, x, ce))


def test_linear_3d_exact_sums_positions_per_example():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    ref = reference(model, x)
    assert_matches(collect(model, [x]), ref)
    # small chunks (one example at a time) give the same result
    assert_matches(collect(model, [x], max_chunk_elements=1), ref)
    # the per-position approximation is a different quantity here (cross-position terms dropped)
    approx = collect(model, [x], mode="per_position")
    assert not torch.allclose(approx["0.weight"].double(), ref["0.weight"].reshape(-1), rtol=1e-3)


def test_linear_3d_per_position_treats_positions_as_examples():
    # a position-wise MLP with a loss that is a sum over positions: positions are separable, so the
    # per-position mode equals the exact statistic of the flattened (B*T) batch of "examples"
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    per_position = collect(model, [x], lambda out: out.square().mean(-1).sum(-1), mode="per_position")
    # the loss is (1/3) sum_{n,t} m_nt; as 18 "examples" with l = 6 m_nt the reference's l / 18 is the same
    flat_ref = reference(model, x.reshape(18, 5), lambda out: out.square().mean(-1) * 6)
    assert_matches(per_position, flat_ref)


def test_linear_seq_first_with_batch_dim():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 3, 5, dtype=torch.float64)            # (T, B, F)
    per_example = lambda out: out.square().mean(dim=(0, 2))  # noqa: E731  (B,)
    ref = reference(model, x, per_example)
    assert_matches(collect(model, [x], per_example, batch_dim=1), ref)


def test_linear_unbatched_input_is_one_example():
    torch.manual_seed(5)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(4, dtype=torch.float64)
    col = SecondMomentCollector(lin)
    lin(x).square().mean().backward()
    assert torch.allclose(col.pop(lin.weight).double(), lin.weight.grad.square().reshape(-1), rtol=1e-5)
    assert torch.allclose(col.pop(lin.bias).double(), lin.bias.grad.square(), rtol=1e-5)


def test_conv2d_exact_stride_padding_dilation_groups_reflect():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(4, 6, (3, 2), dilation=(2, 1), groups=2, padding=2, padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(6, 2, 1, bias=False),
    )
    check_model(model, torch.randn(4, 3, 9, 8, dtype=torch.float64))


def test_conv1d_exact_same_padding_and_stride():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv1d(3, 5, 3, padding="same"), nn.Tanh(), nn.Conv1d(5, 4, 2, stride=2),
                          nn.Tanh(), nn.Conv1d(4, 4, 3, groups=4, padding=1, padding_mode="circular"),
                          nn.Tanh(), nn.Conv1d(4, 2, 4, padding="same", dilation=2))   # asymmetric "same"
    check_model(model, torch.randn(5, 3, 11, dtype=torch.float64))


def test_conv3d_exact():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv3d(2, 3, (2, 3, 2), padding=(1, 0, 1)), nn.Tanh(),
                          nn.Conv3d(3, 2, 2, stride=2, padding=1, padding_mode="replicate"))
    check_model(model, torch.randn(3, 2, 5, 6, 5, dtype=torch.float64))


def test_conv_chunking_and_classifier_head():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).double()
    x, y = torch.randn(5, 1, 7, 7, dtype=torch.float64), torch.randint(0, 4, (5,))
    ce = lambda out: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    ref = reference(model, x, ce)
    assert_matches(collect(model, [x], ce, max_chunk_elements=50), ref)


def test_conv2d_per_position_matches_unfold_formula():
    torch.manual_seed(10)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64)
    got = collect(conv, [x], mode="per_position")
    # independent formula with F.unfold: sum over examples and output positions of (dy_l u_l^T)^2
    out = conv(x)
    dy = torch.autograd.grad(sq_loss(out).mean(), out)[0].reshape(3, 3, -1)       # (B, O, L)
    u = F.unfold(x, 3, padding=1, stride=2)                                       # (B, C*k, L)
    expected_w = torch.einsum("bol,bcl->oc", dy.square(), u.square())
    expected_b = dy.square().sum(dim=(0, 2))
    assert torch.allclose(got["weight"].double(), expected_w.reshape(-1), rtol=1e-5)
    assert torch.allclose(got["bias"].double(), expected_b, rtol=1e-5)


class TwoEmbeddings(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(10, 4, **kw)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


@pytest.mark.parametrize("kw", [{}, {"padding_idx": 0}, {"scale_grad_by_freq": True}])
def test_embedding_exact_with_repeated_indices(kw):
    torch.manual_seed(11)
    idx = torch.randint(0, 10, (5, 7))
    idx[0, :3] = 2          # the same index several times in one example
    idx[1, :2] = 0
    idx[2, 4:] = 0
    check_model(TwoEmbeddings(**kw), idx)


def test_embedding_one_index_per_example():
    torch.manual_seed(12)
    idx = torch.tensor([1, 3, 3, 7, 1, 0])
    check_model(TwoEmbeddings(), idx)


# ------------------------------------------------------------------------------- calls and accumulation


class SharedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def test_module_called_twice_is_exact():
    torch.manual_seed(13)
    check_model(SharedTwice(), torch.randn(5, 4, dtype=torch.float64))


class UnusedSecondCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        self.lin(x * 2)          # output never reaches the loss: its gradient hook never fires
        return self.lin(x)


def test_call_without_gradient_is_flushed_at_pop():
    torch.manual_seed(14)
    check_model(UnusedSecondCall(), torch.randn(5, 4, dtype=torch.float64))


def test_two_backward_passes_accumulate_until_pop():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 2)).double()
    x1, x2 = torch.randn(4, 2, 6, dtype=torch.float64), torch.randn(3, 2, 6, dtype=torch.float64)
    r1, r2 = reference(model, x1), reference(model, x2)
    col = SecondMomentCollector(model)
    for x in (x1, x2):
        sq_loss(model(x)).mean().backward()
    got = {n: col.pop(p) for n, p in model.named_parameters()}
    assert_matches(got, {n: r1[n] + r2[n] for n in r1})
    # popped means reset: nothing accumulated since
    for _, p in model.named_parameters():
        assert torch.count_nonzero(col.pop(p)) == 0
    sq_loss(model(x2)).mean().backward()
    assert_matches({n: col.pop(p) for n, p in model.named_parameters()}, r2)


def test_eval_and_no_grad_forwards_do_not_count():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    ref = reference(model, x)
    col = SecondMomentCollector(model)
    with torch.no_grad():
        model(torch.randn(3, 4, dtype=torch.float64))
    model(torch.randn(2, 4, dtype=torch.float64))          # grad enabled but never backpropagated
    sq_loss(model(x)).mean().backward()
    assert_matches({n: col.pop(p) for n, p in model.named_parameters()}, ref)


def test_inplace_activation_after_linear():
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    check_model(model, torch.randn(7, 4, dtype=torch.float64))


def test_frozen_parameters_and_coverage():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    col = SecondMomentCollector(model)
    assert col.covers(model[0].weight) and col.covers(model[2].bias)
    assert not col.covers(model[1].weight)
    assert col.uncovered() == ["1.weight", "1.bias"]          # frozen 0.bias is not listed
    assert col.pop(model[1].weight) is None
    sq_loss(model(torch.randn(3, 4))).mean().backward()
    assert torch.count_nonzero(col.pop(model[0].weight)) > 0
    col.remove()
    assert not col.covers(model[0].weight) and col.pop(model[0].weight) is None
    sq_loss(model(torch.randn(3, 4))).mean().backward()       # no hooks left


def test_multihead_attention_out_proj_is_not_claimed():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    col = SecondMomentCollector(mha)
    assert not col.covers(mha.out_proj.weight)
    assert set(col.uncovered()) == {n for n, _ in mha.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_models_give_fp32_statistics(dtype):
    torch.manual_seed(18)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 2))
    x = torch.randn(4, 2, 4, 4)
    ref = reference(model.double(), x.double())
    got = collect(model.to(dtype), [x.to(dtype)])
    assert_matches(got, ref, rtol=2e-5 if dtype == torch.float32 else 5e-2)


def test_bad_options():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="mode"):
        SecondMomentCollector(model, mode="fast")
    with pytest.raises(ValueError, match="batch_dim"):
        SecondMomentCollector(model, batch_dim=-1)
    with pytest.raises(ValueError, match="max_chunk_elements"):
        SecondMomentCollector(model, max_chunk_elements=0)
    with pytest.raises(TypeError, match="nn.Module"):
        SecondMomentCollector(object())


# ----------------------------------------------------------------------------------------- under DDP


def _ddp_worker(rank, world_size):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 4), nn.Tanh(),
                          nn.Linear(4, 2)).double()
    torch.manual_seed(100 + rank)
    xs = [torch.randn(3, 2, 8, dtype=torch.float64) for _ in range(2)]
    ref = {n: reference(model, xs[0])[n] + reference(model, xs[1])[n] for n, _ in model.named_parameters()}
    ddp = DDP(model, bucket_cap_mb=0.0001)         # several buckets: hooks run while backward is under way
    col = SecondMomentCollector(ddp)
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[str, torch.Tensor] = {}

    def hook(state, bucket):
        # statistics must be complete when DDP hands the bucket over, before the rest of backward
        for p in bucket.parameters():
            seen[names[id(p)]] = col.pop(p)
        fut = dist.all_reduce(bucket.buffer().div_(world_size), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, hook)
    with ddp.no_sync():                            # micro-batch 1: accumulated, no exchange
        sq_loss(ddp(xs[0])).mean().backward()
    sq_loss(ddp(xs[1])).mean().backward()          # micro-batch 2: exchange, hook pops
    errs = {}
    for n, r in ref.items():
        errs[n] = ((seen[n].double().view_as(r) - r).abs().max() / r.abs().max()).item()
    return errs, sorted(seen)


def test_ddp_hook_sees_complete_statistics_with_no_sync():
    results = run_distributed(_ddp_worker, 2, timeout=120)
    for errs, seen in results:
        assert seen == sorted(errs)
        assert max(errs.values()) < 1e-5, errs


def test_a_paused_collector_computes_nothing_and_resumes():
    import torch.nn as nn

    from sparsedist.second_moment import SecondMomentCollector

    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    col = SecondMomentCollector(lin)
    x = torch.randn(4, 3)
    col.paused = True
    lin(x).sum().backward()
    assert torch.count_nonzero(col.pop(lin.weight)) == 0  # nothing was hooked while paused
    col.paused = False
    lin(x).sum().backward()
    per_example = torch.ones(4, 2, 1) * x[:, None, :]  # d(sum y)/dW for each example
    torch.testing.assert_close(col.pop(lin.weight), per_example.square().sum(0).reshape(-1))
