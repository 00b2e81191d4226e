"""Wire format of sparse payloads, and its byte accounting.

A payload travels as one ``uint8`` tensor so that a single collective moves indices and values together:

* general: ``nnz`` int32 indices followed by ``nnz`` values in the wire dtype (fp32, fp16 or bf16):
  ``nnz * (4 + value_bytes)`` bytes;
* packed (Strom 2015, every value is +/-tau): one int32 word per entry, ``index << 1 | sign``, the 31-bit index
  and the sign bit; ``nnz * 4`` bytes. tau itself is known to every rank (it is configuration).
"""

from __future__ import annotations

import torch

__all__ = ["encode", "decode", "payload_bytes", "INDEX_BYTES", "MAX_PACKED_NUMEL"]

INDEX_BYTES = 4
MAX_PACKED_NUMEL = 2**31  # a 31-bit index


def payload_bytes(nnz: int, value_dtype: torch.dtype, packed: bool = False) -> int:
    """Bytes of an encoded payload of ``nnz`` entries."""
    if packed:
        return nnz * INDEX_BYTES
    return nnz * (INDEX_BYTES + torch.empty(0, dtype=value_dtype).element_size())


def encode(indices: torch.Tensor, values: torch.Tensor, value_dtype: torch.dtype,
           constant: float | None = None) -> torch.Tensor:
    """Encode a payload into a flat uint8 tensor.

    Args:
        indices: ``(nnz,)`` integer positions, each < 2**31 (< 2**31 also for packed).
        values: ``(nnz,)`` floating values.
        value_dtype: dtype the values travel in (ignored when packed).
        constant: if not None, every value is +/-constant and the packed 4-byte format is used.
    """
    idx = indices.to(torch.int64)
    if constant is not None:
        word = (idx << 1) | (values < 0).to(torch.int64)
        return word.to(torch.int32).view(torch.uint8)
    return torch.cat([idx.to(torch.int32).view(torch.uint8), values.to(value_dtype).contiguous().view(torch.uint8)])


def decode(buf: torch.Tensor, value_dtype: torch.dtype,
           constant: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode`: returns ``(indices int64, values value_dtype)``."""
    buf = buf.contiguous() if buf.storage_offset() % 8 == 0 else buf.clone()
    if constant is not None:
        word = buf.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # undo sign extension of bit 31
        idx = word >> 1
        # masked_fill_, not values[mask] = ...: boolean indexing counts the mask first (a host sync on a GPU)
        values = torch.full((idx.numel(),), constant, dtype=value_dtype, device=buf.device)
        return idx, values.masked_fill_((word & 1).bool(), -constant)
    vbytes = torch.empty(0, dtype=value_dtype).element_size()
    nnz = buf.numel() // (INDEX_BYTES + vbytes)
    if nnz * (INDEX_BYTES + vbytes) != buf.numel():
        raise ValueError(f"corrupt sparse payload: {buf.numel()} bytes is not a multiple of "
                         f"{INDEX_BYTES + vbytes} (int32 index + {value_dtype} value)")
    idx = buf[: nnz * INDEX_BYTES].clone().view(torch.int32).to(torch.int64)
    values = buf[nnz * INDEX_BYTES:].clone().view(value_dtype)
    return idx, values
