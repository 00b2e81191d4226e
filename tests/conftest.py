"""Shared test set-up: every test that trains on MNIST reads the subset committed in tests/data (see its README).

``SPARSEDIST_MNIST`` is set for the whole session, so the examples, benchmarks and launch scripts that the tests run
as subprocesses (torchrun, mpirun, horovodrun, sbatch jobs) read the subset too; nothing outside the repository is
needed.
"""

import os
from pathlib import Path

import pytest

MNIST_SMALL = Path(__file__).resolve().parent / "data" / "mnist_small.npz"
os.environ["SPARSEDIST_MNIST"] = str(MNIST_SMALL)


@pytest.fixture
def mnist_small() -> Path:
    """The committed MNIST subset: 10,000 training and 2,000 test images (tests/data/README.md)."""
    return MNIST_SMALL
