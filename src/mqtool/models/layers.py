"""Building blocks shared by both mixers: the linear layer with attachment points, norms, conv.

Attachment points are identity modules owned by the model; a method replaces them (with a
quantizer, a Hadamard, ...) and the model never needs to know which method did it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """`nn.Linear` whose input passes `input_transform` (e.g. an online Hadamard) then
    `input_quantizer` (activation quantization). Every linear in the model goes through here, in
    every mode, so nothing bypasses what is attached."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kw) -> None:
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.input_transform: nn.Module = nn.Identity()
        self.input_quantizer: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(self.input_transform(x))
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's `RMSNormGated` with norm_before_gate=False: rmsnorm(y * act(z)) per group of
    `group_size` channels (d_inner / ngroups). `gate_act` is an attachment point (S-SiLU)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(dim))
        self.gate_act: nn.Module = nn.SiLU()

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = y.float() * self.gate_act(z.float())
        shape = y.shape
        yg = y.view(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + self.eps)
        return (yg.view(shape) * self.weight.float()).to(dtype)


def make_norm(dim: int, rms_norm: bool, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if rms_norm else nn.LayerNorm(dim, eps=eps)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over time. x: [b, l, c]; weight: [c, 1, k] (nn.Conv1d layout)."""
    k = weight.shape[-1]
    xt = F.pad(x.transpose(1, 2), (k - 1, 0))
    return F.conv1d(xt, weight, bias, groups=x.shape[-1]).transpose(1, 2)


def conv_state_from_input(x: torch.Tensor, d_conv: int) -> torch.Tensor:
    """The conv cache after seeing x [b, l, c]: the last d_conv inputs, [b, c, d_conv], zero-padded."""
    xt = x.transpose(1, 2)
    return F.pad(xt, (max(d_conv - xt.shape[-1], 0), 0))[..., -d_conv:].contiguous()


def causal_conv1d_step(
    conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One token: shift x [b, c] into conv_state [b, c, k] in place; return the conv output [b, c]."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    out = (conv_state * weight[:, 0, :]).sum(-1)
    return out + bias if bias is not None else out
