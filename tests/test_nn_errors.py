"""Sparse back-propagated errors: meProp's SparseBackpropLinear, sparse_error/SparseError, the conversion helper."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import sparsedist.nn as snn
from sparsedist.nn import functional as SF


def reference_columns(dy: torch.Tensor, k: int) -> torch.Tensor:
    """Independent reference for meProp's unified top-k: sort (-score, index) in Python."""
    scores = dy.reshape(-1, dy.shape[-1]).abs().sum(0).tolist()
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return torch.tensor(order[:k])


def reference_row_mask(g: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(g.abs(), dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)


# ----------------------------------------------------------------------------- SparseBackpropLinear


def test_same_init_forward_and_state_dict_as_linear():
    torch.manual_seed(3)
    dense = nn.Linear(12, 20)
    torch.manual_seed(3)
    sparse = snn.SparseBackpropLinear(12, 20, k=4)
    assert torch.equal(dense.weight, sparse.weight) and torch.equal(dense.bias, sparse.bias)
    x = torch.randn(5, 7, 12)
    assert torch.equal(dense(x), sparse(x))
    assert list(dense.state_dict()) == list(sparse.state_dict())

    other = snn.SparseBackpropLinear(12, 20, k=0.1)
    assert other.k == 2 and other.error_density == pytest.approx(0.1)
    other.load_state_dict(dense.state_dict())
    assert torch.equal(other(x), dense(x))
    back = nn.Linear(12, 20)
    back.load_state_dict(other.state_dict())
    assert torch.equal(back.weight, dense.weight)
    no_bias = snn.SparseBackpropLinear(12, 20, 3, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
    assert "k=3" in repr(no_bias)


@pytest.mark.parametrize("shape", [(9, 12), (4, 6, 12)])
@pytest.mark.parametrize("k", [1, 5, 19])
def test_meprop_gradients_match_dense_reference_with_same_selection(shape, k):
    g = torch.Generator().manual_seed(k)
    layer = snn.SparseBackpropLinear(12, 20, k).double()
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*shape[:-1], 20, generator=g, dtype=torch.float64)
    (layer(x) * dy).sum().backward()

    idx = reference_columns(dy, k)
    col_mask = torch.zeros(20, dtype=torch.bool)
    col_mask[idx] = True
    dy2 = dy.reshape(-1, 20)
    dy_masked = dy2 * col_mask
    x2 = x.detach().reshape(-1, 12)
    W = layer.weight.detach()
    assert_close(x.grad.reshape(-1, 12), dy_masked @ W)
    assert_close(x.grad.reshape(-1, 12), dy2[:, idx] @ W[idx])  # dx = dy_k W_k
    assert_close(layer.weight.grad, dy_masked.t() @ x2)
    assert_close(layer.bias.grad, dy2.sum(0))  # full bias gradient
    nonzero_rows = (layer.weight.grad != 0).any(dim=1)
    assert int(nonzero_rows.sum()) == k
    assert torch.equal(nonzero_rows, col_mask)


def test_meprop_unified_topk_sums_over_batch_and_time_and_breaks_ties_low_index():
    dy = torch.zeros(2, 3, 6)
    dy[0, 0, 4] = 5.0   # one large entry...
    dy[:, :, 1] = 1.0   # ...loses to a column that is moderately large everywhere (sum 6)
    dy[1, 2, 3] = -2.0
    assert SF.unified_topk_columns(dy, 2).tolist() == [1, 4]
    assert sorted(SF.unified_topk_columns(torch.ones(4, 8), 3).tolist()) == [0, 1, 2]
    dy = torch.randn(3, 5, 16)
    for k in (1, 7, 16):
        assert SF.unified_topk_columns(dy, k).tolist() == reference_columns(dy, k).tolist()


def test_meprop_all_equal_errors_keep_exactly_k_rows():
    layer = snn.SparseBackpropLinear(5, 10, 3)
    x = torch.randn(4, 5, requires_grad=True)
    layer(x).sum().backward()  # dy all ones: every column ties
    rows = (layer.weight.grad != 0).any(dim=1)
    assert rows.tolist() == [True] * 3 + [False] * 7
    assert_close(x.grad, torch.ones(4, 3) @ layer.weight.detach()[:3])


def test_meprop_gradcheck_float64():
    # gradcheck feeds one-hot output errors, so the selected column always holds the error: the sparse
    # path must then reproduce the exact Jacobian (this checks the gathered small matmuls and index_copy).
    torch.manual_seed(0)
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w_, b_: SF.sparse_backprop_linear(x_, w_, b_, 1), (x, w, b))
    assert torch.autograd.gradcheck(lambda x_, w_: SF.sparse_backprop_linear(x_, w_, None, 3), (x, w))
    # k == out_features is plain F.linear
    assert torch.autograd.gradcheck(lambda x_, w_, b_: SF.sparse_backprop_linear(x_, w_, b_, 8), (x, w, b))


