"""Structured pruning and export: which layer feeds which, the surgery (the smaller model computes exactly what
the original computes with the removed neurons' outgoing weights zeroed), L1 ranking, FLOPs, and the inference
exports (CSR, TorchScript loaded by a process that cannot import sparsedist)."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsedist.sparsity import (LayerPair, count_flops, export_dense, find_layer_pairs, fraction_for_flops,
                                 save_inference, select_neurons, storage_bytes, structured_prune,
                                 to_semi_structured, to_sparse_csr)
from sparsedist.sparsity.structured import l1_scores


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(12), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 20), nn.ReLU(), nn.Dropout(0.1), nn.Linear(20, 5))


def randomise_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


class Residual(nn.Module):
    """fc1's output is also added back: it cannot lose neurons on its own. fc2 -> fc3 can."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x)
        h = h + x
        return self.fc3(F.gelu(self.fc2(h)))


def test_find_layer_pairs():
    pairs = find_layer_pairs(cnn())
    assert pairs == [LayerPair("0", "4", "1", ("2", "3"), 1), LayerPair("4", "9", "6", ("5", "7", "8"), 16),
                     LayerPair("9", "12", None, ("10", "11"), 1)]
    assert [(p.producer, p.consumer) for p in find_layer_pairs(Residual())] == [("fc2", "fc3")]
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))
    assert find_layer_pairs(grouped) == []

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="LayerPair"):
        find_layer_pairs(Branchy())


@pytest.mark.parametrize("ranking", ["layer", "global"])
def test_structured_pruning_computes_the_masked_original_exactly(ranking):
    model = randomise_norms(cnn())
    pruned, kept = structured_prune(model, 0.4, ranking=ranking)
    assert isinstance(pruned, nn.Sequential) and type(pruned[0]) is nn.Conv2d  # plain torch modules
    assert pruned[0].out_channels == pruned[1].num_features == pruned[4].in_channels == kept["0"].numel()
    assert pruned[4].out_channels == pruned[6].num_features == kept["4"].numel()
    assert pruned[9].in_features == 16 * kept["4"].numel() and pruned[12].in_features == kept["9"].numel()
    if ranking == "layer":
        assert {k: v.numel() for k, v in kept.items()} == {"0": 5, "4": 7, "9": 12}
    else:
        assert sum(v.numel() for v in kept.values()) == 40 - round(0.4 * 40)
    # the reference: the original with every removed neuron's outgoing weights set to zero
    masked = randomise_norms(cnn())
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for pair in find_layer_pairs(masked):
            cons = dict(masked.named_modules())[pair.consumer]
            gone = torch.ones(dict(masked.named_modules())[pair.producer].weight.shape[0], dtype=torch.bool)
            gone[kept[pair.producer]] = False
            if isinstance(cons, nn.Linear):
                cons.weight.view(cons.weight.shape[0], -1, pair.repeat)[:, gone] = 0
            else:
                cons.weight[:, gone] = 0
    x = torch.randn(6, 1, 16, 16)
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    assert count_flops(pruned, x[:1]) < count_flops(model, x[:1])
    # the original is untouched
    assert model[0].out_channels == 8


def test_l1_ranking_and_per_layer_fractions():
    model = cnn()
    with torch.no_grad():
        model[0].weight[3].mul_(100)  # filter 3 has by far the largest L1 norm
        model[0].weight[6].mul_(1e-3)  # filter 6 the smallest
    scores = l1_scores(model, find_layer_pairs(model))
    assert torch.allclose(scores["0"], model[0].weight.abs().sum(dim=(1, 2, 3)))
    kept = select_neurons(scores, {"0": 0.5}, "layer")
    assert 3 in kept["0"].tolist() and 6 not in kept["0"].tolist() and kept["0"].numel() == 4
    assert kept["4"].numel() == 12  # not listed: untouched
    assert torch.equal(kept["0"], kept["0"].sort().values)
    everything = select_neurons(scores, 0.99, "layer", min_keep=2)
    assert all(v.numel() == 2 for v in everything.values())
    with pytest.raises(ValueError, match="not prunable"):
        select_neurons(scores, {"12": 0.5})
    with pytest.raises(ValueError, match="ranking"):
        select_neurons(scores, 0.5, "random")


