"""sparsedist.fsdp.training_memory: the bytes a training step keeps, by kind, storage shared counted once."""

import torch
from torch import nn

from sparsedist.fsdp import storage_bytes, training_memory
from sparsedist.optim import PackedAdamW
from sparsedist.sparsity import StaticSparsity


def test_storage_shared_by_views_counts_once():
    flat = torch.zeros(100)
    assert storage_bytes([flat[:10], flat[50:], None]) == 400
    assert storage_bytes([torch.zeros(3), torch.zeros(5, dtype=torch.float16)]) == 22


def test_training_memory_by_kind():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 50), nn.Linear(50, 10))
    opt = PackedAdamW(model.parameters(), lr=1e-3)
    masks = StaticSparsity(model, opt, density=0.2, distribution="uniform")
    opt.attach_masks(masks)
    model(torch.randn(3, 40)).sum().backward()
    before = training_memory(model, opt, masks=masks)
    active = sum(int(m.sum()) for m in masks.masks.values())
    dense = 50 + 10  # the biases
    assert before["weights"] == 4 * (40 * 50 + 50 + 50 * 10 + 10)
    assert before["gradients"] == 4 * (active + dense)  # masked gradients packed, biases dense
    assert before["optimizer"] == 4 * active  # the positions, cached by the hook; no moments before the first step
    assert before["masks"] == 40 * 50 + 50 * 10 and before["residuals"] == 0
    opt.step()
    after = training_memory(model, opt, masks=masks)
    assert after["optimizer"] == 4 * (2 * (active + dense) + active) and after["optimizer_index"] == 4 * active
    assert after["total"] == sum(after[k] for k in ("weights", "gradients", "optimizer", "residuals", "masks"))
