"""Ephemeral-sparsity ops inside a tiny GPT-style model under DDP on real gloo processes."""

import pytest
import torch
from torch import nn

import sparsedist.nn as snn
from sparsedist.testing import run_distributed

VOCAB, D, T = 12, 16, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, error_k):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.zeros(T, D))
        self.blocks = nn.ModuleList([Block(), Block()])
        self.between = snn.SparseError(error_k)  # sparsifies the error flowing from block 1 into block 0
        self.head = nn.Linear(D, VOCAB)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        x = self.blocks[0](x)
        x = self.between(x)
        return self.head(self.blocks[1](x))


def ddp_worker(rank, world_size, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)  # same initial model everywhere
    model = TinyGPT(error_k=0.25)
    converted = snn.convert_linear_to_sparse_backprop(model, 0.1, filter=lambda n, m: ".mlp." in n)
    swapped = snn.sparsify_activations(model, k=0.25)
    ddp = DDP(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    losses, rows = [], []
    meter = snn.ActivationSparsityMeter(model)
    for _ in range(steps):
        start = torch.randint(0, VOCAB, (16, 1), generator=g)
        seq = (start + torch.arange(T + 1)) % VOCAB  # next token = current + 1: learnable
        opt.zero_grad()
        logits = ddp(seq[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
        loss.backward()
        rows.append(int((model.blocks[0].mlp[0].weight.grad != 0).any(1).sum()))
        opt.step()
        losses.append(loss.item())
    meter.remove()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {
        "converted": converted,
        "swapped": swapped,
        "losses": losses,
        "rows": rows,
        "params": flat,
        "act_sparsity": meter.overall(),
    }


def test_sparse_gpt_under_ddp():
    # The ops are rank-local; what DDP adds is the averaging of meProp's row-sparse weight gradients
    # (the union of the ranks' column choices survives) and the requirement that ranks stay identical.
    world_size = 2
    res = run_distributed(ddp_worker, world_size, args=(30,), timeout=180)
    r0 = res[0]
    assert r0["converted"] == ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2"]
    assert r0["swapped"] == ["blocks.0.mlp.1", "blocks.1.mlp.1"]
    for r in res[1:]:
        assert torch.equal(r["params"], r0["params"])  # ranks stay identical
    k = 7  # ceil(0.1 * 64) columns per rank; DDP averages, so the union over ranks survives
    for r in res:
        assert all(k <= n <= world_size * k for n in r["rows"])
        assert r["losses"][-1] < 0.7 * r["losses"][0]
        assert r["act_sparsity"] == pytest.approx(0.75)
