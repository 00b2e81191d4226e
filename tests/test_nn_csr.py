"""CSRLinear: a fixed-mask linear layer on torch.sparse CSR kernels, checked against the dense masked layer."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import sparsedist.nn as snn



def masked_layer(out_f=24, in_f=10, density=0.2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    b = torch.randn(out_f, generator=g, dtype=dtype)
    mask = torch.rand(out_f, in_f, generator=g) < density
    mask[3] = False  # an empty row
    return w, mask, b


@pytest.mark.parametrize("shape", [(7, 10), (2, 5, 10)])
def test_forward_and_gradients_match_dense_masked_reference(shape):
    w, mask, b = masked_layer()
    layer = snn.CSRLinear.from_dense(w, mask, b)
    assert layer.nnz == int(mask.sum()) and layer.density == pytest.approx(mask.float().mean().item())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*shape[:-1], 24, generator=g, dtype=torch.float64)
    y = layer(x)
    wm = (w * mask).requires_grad_()
    bd = b.clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y_ref = torch.nn.functional.linear(xr, wm, bd)
    assert y.shape == y_ref.shape
    assert_close(y, y_ref)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    assert_close(x.grad, xr.grad)
    assert_close(layer.bias.grad, bd.grad)
    assert_close(layer.values.grad, wm.grad[mask])  # row-major order of the active positions


def test_gradcheck_float64():
    w, mask, b = masked_layer(out_f=6, in_f=5, density=0.5)
    layer = snn.CSRLinear.from_dense(w, mask, b)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    from sparsedist.nn.csr import _CSRLinearFn

    def f(x_, v_, b_):
        return _CSRLinearFn.apply(
            x_, v_, b_, layer.crow_indices, layer.col_indices, layer.crow_indices_t, layer.col_indices_t,
            layer.perm_t, 6, 5,
        )

    vals = layer.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, vals, bias))


def test_explicit_zeros_from_linear_to_dense_and_state_dict():
    w, mask, b = masked_layer(dtype=torch.float32)
    w[mask.nonzero()[0, 0], mask.nonzero()[0, 1]] = 0.0  # an active weight that happens to be 0 stays active
    layer = snn.CSRLinear.from_dense(w, mask, b)
    w_back, mask_back = layer.to_dense()
    assert torch.equal(mask_back, mask) and torch.equal(w_back, w * mask)

    lin = nn.Linear(10, 24)
    with torch.no_grad():
        lin.weight.mul_(mask)
    from_lin = snn.CSRLinear.from_linear(lin)
    assert torch.equal(from_lin.to_dense()[1], lin.weight != 0)
    x = torch.randn(4, 10)
    assert_close(from_lin(x), lin(x))

    # loading a checkpoint with a different pattern resizes the layer
    other = snn.CSRLinear.from_dense(torch.randn(24, 10), torch.rand(24, 10) < 0.5)
    other.bias = nn.Parameter(torch.zeros(24))
    other.load_state_dict(layer.state_dict())
    assert other.nnz == layer.nnz
    assert_close(other(x), layer(x))
    assert "nnz=" in repr(layer)


def test_bad_arguments():
    w, mask, b = masked_layer(dtype=torch.float32)
    with pytest.raises(ValueError, match="mask"):
        snn.CSRLinear.from_dense(w, mask.float(), b)
    with pytest.raises(ValueError, match="mask"):
        snn.CSRLinear.from_dense(w, mask[:, :5], b)
    with pytest.raises(ValueError, match="weight"):
        snn.CSRLinear.from_dense(w[0], mask[0], b)
    with pytest.raises(ValueError, match="bias"):
        snn.CSRLinear.from_dense(w, mask, b[:3])
    with pytest.raises(ValueError, match="last dimension"):
        snn.CSRLinear.from_dense(w, mask, b)(torch.randn(2, 11))
    with pytest.raises(TypeError):
        snn.CSRLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_trains_like_masked_dense():
    """A few SGD steps on CSRLinear equal the same steps on the dense masked layer."""
    w, mask, b = masked_layer(out_f=8, in_f=6, density=0.4, dtype=torch.float64)
    layer = snn.CSRLinear.from_dense(w, mask, b)
    wd = nn.Parameter((w * mask).clone())
    bd = nn.Parameter(b.clone())
    opt_s = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt_d = torch.optim.SGD([wd, bd], lr=0.1)
    x = torch.randn(16, 6, dtype=torch.float64)
    t = torch.randn(16, 8, dtype=torch.float64)
    for _ in range(5):
        for opt in (opt_s, opt_d):
            opt.zero_grad()
        (layer(x) - t).pow(2).mean().backward()
        (torch.nn.functional.linear(x, wd, bd) - t).pow(2).mean().backward()
        wd.grad.mul_(mask)
        opt_s.step()
        opt_d.step()
    assert_close(layer.to_dense()[0], wd.detach())
    assert_close(layer.bias, bd)
