"""The integer inference path: an exported checkpoint run through the integer kernels.

`load_model` dequantizes an exported checkpoint back to simulated float weights; here each exported
linear is instead replaced by an :class:`IntLinear`, which keeps the packed codes and scales and
computes

    x = input_transform(x)                                   # e.g. the online Hadamard, unchanged
    q_x, s_x = act_quant(x)                                  # per-token int8 codes [M, K], fp32 [M, 1]
    y = int8_matmul / w4a8_matmul(q_x, s_x, weight_q, weight_scale, bias)

with :mod:`mqtool.kernels` (Triton on CUDA, or on CPU under ``TRITON_INTERPRET=1``; their PyTorch
references otherwise). The codes of ``x`` are bit for bit those of the simulated model's
``ActQuantizer`` and the int32 products are exact, so a linear's output differs from the simulated
``F.linear(q_x * s_x, q_w * s_w)`` only by fp32 rounding of the scaled accumulate. Everything else
in the model (SSM, conv, norms, other online modules) runs as in the simulated model.

An :class:`IntLinear` needs the activation quantizer the simulated model had at that input: a
dynamic per-token one (the kernels' format), or a static per-tensor one (its scale broadcast to
every row). A weight-only export (no ``--acts``) has no integer-activation form: it is refused.

"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mqtool import kernels
from mqtool.checkpoint import Checkpoint, build_model, load_checkpoint
from mqtool.errors import MqtoolError
from mqtool.models import MambaLMHeadModel
from mqtool.models.layers import Linear
from mqtool.quant.export import pop_codes
from mqtool.quant.quantizers import ActQuantizer, quantize_per_tensor

__all__ = ["IntLinear", "kernel_backend", "load_integer_model", "model_bytes", "tensor_bytes"]

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class IntLinear(nn.Module):
    """A quantized linear on integer codes: ``weight_q`` int8 ``[N, K]`` (or uint8 ``[N, K/2]``,
    two int4 codes a byte, low nibble = even column), ``weight_scale`` fp32 ``[N, 1]`` or
    ``[N, K / group_size]``, an optional bias, and the simulated linear's ``input_transform``.

    ``act_bits`` is the activation quantizer's width (8 for W8A8 / W4A8; codes are int8 whatever
    it is). ``act_scale`` None means dynamic per-token activation scales; a 0-d fp32 tensor is a
    static per-tensor scale (the same for every token)."""

    weight_q: Tensor
    weight_scale: Tensor
    act_scale: Tensor | None

    def __init__(self, weight_q: Tensor, weight_scale: Tensor, bits: int, group_size: int | None,
                 in_features: int, bias: Tensor | None = None, input_transform: nn.Module | None = None,
                 act_bits: int = 8, act_scale: Tensor | None = None) -> None:
        super().__init__()
        packed = weight_q.dtype == torch.uint8
        if weight_q.dtype not in (torch.int8, torch.uint8) or weight_q.dim() != 2:
            raise MqtoolError(f"weight codes must be int8 [N, K] or packed uint8 [N, K/2], got "
                              f"{weight_q.dtype} {tuple(weight_q.shape)}")
        if packed and (bits > 4 or weight_q.shape[1] * 2 != in_features):
            raise MqtoolError(f"packed int4 codes {tuple(weight_q.shape)} do not fit {bits}-bit weights with "
                              f"{in_features} inputs")
        if not packed and weight_q.shape[1] != in_features:
            raise MqtoolError(f"int8 codes {tuple(weight_q.shape)} do not fit {in_features} inputs")
        n_out = weight_q.shape[0]
        n_groups = 1 if group_size is None else in_features // group_size
        if group_size is not None and (group_size <= 0 or in_features % group_size):
            raise MqtoolError(f"group_size {group_size} does not divide {in_features} inputs")
        if tuple(weight_scale.shape) != (n_out, n_groups):
            raise MqtoolError(f"weight scales {tuple(weight_scale.shape)} do not match {n_out} outputs in "
                              f"{n_groups} group(s)")
        if not 2 <= act_bits <= 8:
            raise MqtoolError(f"the integer kernels take 2- to 8-bit activations, got {act_bits}")
        self.in_features, self.out_features = in_features, n_out
        self.bits, self.act_bits, self.packed = bits, act_bits, packed
        # one group spanning K is per channel: the kernels' per-channel path (no group loop)
        self.group_size = None if n_groups == 1 else group_size
        self.register_buffer("weight_q", weight_q.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.register_parameter("bias", bias)
        self.register_buffer("act_scale", None if act_scale is None else act_scale.float().reshape(()))
        self.input_transform: nn.Module = input_transform if input_transform is not None else nn.Identity()

    @classmethod
    def from_linear(cls, lin: Linear, weight_q: Tensor, weight_scale: Tensor, bits: int,
                    group_size: int | None, name: str = "linear") -> IntLinear:
        """The integer twin of a simulated `lin`: its bias and input transform, and the scales of
        its activation quantizer, which must be 8-bit or narrower, per token or calibrated per tensor."""
        aq = lin.input_quantizer
        if not isinstance(aq, ActQuantizer):
            raise MqtoolError(f"{name} has quantized weights but no activation quantizer: the integer kernels "
                              "need integer activations (quantize with --acts 8), or evaluate without --kernels")
        act_scale = None
        if aq.mode == "per_tensor":
            if aq.scale is None:
                raise MqtoolError(f"{name}'s per-tensor activation quantizer has no scale")
            act_scale = aq.scale.detach()
        elif aq.mode != "per_token":
            raise MqtoolError(f"{name}: activation quantization mode {aq.mode!r} has no integer kernel")
        return cls(weight_q, weight_scale, bits, group_size, lin.in_features, lin.bias, lin.input_transform,
                   aq.bits, act_scale)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_transform(x)
        if x.dtype not in _OUT_DTYPES:
            raise MqtoolError(f"the integer kernels take float32 / bfloat16 / float16 inputs, got {x.dtype}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.act_scale is None:
            q_x, s_x = kernels.act_quant(x2, self.act_bits)
        else:  # static scale: the simulated model's codes, its one scale on every row
            q_x = quantize_per_tensor(x2, self.act_scale, self.act_bits)
            s_x = self.act_scale.reshape(1, 1).expand(x2.shape[0], 1)
        matmul = kernels.w4a8_matmul if self.packed else kernels.int8_matmul
        y = matmul(q_x, s_x, self.weight_q, self.weight_scale, self.bias, self.group_size, x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        fmt = "int4 packed" if self.packed else "int8"
        gs = "per channel" if self.group_size is None else f"group {self.group_size}"
        act = "per token" if self.act_scale is None else "per tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, W{self.bits}A{self.act_bits} "
                f"({fmt}, {gs}; activations {act}), bias={self.bias is not None}")


def _placeholder(shape: tuple[int, int], dtype: torch.dtype, device: str | torch.device) -> Tensor:
    """A weight of the right shape that takes no memory (one element, expanded). `build_model`'s
    `.to(device, dtype)` leaves it as it is, and it is dropped when its linear becomes an IntLinear."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def load_integer_model(spec: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       revision: str | None = None, token: str | None = None
                       ) -> tuple[MambaLMHeadModel, Checkpoint]:
    """An exported checkpoint as a model whose exported linears are :class:`IntLinear` (packed
    codes and scales as stored, no float copy of those weights is ever made); the rest is built
    as `load_model` builds it. Returns (model, checkpoint) like `load_model`."""
    ckpt = load_checkpoint(spec, revision, token)
    if not ckpt.manifest.exported:
        raise MqtoolError(f"{spec} is not an exported checkpoint: the integer kernels read packed codes and "
                          "scales; run `mqtool export` on it first")
    specs = ckpt.manifest.quant.get("weights", {})
    if not specs:
        raise MqtoolError(f"{spec}: the manifest records no exported weights")
    state = dict(ckpt.state_dict)
    codes: dict[str, tuple[Tensor, Tensor, dict[str, Any]]] = {}
    for name, wspec in specs.items():
        base = name[: -len(".weight")]
        q, scale = pop_codes(state, name)
        k = q.shape[1] * 2 if q.dtype == torch.uint8 else q.shape[1]
        state[name] = _placeholder((q.shape[0], k), dtype, device)
        codes[base] = (q, scale, wspec)
    model = build_model(ckpt.config, state, dtype, device, ckpt.manifest.online)
    for base, (q, scale, wspec) in codes.items():
        lin = model.get_submodule(base)
        if not isinstance(lin, Linear):
            raise MqtoolError(f"{base} is not a linear layer of this model")
        parent, _, child = base.rpartition(".")
        int_lin = IntLinear.from_linear(lin, q.to(device), scale.to(device), wspec["bits"],
                                        wspec.get("group_size"), base)
        setattr(model.get_submodule(parent) if parent else model, child, int_lin)
    return model.eval(), ckpt


# ------------------------------------------------------------------------------------ benchmark


def kernel_backend(model: nn.Module) -> str | None:
    """What runs the model's IntLinears: "triton", "triton-interpreter", "pytorch-reference"
    ("+pytorch-reference" when some group size is not a multiple of 32), or None when it has none
    (a simulated model)."""
    lins = [m for m in model.modules() if isinstance(m, IntLinear)]
    if not lins:
        return None
    device = lins[0].weight_q.device.type
    if kernels.HAS_TRITON and device == "cuda":
        name = "triton"
    elif kernels.INTERPRET and device == "cpu":
        name = "triton-interpreter"
    else:
        return "pytorch-reference"
    # the GEMM kernel takes group sizes that are multiples of 32; other groups run the reference
    odd = any(m.group_size is not None and m.group_size % 32 for m in lins)
    return f"{name}+pytorch-reference" if odd else name


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors (an iterable, nested tuples / lists allowed)."""
    total = 0
    for t in tensors:
        if isinstance(t, Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, (tuple, list)):
            total += tensor_bytes(t)
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied weight counted once)."""
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
