"""Sparse activations: k-winners-take-all, FATReLU threshold, the model swap helper and the sparsity meter."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import sparsedist.nn as snn
from sparsedist.nn import functional as SF


def reference_topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Independent reference: stable descending sort, first k indices of each row win."""
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order, True)


@pytest.mark.parametrize("shape", [(6, 20), (3, 5, 16), (20,)])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_kwinners_forward_and_gradient_match_masked_reference(shape, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    y = snn.TopKActivation(k)(x)
    (y * upstream).sum().backward()

    mask = reference_topk_mask(x.detach(), k)
    assert torch.equal(y.detach(), torch.where(mask, x.detach(), torch.zeros_like(x)))
    assert torch.equal((y != 0).sum(-1), torch.full(shape[:-1], k))
    assert_close(x.grad, upstream * mask)


def test_kwinners_exactly_k_with_ties_and_lowest_index_wins():
    x = torch.ones(4, 10)
    y = SF.kwinners(x, 3)
    assert torch.equal((y != 0).sum(-1), torch.full((4,), 3))
    assert torch.equal(y[:, :3], torch.ones(4, 3)) and torch.equal(y[:, 3:], torch.zeros(4, 7))

    x = torch.tensor([[0.0, 1.0, 1.0, 1.0, 3.0, 1.0]])
    assert torch.equal(SF.topk_mask(x, 2), torch.tensor([[False, True, False, False, True, False]]))
    assert torch.equal(SF.topk_mask(x, 4), torch.tensor([[False, True, True, True, True, False]]))
    # all-equal rows with zeros and negatives: still exactly k kept positions
    x = torch.tensor([[-2.0, -2.0, -2.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(SF.topk_mask(x, 3).sum(-1), torch.tensor([3, 3]))
    # matches the stable-sort reference on heavily tied integer data, batched (B, T, F)
    x = torch.randint(0, 3, (5, 7, 12)).float()
    for k in (1, 5, 11, 12):
        assert torch.equal(SF.topk_mask(x, k), reference_topk_mask(x, k))


def test_kwinners_nan_rows_keep_nan_visible():
    x = torch.tensor([[1.0, float("nan"), 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    y = SF.kwinners(x, 2)
    assert torch.isnan(y[0, 1]) and y[0, [0, 2, 3]].eq(0).all()
    assert torch.equal(y[1], torch.tensor([0.0, 4.0, 3.0, 0.0]))


def test_kwinners_fraction_and_full_k():
    x = torch.randn(3, 10)
    assert torch.equal((snn.TopKActivation(0.25)(x) != 0).sum(-1), torch.full((3,), 3))  # ceil(2.5)
    assert torch.equal(snn.TopKActivation(10)(x), x)
    assert torch.equal(snn.TopKActivation(1.0)(x), x)


def test_kwinners_gradcheck_float64():
    x = torch.randn(4, 3, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: SF.kwinners(t, 4), (x,))
    assert torch.autograd.gradgradcheck(lambda t: SF.kwinners(t, 4), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kwinners_dtypes(dtype):
    x = torch.randn(8, 4, 32).to(dtype).requires_grad_()
    y = snn.TopKActivation(5)(x)
    assert y.dtype == dtype and y.shape == x.shape
    mask = y != 0
    assert torch.equal(mask.sum(-1), torch.full((8, 4), 5))
    assert torch.equal(y[mask], x.detach()[mask])
    assert torch.equal(mask, reference_topk_mask(x.detach(), 5))
    y.float().sum().backward()
    assert torch.equal(x.grad != 0, mask)


def test_threshold_forward_gradient_and_relu_equivalence():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, 11, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 7, 11, generator=g, dtype=torch.float64)
    t = 0.3
    y = snn.ThresholdActivation(t)(x)
    (y * upstream).sum().backward()
    keep = x.detach() > t
    assert torch.equal(y.detach(), x.detach() * keep)
    assert_close(x.grad, upstream * keep)

    xr = x.detach().clone().requires_grad_()
    xr2 = x.detach().clone().requires_grad_()
    yr = snn.ThresholdActivation(0.0)(xr)
    yrelu = torch.relu(xr2)
    assert torch.equal(yr, yrelu)
    (yr * upstream).sum().backward()
    (yrelu * upstream).sum().backward()
    assert torch.equal(xr.grad, xr2.grad)
    # exactly at the threshold: zeroed (x > t keeps)
    assert SF.threshold_activation(torch.tensor([0.3, 0.30001]), 0.3).tolist() == [0.0, pytest.approx(0.30001)]


def test_threshold_gradcheck_and_dtypes():
    x = torch.randn(6, 10, dtype=torch.float64)
    x = torch.where((x - 0.2).abs() < 1e-3, x + 0.01, x).requires_grad_()  # stay away from the kink
    assert torch.autograd.gradcheck(lambda t: SF.threshold_activation(t, 0.2), (x,))
    for dtype in (torch.float16, torch.bfloat16):
        xx = torch.randn(4, 16).to(dtype)
        y = snn.ThresholdActivation(0.5)(xx)
        assert y.dtype == dtype and torch.equal(y != 0, xx > 0.5)


@pytest.mark.parametrize("bad", [0, -3, 1.5, 0.0, float("nan"), True, "3", None])
def test_topk_bad_k(bad):
    with pytest.raises((ValueError, TypeError), match="k"):
        snn.TopKActivation(bad)


def test_topk_k_larger_than_features():
    with pytest.raises(ValueError, match="larger than the size"):
        snn.TopKActivation(11)(torch.randn(2, 10))
    with pytest.raises(ValueError, match="larger than the size"):
        SF.kwinners(torch.randn(2, 3, 4), 5)


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan"), True, "1", torch.tensor([1.0, 2.0])])
def test_threshold_bad_args(bad):
    with pytest.raises((ValueError, TypeError), match="threshold"):
        snn.ThresholdActivation(bad)


def make_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4), nn.Tanh()
    )


def test_sparsify_activations_replace_compose_filter():
    x = torch.randn(5, 3, 8)
    model = make_mlp()
    keys = list(model.state_dict())
    ref = make_mlp()
    names = snn.sparsify_activations(model, k=8)
    assert names == ["1", "3"]
    assert isinstance(model[1], snn.TopKActivation) and isinstance(model[3], snn.TopKActivation)
    assert isinstance(model[5], nn.Tanh)
    assert list(model.state_dict()) == keys
    h = ref[0](x)
    h = SF.kwinners(h, 8)
    h = SF.kwinners(ref[2](h), 8)
    assert_close(model(x), ref[5](ref[4](h)))

    model = make_mlp()
    names = snn.sparsify_activations(model, threshold=0.1, compose=True, filter=lambda n, m: isinstance(m, nn.GELU))
    assert names == ["3"]
    assert isinstance(model[1], nn.ReLU)
    assert isinstance(model[3], nn.Sequential) and isinstance(model[3][0], nn.GELU)
    assert isinstance(model[3][1], snn.ThresholdActivation)
    h = ref[1](ref[0](x))
    h = SF.threshold_activation(torch.nn.functional.gelu(ref[2](h)), 0.1)
    assert_close(model(x), ref[5](ref[4](h)))


def test_sparsify_activations_errors():
    model = make_mlp()
    with pytest.raises(ValueError, match="exactly one"):
        snn.sparsify_activations(model)
    with pytest.raises(ValueError, match="exactly one"):
        snn.sparsify_activations(model, k=2, threshold=0.1)
    with pytest.raises(ValueError, match="itself an activation"):
        snn.sparsify_activations(nn.ReLU(), k=2)
    with pytest.raises(ValueError):
        snn.sparsify_activations(model, k=0)
    with pytest.raises(TypeError):
        snn.sparsify_activations([nn.ReLU()], k=2)


def test_activation_sparsity_meter():
    model = make_mlp()
    snn.sparsify_activations(model, k=8, filter=lambda n, m: n == "3")
    x = torch.randn(4, 6, 8)
    with snn.ActivationSparsityMeter(model) as meter:
        model(x)
        model(x[:2])
        s = meter.sparsity()
    assert set(meter.layers) == {"1", "3"}
    assert s["3"] == pytest.approx(1 - 8 / 32)
    relu_out = model[1](model[0](torch.cat([x, x[:2]])))
    assert s["1"] == pytest.approx((relu_out == 0).float().mean().item())
    assert 0.2 < s["1"] < 0.8
    expected_overall = (s["1"] + s["3"]) / 2  # both layers see the same number of elements
    assert meter.overall() == pytest.approx(expected_overall)
    # hooks removed on exit: further forwards are not counted
    model(x)
    assert meter.sparsity() == s
    meter.reset()
    assert meter.sparsity() == {} and math.isnan(meter.overall())

    with pytest.raises(ValueError, match="no module"):
        snn.ActivationSparsityMeter(nn.Sequential(nn.Linear(2, 2)))
    only = snn.ActivationSparsityMeter(model, types=(nn.Linear,), filter=lambda n, m: n == "0")
    assert only.layers == ["0"]
    only.remove()


def test_topk_in_a_small_transformer_mlp_block_trains():
    """(B, T, F) activations inside an MLP block: winners get gradients, loss goes down."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 64), snn.TopKActivation(16), nn.Linear(64, 16))
    x = torch.randn(8, 12, 16)
    target = x @ torch.randn(16, 16) / 4  # a learnable (linear) target
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = (block(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
