"""The sparse reduce-scatter under FSDP2 (sparsedist.fsdp.register_fsdp), with real processes over gloo.

One spawned group per world size runs every check in sequence (spawning is most of the cost on 2 cores):
density 1.0 equals FSDP2's own reduce-scatter; error feedback conserves the gradient (what the owners received
plus the mean residual equals the sum of the true averaged gradients); a non-finite gradient on one rank makes
every rank's shard NaN and leaves residuals untouched; zero selections never hang; bf16 residuals halve their
memory. HSDP (2 replicas x 2 shards) runs at 4 ranks.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sparsedist.fsdp import ShardLayout, managed_parameters, register_fsdp
from sparsedist.testing import run_distributed


class Net(nn.Module):
    """Uneven first dimensions (7, 5, 3 rows over 2 or 3 ranks), a norm and a bias-free layer."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 5, bias=False)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


def net(shard=True, mesh=None):
    torch.manual_seed(0)
    m = Net()
    if shard:
        fully_shard(m.fc1, mesh=mesh)
        fully_shard(m.fc2, mesh=mesh)
        fully_shard(m, mesh=mesh)
    return m


def loss_of(m, step, rank, poison=False):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(4, 6, generator=g)
    if poison:
        x[0] = float("nan")  # every gradient of this rank becomes NaN
    return m(x).pow(2).mean()


def local_grads(m):
    return {n: p.grad.to_local().clone() for n, p in m.named_parameters()}


def full_grads(m):
    return {n: p.grad.full_tensor() for n, p in m.named_parameters()}


def check_density_one(rank, world):
    """FSDP2's reduce-scatter and the sparse one at density 1.0 give the same shards over three AdamW steps."""
    runs = []
    for sparse in (False, True):
        m = net()
        if sparse:
            register_fsdp(m, "topk", density=1.0)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False)
        grads = []
        for step in range(3):
            opt.zero_grad()
            loss_of(m, step, rank).backward()
            grads.append(local_grads(m))
            opt.step()
        runs.append((grads, {n: p.to_local().clone() for n, p in m.named_parameters()}))
    (g0, w0), (g1, w1) = runs
    for a, b in zip(g0, g1):
        for n in a:
            if world == 2:  # a sum of two is the same in any order
                assert torch.equal(a[n], b[n]), n
            else:
                torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-8)
    if world == 2:
        assert all(torch.equal(w0[n], w1[n]) for n in w0)


def check_conservation(rank, world):
    """Sum of received averages + mean residual == sum of the true averaged gradients (weights held fixed)."""
    m, plain = net(), net(shard=False)
    state = register_fsdp(m, "topk", density=0.1)
    got = {n: torch.zeros(p.shape) for n, p in m.named_parameters()}
    true = {n: torch.zeros(p.shape) for n, p in m.named_parameters()}
    for step in range(4):
        m.zero_grad()
        loss_of(m, step, rank).backward()
        for n, g in full_grads(m).items():
            got[n] += g
        plain.zero_grad()
        loss_of(plain, step, rank).backward()
        for n, p in plain.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)
            true[n] += g / world
    for n in got:
        r = state.feedback.residuals.get(n, torch.zeros(got[n].numel())).clone()
        dist.all_reduce(r)
        torch.testing.assert_close(got[n] + r.view(got[n].shape) / world, true[n], rtol=1e-5, atol=1e-6)
    s = state.stats()
    assert s["steps"] == 4 and s["collectives"] == {"sparse_reduce_scatter": 12}
    assert 0.1 <= s["density"] < 0.4 and s["bytes_sent"] < s["bytes_dense"]
    assert s["residual_norm"] > 0 and s["overflow_steps"] == 0

    # a non-finite gradient on the last rank: NaN shards everywhere, residuals and compressor untouched
    before = {n: r.clone() for n, r in state.feedback.residuals.items()}
    m.zero_grad()
    loss_of(m, 9, rank, poison=rank == world - 1).backward()
    assert all(torch.isnan(g).all() for g in local_grads(m).values() if g.numel())
    assert state.feedback.residuals.keys() == before.keys()
    assert all(torch.equal(before[n], state.feedback.residuals[n]) for n in before)
    assert state.stats()["overflow_steps"] == 1 and state.stats()["steps"] == 5

    # the layout is fully_shard's own (names, sizes), and the state round-trips
    layouts = state.layouts
    assert [[s.name for s in lay.slots] for lay in layouts] == [
        ["norm.weight", "norm.bias", "head.weight", "head.bias"], ["fc1.weight", "fc1.bias"], ["fc2.weight"]]
    assert [n for n, _ in managed_parameters(m)] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    saved = state.state_dict()
    fresh = register_fsdp(net(), "topk", density=0.1)
    fresh.load_state_dict(saved)
    assert fresh.step == 5 and all(torch.equal(fresh.feedback.residuals[n], r) for n, r in before.items())


