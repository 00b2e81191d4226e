"""The data the examples, benchmarks and tests read: MNIST from a file you provide, tinyshakespeare from the package.

MNIST does not ship with sparsedist (11 MB; the tests use a 10k/2k subset committed under ``tests/data``). Point
the examples at a copy with ``--data PATH`` or ``SPARSEDIST_MNIST=PATH``; by default they look for
``data/mnist.npz`` under the current directory. Two formats are read:

- an ``.npz`` with ``x_train`` (N, 28, 28) uint8, ``y_train`` (N,) integer labels 0..9, ``x_test``, ``y_test``;
- a directory holding the four original IDX files (``train-images-idx3-ubyte`` etc., optionally ``.gz``), which is
  what ``torchvision.datasets.MNIST(root, download=True)`` writes into ``root/MNIST/raw``.

``python -m sparsedist.datasets mnist --from DIR --out data/mnist.npz`` converts the IDX files into the npz.
"""

from __future__ import annotations

import argparse
import gzip
import os
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

MNIST_ENV = "SPARSEDIST_MNIST"
DEFAULT_MNIST = Path("data") / "mnist.npz"
IDX_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
HOW_TO_GET_MNIST = (
    "Get MNIST with torchvision: `torchvision.datasets.MNIST('DIR', download=True)` writes the IDX files to "
    "DIR/MNIST/raw, which can be passed as it is; or convert them once with "
    "`python -m sparsedist.datasets mnist --from DIR/MNIST/raw --out data/mnist.npz`. "
    f"Then pass --data PATH or set {MNIST_ENV}=PATH.")


class MNIST(NamedTuple):
    """MNIST as tensors: images (N, 1, 28, 28) float32 in [0, 1], labels (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def mnist_path(path: str | os.PathLike | None = None) -> Path:
    """Where MNIST is read from: ``path`` if given, else ``$SPARSEDIST_MNIST``, else ``./data/mnist.npz``.

    Raises ``FileNotFoundError`` naming the path tried and how to get the data when nothing is there.
    """
    if path:
        where, source = Path(path).expanduser(), "the argument"
    elif os.environ.get(MNIST_ENV):
        where, source = Path(os.environ[MNIST_ENV]).expanduser(), f"${MNIST_ENV}"
    else:
        where, source = DEFAULT_MNIST, "the default"
    if not where.exists():
        raise FileNotFoundError(f"MNIST not found at {where} ({source}). {HOW_TO_GET_MNIST}")
    return where


def read_mnist_arrays(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The four raw arrays (uint8 images (N, 28, 28), int64 labels) from an ``.npz`` or an IDX directory.

    Raises ``FileNotFoundError`` naming the path tried and how to get the data, ``ValueError`` for a file that is
    not MNIST-shaped.
    """
    where = mnist_path(path)
    if where.is_dir():
        arrays = {key: _read_idx(_find_idx(where, name)) for key, name in IDX_FILES.items()}
    else:
        with np.load(where) as npz:
            missing = [k for k in IDX_FILES if k not in npz.files]
            if missing:
                raise ValueError(f"{where} has no array(s) {missing}; an MNIST .npz holds x_train, y_train, "
                                 f"x_test, y_test. {HOW_TO_GET_MNIST}")
            arrays = {k: npz[k] for k in IDX_FILES}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
            raise ValueError(f"{where}: x_{split} {x.shape} / y_{split} {y.shape} are not MNIST-shaped "
                             f"((N, 28, 28) images, (N,) labels)")
    return {k: (v.astype(np.uint8) if k.startswith("x") else v.astype(np.int64)) for k, v in arrays.items()}


def load_mnist(path: str | os.PathLike | None = None) -> MNIST:
    """MNIST as float tensors (see :class:`MNIST`); ``path`` as in :func:`mnist_path`."""
    a = read_mnist_arrays(path)

    def images(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)

    return MNIST(images(a["x_train"]), torch.from_numpy(a["y_train"]), images(a["x_test"]),
                 torch.from_numpy(a["y_test"]))


def tinyshakespeare() -> str:
    """The tinyshakespeare text that ships inside the package (1,115,394 characters, char-rnn's corpus)."""
    return resources.files("sparsedist").joinpath("data/tinyshakespeare.txt").read_text(encoding="utf-8")


def _find_idx(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder} has no {name} (or {name}.gz): an MNIST IDX folder holds "
                            f"{', '.join(IDX_FILES.values())}. {HOW_TO_GET_MNIST}")


def _read_idx(path: Path) -> np.ndarray:
    """One IDX file (big-endian header: 2 zero bytes, type code 0x08 = uint8, rank, then one uint32 per dim)."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    rank = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} bytes of data for dimensions {dims}")
    return body.reshape(dims)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparsedist.datasets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("mnist", help="convert MNIST's IDX files (torchvision's MNIST/raw) into one .npz")
    conv.add_argument("--from", dest="source", required=True, help="folder with the four IDX files")
    conv.add_argument("--out", default=str(DEFAULT_MNIST), help="the .npz to write (default: data/mnist.npz)")
    args = parser.parse_args(argv)
    arrays = read_mnist_arrays(args.source)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: {arrays['x_train'].shape[0]} training and {arrays['x_test'].shape[0]} test images")


if __name__ == "__main__":
    main()