def test_meprop_partial_requires_grad():
    layer = snn.SparseBackpropLinear(6, 8, 2)
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.weight.grad is None and x.grad is not None and layer.bias.grad is not None
    layer2 = snn.SparseBackpropLinear(6, 8, 2)
    layer2(torch.randn(3, 6)).pow(2).sum().backward()  # input without grad (first layer)
    assert int((layer2.weight.grad != 0).any(1).sum()) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_meprop_low_precision_smoke(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(16, 32).to(dtype)
    layer = snn.SparseBackpropLinear(16, 32, 4).to(dtype)
    layer.load_state_dict(dense.state_dict())
    x = torch.randn(2, 5, 16).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and torch.equal(y, dense(x))
    y.float().pow(2).sum().backward()
    assert x.grad.dtype == dtype and layer.weight.grad.dtype == dtype
    assert int((layer.weight.grad != 0).any(1).sum()) == 4


def test_meprop_under_cpu_autocast_bf16():
    torch.manual_seed(0)
    layer = snn.SparseBackpropLinear(16, 32, 4)
    x = torch.randn(6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert int((layer.weight.grad != 0).any(1).sum()) == 4


@pytest.mark.parametrize("bad", [0, -1, 33, 1.5, 0.0, True, "4"])
def test_meprop_bad_k(bad):
    with pytest.raises((ValueError, TypeError), match="k"):
        snn.SparseBackpropLinear(16, 32, bad)


def test_meprop_trains():
    torch.manual_seed(0)
    model = nn.Sequential(snn.SparseBackpropLinear(10, 64, 0.25), nn.ReLU(), snn.SparseBackpropLinear(64, 1, 1))
    x = torch.randn(256, 10)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# ----------------------------------------------------------------------------- sparse_error / SparseError


@pytest.mark.parametrize("shape", [(7, 16), (3, 4, 16)])
def test_sparse_error_identity_forward_topk_backward(shape):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    y = snn.sparse_error(x, 4)
    assert torch.equal(y, x)
    (y * upstream).sum().backward()
    mask = reference_row_mask(upstream, 4)
    assert_close(x.grad, upstream * mask)
    assert torch.equal((x.grad != 0).sum(-1), torch.full(shape[:-1], 4))  # per example / per token


def test_sparse_error_ties_gradcheck_and_module():
    x = torch.randn(3, 6, requires_grad=True)
    snn.sparse_error(x, 2).sum().backward()  # all-equal errors
    assert x.grad.tolist() == [[1.0, 1.0, 0, 0, 0, 0]] * 3
    xd = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: SF.sparse_error(t, 2), (xd,))
    assert torch.autograd.gradgradcheck(lambda t: SF.sparse_error(t, 5), (xd,))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), snn.SparseError(0.25), nn.Linear(8, 3))
    net(torch.randn(1, 4)).pow(2).sum().backward()
    assert int((net[0].bias.grad != 0).sum()) == 2  # one example: the error below has 2 of 8 entries
    assert int((net[0].weight.grad != 0).any(1).sum()) == 2
    with torch.no_grad():
        assert torch.equal(snn.SparseError(3)(x), x)
    assert "k=0.25" in repr(net[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_error_low_precision(dtype):
    x = torch.randn(4, 32).to(dtype).requires_grad_()
    y = snn.SparseError(8)(x)
    assert y.dtype == dtype and torch.equal(y, x)
    (y.float() * torch.randn(4, 32)).sum().backward()
    assert x.grad.dtype == dtype and torch.equal((x.grad != 0).sum(-1), torch.full((4,), 8))


def test_sparse_error_bad_args():
    with pytest.raises(ValueError, match="larger than the size"):
        snn.sparse_error(torch.randn(2, 4, requires_grad=True), 5)
    for bad in (0, -2, 2.0, True):
        with pytest.raises((ValueError, TypeError), match="k"):
            snn.SparseError(bad)
    with pytest.raises(TypeError):
        snn.sparse_error([1.0, 2.0], 1)


# ----------------------------------------------------------------------------- conversion helper


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.head(h)


def test_convert_linear_to_sparse_backprop():
    torch.manual_seed(0)
    model = Tiny()
    ref = Tiny()
    ref.load_state_dict(model.state_dict())
    params_before = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    names = snn.convert_linear_to_sparse_backprop(model, 0.1, filter=lambda n, m: n != "head")
    assert names == ["embed", "mlp.0", "mlp.2"]  # attn.out_proj (a Linear subclass MHA bypasses) is skipped
    assert type(model.attn.out_proj) is not snn.SparseBackpropLinear and type(model.head) is nn.Linear
    assert [model.embed.k, model.mlp[0].k, model.mlp[2].k] == [2, 7, 2]
    assert list(model.state_dict()) == keys
    assert all(p is params_before[n] for n, p in model.named_parameters())  # same Parameter objects
    x = torch.randn(2, 5, 6)
    assert_close(model(x), ref(x))
    model(x).sum().backward()
    assert int((model.mlp[0].weight.grad != 0).any(1).sum()) == 7
    assert int((model.head.weight.grad != 0).any(1).sum()) == 5
    # converting again changes nothing (already converted layers are not nn.Linear exactly)
    assert snn.convert_linear_to_sparse_backprop(model, 0.1, filter=lambda n, m: n != "head") == []


def test_convert_errors_leave_model_unchanged():
    model = Tiny()
    with pytest.raises(ValueError, match="'head'.*out_features=5"):
        snn.convert_linear_to_sparse_backprop(model, 8)
    assert type(model.embed) is nn.Linear  # validated before any change
    with pytest.raises(ValueError, match="itself an nn.Linear"):
        snn.convert_linear_to_sparse_backprop(nn.Linear(3, 3), 1)
    with pytest.raises((ValueError, TypeError)):
        snn.convert_linear_to_sparse_backprop(model, 0)
    assert snn.convert_linear_to_sparse_backprop(model, 5) == ["embed", "mlp.0", "mlp.2", "head"]


def test_dense_backward_context_restores_flags():
    torch.manual_seed(0)
    model = nn.Sequential(snn.SparseBackpropLinear(6, 10, 2), snn.SparseError(1), nn.Linear(10, 3))
    dense = nn.Sequential(nn.Linear(6, 10), nn.Identity(), nn.Linear(10, 3))
    dense.load_state_dict(model.state_dict())
    model[0].sparse_backward = True
    x = torch.randn(4, 6)
    with snn.dense_backward(model) as names:
        assert names == ["0", "1"]
        model(x).pow(2).sum().backward()
    dense(x).pow(2).sum().backward()
    assert_close(model[0].weight.grad, dense[0].weight.grad)  # the full gradient, every row
    assert int((model[0].weight.grad != 0).any(1).sum()) == 10
    assert model[0].sparse_backward and model[1].sparse_backward
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    assert int((model[0].weight.grad != 0).any(1).sum()) == 2
