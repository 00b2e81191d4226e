"""Probe: naturally sparse gradients (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``).

DDP hands the hook such a parameter's COO gradient in a bucket of its own. Every compressor must exchange it as
it is (its rows need no selection): the embedding trains exactly as under plain DDP (``"none"``), every rank
ends each step with identical parameters, and a non-finite value on one rank makes every rank skip the step.
Before the fix every compressor failed at step 0 with "Cannot access data pointer of Tensor that doesn't have
storage".
"""

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsedist
from sparsedist.collectives import CostModel
from sparsedist.testing import run_distributed

STEPS = 4
CASES = {
    "none": ("none", {}),
    "topk": ("topk", dict(density=0.1)),
    "threshold": ("threshold", dict(threshold=0.01)),
    "randk": ("randk", dict(density=0.1)),
    "wangni": ("randk", dict(density=0.1, variant="wangni")),
    "variance": ("variance", dict(alpha=1.0)),
    "dgc": ("dgc", dict(density=0.1)),
    "topk/gtopk": ("topk", dict(density=0.1, collective="gtopk")),
    "topk/auto": ("topk", dict(density=0.1, collective="auto", cost_model=CostModel(alpha=1e-5, beta=1e-7),
                               auto_trials=0)),
    "topk/timeout": ("topk", dict(density=0.1, timeout=60.0)),
    "topk/bucket granularity": ("topk", dict(density=0.1, granularity="bucket")),
    "topk/fp16 values": ("topk", dict(density=0.1, value_dtype="float16")),
}


class Recommender(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.items = nn.Embedding(100, 8, sparse=True)
        self.users = nn.EmbeddingBag(50, 8, mode="sum", sparse=True)
        self.head = nn.Linear(8, 1)

    def forward(self, items, users, x):
        # the embeddings' gradients do not depend on the (compressed) head: they must train as under plain DDP
        return ((self.items(items) - 1).pow(2).mean() + (self.users(users) + 1).pow(2).mean()
                + self.head(x).pow(2).mean())


def _batch(g):
    return (torch.randint(0, 100, (6,), generator=g), torch.randint(0, 50, (6, 3), generator=g),
            torch.randn(6, 8, generator=g))


def _run_case(rank, compressor, options, overflow):
    model = Recommender()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1000) if overflow else None
    opts = dict(options, grad_scaler=scaler)
    if compressor == "dgc":
        opts["optimizer"] = opt
    state = sparsedist.register(ddp, compressor, **opts)
    g = torch.Generator().manual_seed(rank)
    unmoved = None
    for step in range(STEPS):
        loss = ddp(*_batch(g))
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
            continue
        if step == 2 and rank == 1:
            loss = loss * float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step == 2:
            unmoved = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    stats = state.stats()
    return ([p.detach().clone() for p in (model.items.weight, model.users.weight)],
            torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            stats["collectives"].get("sparse_rows", 0), stats["overflow_steps"], unmoved)


def _worker(rank, ws):
    torch.set_num_threads(1)
    out = {name: _run_case(rank, *case, False) for name, case in CASES.items()}
    out["overflow"] = {name: _run_case(rank, *CASES[name], True) for name in ("topk", "threshold", "dgc")}
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2, timeout=240, collective_timeout=60)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sparse_gradients_are_exchanged_as_they_are(results, name):
    reference = results[0]["none"][0]
    for rank, r in enumerate(results):
        embeddings, params, rows, _, _ = r[name]
        assert torch.equal(params, results[0][name][1]), f"{name}: rank {rank} differs from rank 0"
        for got, want in zip(embeddings, reference):  # the embeddings train as under plain DDP
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        if name != "none":
            assert rows == 2 * STEPS, f"{name}: {rows} sparse-row exchanges"


@pytest.mark.parametrize("name", ["topk", "threshold", "dgc"])
def test_a_non_finite_sparse_gradient_on_one_rank_skips_the_step_everywhere(results, name):
    for r in results:
        _, params, _, overflow_steps, unmoved = r["overflow"][name]
        assert overflow_steps == 1 and unmoved, (name, overflow_steps, unmoved)
        assert torch.equal(params, results[0]["overflow"][name][1])
