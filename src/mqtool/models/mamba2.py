"""The Mamba-2 mixer (mamba-ssm's `Mamba2`, d_ssm = d_inner), with mamba-ssm's parameter names.

in_proj produces [z, xBC, dt]; a causal depthwise conv + SiLU runs over xBC; the SSD scan over
heads; then the gated RMSNorm (per group) and out_proj. Attachment points as in Mamba-1: every
`Linear`'s input, `conv_act` (SiLU over the xBC channels), `ssm_x`, `ssm_dt` (Δ after softplus and
dt_limit), `ssm_B`, `ssm_C`, `ssm_y` (the SSM's output before the gated norm), `norm.gate_act` (the
gate's SiLU) and `state_quantizer`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mqtool.models import scan
from mqtool.models.layers import (
    GatedRMSNorm,
    Linear,
    causal_conv1d,
    causal_conv1d_step,
    conv_state_from_input,
)


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: float = 2,
                 headdim: int = 64, ngroups: int = 1, A_init_range=(1, 16), D_has_hdim: bool = False,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_limit=(0.0, float("inf")), bias: bool = False, conv_bias: bool = True,
                 chunk_size: int = 256, norm_eps: float = 1e-5, **_unused) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.headdim, self.ngroups = headdim, ngroups
        self.nheads = self.d_inner // headdim
        self.dt_limit = tuple(dt_limit)
        self.chunk_size = chunk_size
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias)
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // ngroups, eps=norm_eps)
        self.out_proj = Linear(self.d_inner, d_model, bias=bias)
        self.ssm_x, self.ssm_dt, self.ssm_B, self.ssm_C = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
        self.conv_act: nn.Module = nn.SiLU()
        self.ssm_y: nn.Module = nn.Identity()
        self.state_quantizer: nn.Module = nn.Identity()

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def _D(self) -> torch.Tensor:
        return self.D.view(self.nheads, self.headdim) if self.D.numel() == self.d_inner else self.D

    def _split(self, zxbcdt: torch.Tensor):
        gn = self.ngroups * self.d_state
        return torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * gn, self.nheads], dim=-1)

    def _ssm_inputs(self, xBC: torch.Tensor, dt: torch.Tensor):
        """conv+SiLU output and raw dt -> (x [..., h, p], delta [..., h], B, C [..., g, n])."""
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        delta = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit != (0.0, float("inf")):
            delta = delta.clamp(*self.dt_limit)
        x = self.ssm_x(x).unflatten(-1, (self.nheads, self.headdim))
        B = self.ssm_B(B).unflatten(-1, (self.ngroups, self.d_state))
        C = self.ssm_C(C).unflatten(-1, (self.ngroups, self.d_state))
        return x, self.ssm_dt(delta), B, C

    def forward(self, hidden: torch.Tensor, mode: str = "parallel", cache: tuple | None = None,
                return_states: bool = False):
        """hidden [b, l, d_model] -> [b, l, d_model]; `cache` and `return_states` as in Mamba-1."""
        b, l, _ = hidden.shape
        z, xBC, dt = self._split(self.in_proj(hidden))
        xBC_in = xBC
        xBC = self.conv_act(causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias))
        x, delta, B, C = self._ssm_inputs(xBC, dt)
        A, D = self._A(), self._D()
        states = None
        if mode == "sequential":
            state_fn = None if isinstance(self.state_quantizer, nn.Identity) else self.state_quantizer
            y, h_last = scan.mamba2_sequential(x, delta, A, B, C, D, state_fn=state_fn)
        elif return_states:
            y, h_last, states = scan.mamba2_ssd(x, delta, A, B, C, D, self.chunk_size, return_states=True)
        else:
            y, h_last = scan.mamba2_ssd(x, delta, A, B, C, D, self.chunk_size)
        if cache is not None:
            cache[0].copy_(conv_state_from_input(xBC_in, self.d_conv))
            cache[1].copy_(self.state_quantizer(h_last))
        y = self.norm(self.ssm_y(y.reshape(b, l, self.d_inner)), z).to(hidden.dtype)
        out = self.out_proj(y)
        return (out, states) if return_states else out

    def allocate_cache(self, batch: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        conv = torch.zeros(batch, conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32)
        return conv, ssm

    def step(self, hidden: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One token: hidden [b, d_model] -> [b, d_model]; updates cache in place."""
        conv_state, ssm_state = cache
        z, xBC, dt = self._split(self.in_proj(hidden))
        xBC = self.conv_act(causal_conv1d_step(conv_state, xBC.to(conv_state.dtype), self.conv1d.weight,
                                               self.conv1d.bias))
        x, delta, B, C = self._ssm_inputs(xBC.to(hidden.dtype), dt)
        # a state quantizer may fuse the step with itself (one kernel, same values); else step, then quantize
        fused_step = getattr(self.state_quantizer, "mamba2_step", None)
        y = None if fused_step is None else fused_step(ssm_state, x, delta, self._A(), B, C, self._D())
        if y is None:
            y, h = scan.mamba2_step(ssm_state, x, delta, self._A(), B, C, self._D())
            ssm_state.copy_(self.state_quantizer(h))
        return self.out_proj(self.norm(self.ssm_y(y.reshape(y.shape[0], self.d_inner)), z).to(hidden.dtype))
