"""Fully sparse training (RigL + top-k activations + meProp + mask-aware top-k exchange) of the char-level GPT
example, on 2 real gloo processes, with a tiny configuration."""

import importlib.util
from pathlib import Path

import pytest
import torch

from sparsedist.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 40, 10
TINY = ["--width", "32", "--layers", "2", "--heads", "2", "--block", "16", "--batch-size", "8", "--lr", "1e-2",
        "--steps", str(STEPS), "--eval-every", "20", "--eval-batches", "2", "--quiet", "--fully-sparse",
        "--rigl-every", str(EVERY), "--error-between", "0.25"]


def _example():
    spec = importlib.util.spec_from_file_location("char_gpt_example", ROOT / "examples" / "char_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fully_sparse_worker(rank, world_size, argv):
    example = _example()
    summary, model, rigl = example.train(example.build_parser().parse_args(argv))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n.removeprefix("module."): m.clone() for n, m in rigl.masks.items()}
    return summary, params, masks, rigl.mask_version


@pytest.fixture(scope="module")
def runs():
    return run_distributed(fully_sparse_worker, 2, args=(TINY,), timeout=150)


def test_ranks_stay_bit_identical(runs):
    (_, p0, m0, v0), (_, p1, m1, v1) = runs
    assert v0 == v1 >= 1, "RigL must have changed its masks, identically on both ranks"
    assert m0.keys() == m1.keys() and all(torch.equal(m0[n], m1[n]) for n in m0)
    assert p0.keys() == p1.keys()
    for name in p0:
        assert torch.equal(p0[name], p1[name]), f"{name} differs between the ranks"


def test_weights_outside_masks_are_exactly_zero_and_density_exact(runs):
    summary, params, masks, _ = runs[0]
    assert sorted(masks) == sorted(f"blocks.{b}.{n}.weight" for b in (0, 1) for n in ("qkv", "proj", "fc", "fc_out"))
    active = total = 0
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
        assert torch.all(params[name][~mask] == 0), f"{name} has non-zero weights outside its mask"
        assert torch.count_nonzero(params[name][mask]) > 0.5 * mask.sum()  # the active ones do train
        active, total = active + int(mask.sum()), total + mask.numel()
    assert active == round(0.1 * total)  # 90% weight sparsity, exact count
    weights = summary["sparsity"]["weights"]
    assert weights["nonzero_outside_masks"] == 0 and weights["sparsity"] == pytest.approx(1 - active / total)
    assert weights["mask_updates"] == 2  # steps 10 and 20; none from floor(0.75 * 40) = 30 on


def test_loss_decreases(runs):
    summary = runs[0][0]
    losses = summary["train_losses"]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    history = summary["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"] + 0.05 and history[-1]["val_loss"] < first - 0.5


def test_every_sparsity_level_is_reported(runs):
    summary = runs[0][0]
    s = summary["sparsity"]
    assert set(s["activations"]) == {"blocks.0.act.1", "blocks.1.act.1"}
    assert all(v >= 0.5 for v in s["activations"].values())  # top-k keeps ceil(0.5 * 128) = 64 of 128
    assert sorted(s["errors"]["meprop_layers"]) == ["blocks.0.fc", "blocks.1.fc"]  # the default --meprop-layers
    assert s["errors"]["meprop_max"] <= 0.1
    assert s["errors"]["between_blocks"] == 0.25
    g = s["gradients"]
    assert g["dense_steps"] == 2
    assert g["collectives"]["allreduce"] > 0 and g["collectives"]["allgather"] > 0  # dense steps; top-k steps
    assert 0 < g["bytes_sent"] < g["bytes_dense"] / 5 and 0 < g["density"] < 0.2


def test_fully_sparse_rejects_a_second_exchange_choice():
    example = _example()
    args = example.build_parser().parse_args(["--fully-sparse", "--compressor", "topk"])
    with pytest.raises(ValueError, match="--grad-compressor"):
        example.resolve_exchange(args)
    dense = example.build_parser().parse_args(["--compressor", "ddp", "--fully-sparse"])
    expect = {"density": 0.05, "value_dtype": "float32", "granularity": "bucket"}
    assert example.resolve_exchange(dense) == ("topk", expect)
