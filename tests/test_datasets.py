"""sparsedist.datasets: MNIST from an .npz or an IDX folder (torchvision's MNIST/raw), clear errors, the converter."""

import gzip
import struct

import numpy as np
import pytest
import torch

from sparsedist import datasets


def _write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def _fake_mnist(n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
            "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "y_test": rng.integers(0, 10, n_test).astype(np.uint8)}


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder_and_npz_give_the_same_tensors(tmp_path, compress):
    arrays = _fake_mnist()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for key, name in datasets.IDX_FILES.items():
        _write_idx(raw / (name + (".gz" if compress else "")), arrays[key], compress)
    from_idx = datasets.load_mnist(raw)
    npz = tmp_path / "mnist.npz"
    np.savez(npz, **arrays)
    from_npz = datasets.load_mnist(npz)
    for a, b, key in zip(from_idx, from_npz, datasets.MNIST._fields):
        assert torch.equal(a, b), key
    assert from_npz.x_train.shape == (12, 1, 28, 28) and from_npz.x_train.dtype == torch.float32
    assert from_npz.y_test.dtype == torch.int64 and torch.equal(from_npz.y_test, torch.from_numpy(
        arrays["y_test"].astype(np.int64)))
    assert float(from_npz.x_train.max()) <= 1.0 and torch.equal(
        from_npz.x_train[3, 0], torch.from_numpy(arrays["x_train"][3].astype(np.float32) / 255.0))


def test_converter_writes_an_npz_the_loader_reads(tmp_path):
    arrays = _fake_mnist()
    for key, name in datasets.IDX_FILES.items():
        _write_idx(tmp_path / name, arrays[key], compress=False)
    out = tmp_path / "out" / "mnist.npz"
    datasets.main(["mnist", "--from", str(tmp_path), "--out", str(out)])
    back = datasets.read_mnist_arrays(out)
    for key in datasets.IDX_FILES:
        np.testing.assert_array_equal(back[key], arrays[key])


def test_path_resolution_argument_then_environment_then_default(tmp_path, monkeypatch):
    npz = tmp_path / "a.npz"
    np.savez(npz, **_fake_mnist())
    monkeypatch.setenv(datasets.MNIST_ENV, str(npz))
    assert datasets.mnist_path() == npz
    monkeypatch.delenv(datasets.MNIST_ENV)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data/mnist.npz \(the default\).*torchvision.datasets.MNIST"):
        datasets.mnist_path()
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "mnist.npz", **_fake_mnist())
    assert datasets.load_mnist().x_test.shape[0] == 5
    with pytest.raises(FileNotFoundError, match=r"missing.npz \(the argument\).*--data PATH"):
        datasets.load_mnist(tmp_path / "missing.npz")


def test_bad_files_are_named(tmp_path):
    arrays = _fake_mnist()
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=arrays["x_train"], y_train=arrays["y_train"])
    with pytest.raises(ValueError, match=r"no array\(s\) \['x_test', 'y_test'\]"):
        datasets.load_mnist(bad)
    arrays["x_test"] = arrays["x_test"].reshape(5, 784)
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="not MNIST-shaped"):
        datasets.load_mnist(bad)
    folder = tmp_path / "idx"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        datasets.load_mnist(folder)


def test_committed_subset_is_what_its_readme_says(mnist_small):
    d = datasets.load_mnist(mnist_small)
    assert [t.shape[0] for t in d] == [10_000, 10_000, 2_000, 2_000]
    assert set(d.y_train.tolist()) == set(range(10)) and set(d.y_test.tolist()) == set(range(10))


def test_packaged_text():
    text = datasets.tinyshakespeare()
    assert len(text) == 1_115_394 and text.startswith("First Citizen")