def check_no_selection_and_bf16(rank, world):
    """A threshold nobody reaches sends nothing and does not hang; bf16 residuals take half the bytes."""
    m = net()
    state = register_fsdp(m, "threshold", threshold=1e9, quantize=False)
    loss_of(m, 0, rank).backward()
    assert all(not g.any() for g in local_grads(m).values())
    assert state.stats()["density"] == 0.0
    sizes = []
    for dtype in (None, "bfloat16"):
        m = net()
        state = register_fsdp(m, "topk", density=0.2, residual_dtype=dtype)
        loss_of(m, 0, rank).backward()
        sizes.append(state.stats()["residual_bytes"])
        assert all(r.dtype == (torch.bfloat16 if dtype else torch.float32) for r in state.feedback.residuals.values())
    assert sizes[1] * 2 == sizes[0] > 0


def check_errors(rank, world):
    with pytest.raises(TypeError, match="fully_shard"):
        register_fsdp(Net(), "topk")
    with pytest.raises(ValueError, match="does not take 'collective'"):
        register_fsdp(net(), "topk", collective="allgather")
    with pytest.raises(ValueError, match="variance"):
        register_fsdp(net(), "variance")
    layout = ShardLayout.of(net().fc1, {}, world)
    with pytest.raises(RuntimeError, match="register_fsdp"):
        layout.check(layout.numel + world, layout.chunk + 1, "test")


def exchange_checks(rank, world):
    check_density_one(rank, world)
    check_conservation(rank, world)
    check_no_selection_and_bf16(rank, world)
    check_errors(rank, world)
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_sparse_exchange(world):
    assert run_distributed(exchange_checks, world, timeout=240) == [True] * world


def test_register_fsdp_needs_a_process_group():
    with pytest.raises(RuntimeError, match="not initialised"):
        register_fsdp(Net(), "topk")


def hsdp_checks(rank, world):
    """2 replicas x 2 shards: at density 1.0 the same shards as FSDP2's native (dense) HSDP; at 0.2 every
    replica of a shard holds the same gradient, and the replica exchange is sparse."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    replicas = mesh.get_group("replicate")
    native = net(mesh=mesh)
    loss_of(native, 0, rank).backward()
    ours = net(mesh=mesh["shard"])
    register_fsdp(ours, "topk", density=1.0, replicate_group=replicas)
    loss_of(ours, 0, rank).backward()
    for n, g in local_grads(native).items():
        torch.testing.assert_close(local_grads(ours)[n], g, rtol=1e-6, atol=1e-8)
    m = net(mesh=mesh["shard"])
    state = register_fsdp(m, "topk", density=0.2, replicate_group=replicas)
    loss_of(m, 1, rank).backward()
    for n, g in local_grads(m).items():
        other = [torch.empty_like(g) for _ in range(2)]
        dist.all_gather(other, g, group=replicas)
        assert torch.equal(other[0], other[1]), n
    assert state.stats()["collectives"]["replicate_sparse_allreduce"] == 3
    return True


def test_hsdp_sparse_replicas():
    assert run_distributed(hsdp_checks, 4, timeout=240) == [True] * 4