def test_round_to_keeps_multiples_and_the_best_ranked():
    scores = {"a": torch.arange(16.0), "b": torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0]), "c": torch.arange(32.0)}
    kept = select_neurons(scores, 0.25, "layer", round_to=4)  # a: 12 -> 12; b: 4 -> 4; c: 24 -> 24
    assert [kept[n].numel() for n in "abc"] == [12, 4, 24]
    kept = select_neurons(scores, 0.3, "layer", round_to=8)  # a: 11 -> 8; b: 4 -> all 5 (capped); c: 22 -> 16
    assert kept["a"].tolist() == list(range(8, 16)) and kept["b"].tolist() == [0, 1, 2, 3, 4]
    assert kept["c"].tolist() == list(range(16, 32))
    small = select_neurons({"a": torch.arange(16.0)}, 0.9, "layer", round_to=4)  # 2 kept -> grown to the best 4
    assert small["a"].tolist() == [12, 13, 14, 15]
    glob = select_neurons(scores, 0.3, "global", round_to=4)
    assert all(v.numel() % 4 == 0 or v.numel() == scores[n].numel() for n, v in glob.items())
    with pytest.raises(ValueError, match="round_to"):
        select_neurons(scores, 0.3, round_to=0)


def test_round_to_through_the_surgery_and_the_flops_search():
    model = randomise_norms(cnn())
    x = torch.randn(4, 1, 16, 16)
    f = fraction_for_flops(model, x[:1], 0.5, round_to=4)
    pruned, kept = structured_prune(model, f, round_to=4)
    assert all(v.numel() % 4 == 0 for v in kept.values())
    assert count_flops(pruned, x[:1]) <= 0.5 * count_flops(model, x[:1])
    assert pruned(x).shape == (4, 5)


def test_flops_and_the_fraction_that_halves_them():
    model = cnn().eval()
    x = torch.randn(1, 1, 16, 16)
    expected = 16 * 16 * 8 * 9 + 8 * 8 * 12 * 8 * 9 + 192 * 20 + 20 * 5
    assert count_flops(model, x) == expected
    f = fraction_for_flops(model, x, 0.5)
    half, _ = structured_prune(model, f)
    assert count_flops(half, x) <= 0.5 * expected
    more, _ = structured_prune(model, max(0.0, f - 0.02))
    assert count_flops(more, x) > 0.5 * expected


def test_csr_export_matches_and_loads_without_sparsedist(tmp_path):
    model = randomise_norms(cnn())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand_like(m.weight) > 0.8)
    sparse = to_sparse_csr(model)
    assert [type(m).__name__ for m in sparse.modules()].count("CSRConv2d") == 2
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)
    assert storage_bytes(sparse) < 0.5 * storage_bytes(model)
    # a strided, dilated, biasless convolution
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, bias=False)
    z = torch.randn(2, 3, 9, 11)
    torch.testing.assert_close(to_sparse_csr(nn.Sequential(conv))(z), conv(z), rtol=1e-5, atol=1e-5)
    path = tmp_path / "model.pt"
    save_inference(sparse, path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "want.pt")
    # a fresh interpreter that cannot import sparsedist runs it
    code = textwrap.dedent(f"""
        import sys
        sys.path = [p for p in sys.path if p not in ('', '.')]
        sys.modules['sparsedist'] = None
        import torch
        m = torch.jit.load({str(path)!r})
        out = m(torch.load({str(tmp_path / 'x.pt')!r}))
        torch.testing.assert_close(out, torch.load({str(tmp_path / 'want.pt')!r}), rtol=1e-5, atol=1e-5)
        print('ok')
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_dense_export_and_the_cpu_limit_of_two_four():
    model = cnn()
    pruned, _ = structured_prune(model, 0.5)
    out = export_dense(pruned)
    assert not out.training and not any(p.requires_grad for p in out.parameters())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            to_semi_structured(nn.Sequential(nn.Linear(64, 64)))


def test_batchnorm_folding_on_export():
    model = randomise_norms(cnn())
    out = export_dense(model)
    assert isinstance(out[1], nn.Identity) and isinstance(out[6], nn.BatchNorm2d)  # 6 follows a ReLU: kept
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched
