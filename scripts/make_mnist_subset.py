"""Write the MNIST subset the tests use (tests/data/mnist_small.npz) from a full copy of MNIST.

    python scripts/make_mnist_subset.py --data PATH/TO/mnist.npz      # or an IDX folder; see sparsedist.datasets

Keeps the first 10,000 training and the first 2,000 test images, in their original order, as uint8 (about 2 MB
compressed). tests/data/README.md records the source and the checksums.
"""

import argparse
from pathlib import Path

import numpy as np

from sparsedist.datasets import read_mnist_arrays

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "mnist_small.npz"

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", required=True, help="the full MNIST (.npz or IDX folder)")
p.add_argument("--train", type=int, default=10_000)
p.add_argument("--test", type=int, default=2_000)
p.add_argument("--out", type=Path, default=OUT)
args = p.parse_args()
a = read_mnist_arrays(args.data)
subset = {"x_train": a["x_train"][:args.train], "y_train": a["y_train"][:args.train].astype(np.uint8),
          "x_test": a["x_test"][:args.test], "y_test": a["y_test"][:args.test].astype(np.uint8)}
np.savez_compressed(args.out, **subset)
print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
      f"{args.train} training images, {args.test} test images")
