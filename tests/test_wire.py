import pytest
import torch

from sparsedist.collectives.wire import decode, encode, payload_bytes
from sparsedist.payload import SparseGrad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_roundtrip(dtype):
    idx = torch.tensor([0, 7, 2**31 - 1, 12345])
    vals = torch.tensor([1.5, -2.25, 3.0, 0.0])
    buf = encode(idx, vals, dtype)
    assert buf.dtype == torch.uint8 and buf.numel() == payload_bytes(4, dtype)
    i2, v2 = decode(buf, dtype)
    assert torch.equal(i2, idx)
    assert torch.equal(v2, vals.to(dtype))


def test_strom_packing_is_four_bytes_per_entry_and_keeps_sign():
    idx = torch.tensor([3, 0, 2**31 - 1, 99])
    vals = torch.tensor([0.5, -0.5, -0.5, 0.5])
    buf = encode(idx, vals, torch.float32, constant=0.5)
    assert buf.numel() == 16 == payload_bytes(4, torch.float32, packed=True)
    i2, v2 = decode(buf, torch.float32, constant=0.5)
    assert torch.equal(i2, idx) and torch.equal(v2, vals)


def test_empty_and_misaligned():
    buf = encode(torch.empty(0, dtype=torch.int64), torch.empty(0), torch.float32)
    i, v = decode(buf, torch.float32)
    assert i.numel() == 0 and v.numel() == 0
    # a slice at an odd offset of a larger buffer still decodes
    big = torch.cat([torch.zeros(3, dtype=torch.uint8), encode(torch.tensor([5]), torch.tensor([2.0]), torch.float32)])
    i, v = decode(big[3:], torch.float32)
    assert i.tolist() == [5] and v.tolist() == [2.0]
    with pytest.raises(ValueError, match="corrupt"):
        decode(torch.zeros(7, dtype=torch.uint8), torch.float32)


def test_sparsegrad_validation_and_dense():
    p = SparseGrad(torch.tensor([1, 3]), torch.tensor([2.0, -1.0]), 5)
    assert p.to_dense().tolist() == [0, 2, 0, -1, 0] and p.nnz == 2 and p.density == 0.4
    with pytest.raises(ValueError):
        SparseGrad(torch.tensor([1, 2]), torch.tensor([1.0]), 5)
