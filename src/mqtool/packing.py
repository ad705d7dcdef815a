"""int4 codes two a byte: the one packing every mqtool file and kernel uses.

Low nibble = the even index of the last axis, high nibble = the odd one, two's complement
(``-8..7``). Exported 4-bit weights (``[out, in / 2]``), the runtime's 4-bit state cache
(``[..., N / 2]``) and the Triton kernels that read them all follow it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mqtool.errors import MqtoolError

__all__ = ["pack_int4", "unpack_int4"]


def pack_int4(q: Tensor) -> Tensor:
    """int8 codes in [-8, 7], ``[..., n]`` with n even -> uint8 ``[..., n / 2]``."""
    if q.shape[-1] % 2:
        raise MqtoolError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., n / 2]`` -> int8 codes ``[..., n]``."""
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    return torch.stack((lo, hi), dim=-1).flatten(-2).to(torch.int8)
