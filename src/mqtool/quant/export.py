"""Export: simulated weights -> packed integer codes + scales, and back.

A simulated checkpoint stores each quantized weight as its dequantized value ``q * scale``. Export
replaces `<linear>.weight` by
  * `<linear>.weight_q`: the codes — int8 ``[out, in]`` for 5–8 bits; for 4 bits (and fewer) uint8
    ``[out, in / 2]``, two two's-complement nibbles a byte, the even column in the low nibble;
  * `<linear>.weight_scale`: float32 ``[out, 1]`` (per channel) or ``[out, in / group_size]``;
exactly the codes and scales of `quant.quantizers` (symmetric, ``[-qmax, qmax]``), which the integer
kernels consume as they are. Loading an exported checkpoint dequantizes them back to the very
weights the simulated model had, so its perplexity equals the simulated one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mqtool.errors import MqtoolError
from mqtool.packing import pack_int4, unpack_int4
from mqtool.quant.quantizers import dequantize_weight
from mqtool.quant.weights import weight_codes


def _packed(bits: int) -> bool:
    return bits <= 4


def export_state_dict(state: dict[str, Tensor], specs: dict[str, dict[str, Any]]) -> dict[str, Tensor]:
    """Replace every weight named in `specs` (`<linear>.weight` -> {"bits", "group_size"}) by its
    codes and scales. Raises when a weight is not on the grid its spec records."""
    out = dict(state)
    for name, spec in specs.items():
        if name not in out:
            raise MqtoolError(f"the manifest quantizes {name}, which is not in the weights")
        w = out.pop(name)
        if w.dtype != torch.float32:  # written by mqtool < 0.1 in the compute dtype: the codes are lost
            raise MqtoolError(f"{name} is stored in {str(w.dtype).removeprefix('torch.')}, which cannot hold "
                              "its quantized values exactly: quantize the model again with this mqtool "
                              "(it stores quantized weights in float32)")
        try:
            q, scale = weight_codes(w, spec)
        except MqtoolError as e:
            raise MqtoolError(f"{name}: {e}; it was changed after quantization, or the checkpoint is damaged") \
                from None
        base = name[: -len(".weight")]
        out[f"{base}.weight_q"] = pack_int4(q) if _packed(spec["bits"]) and q.shape[1] % 2 == 0 else q
        out[f"{base}.weight_scale"] = scale.float().contiguous()
    return out


def pop_codes(state: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor]:
    """Remove and return the codes and scales stored for weight `name` (`<linear>.weight`)."""
    base = name[: -len(".weight")]
    try:
        return state.pop(f"{base}.weight_q"), state.pop(f"{base}.weight_scale")
    except KeyError:
        raise MqtoolError(f"exported checkpoint lacks the codes or scales of {name}") from None


def import_state_dict(state: dict[str, Tensor], specs: dict[str, dict[str, Any]]) -> dict[str, Tensor]:
    """Inverse of export_state_dict: codes and scales -> the dequantized float32 weights."""
    out = dict(state)
    for name, spec in specs.items():
        q, scale = pop_codes(out, name)
        if q.dtype == torch.uint8:
            q = unpack_int4(q)
        out[name] = dequantize_weight(q, scale, spec.get("group_size"))
    return out
