"""The Mamba-1 mixer (mamba-ssm's `Mamba`), with mamba-ssm's parameter names.

Attachment points: the input of in_proj, x_proj, dt_proj, out_proj (`Linear.input_*`); the conv's
activation `conv_act` (SiLU); the SSM's inputs `ssm_x`, `ssm_dt` (Δ after softplus), `ssm_B`, `ssm_C`
and its output `ssm_y` (before the gate); the gate activation `gate_act` (SiLU); `state_quantizer`,
applied to the state stored between recurrent steps.

`bcdt_rms_eps` (FalconMamba, transformers' `mixer_rms_eps`): when set, x_proj's three outputs (the
low-rank dt before dt_proj, B and C) each pass a weightless RMS norm over their own channels, as
transformers' `FalconMambaMixer` does; mamba-ssm's `Mamba` has no such norm (None).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mqtool.models import scan
from mqtool.models.layers import Linear, causal_conv1d, causal_conv1d_step, conv_state_from_input


def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in fp32, back in x's dtype (transformers' `rms_forward`)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Mamba(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: int | str = "auto", conv_bias: bool = True, bias: bool = False,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 bcdt_rms_eps: float | None = None, **_unused) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.bcdt_rms_eps = bcdt_rms_eps
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = Linear(self.d_inner, d_model, bias=bias)
        # random init as in mamba-ssm: dt in [dt_min, dt_max] log-uniform through the softplus inverse
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        self.ssm_x, self.ssm_dt, self.ssm_B, self.ssm_C = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
        self.conv_act: nn.Module = nn.SiLU()
        self.ssm_y: nn.Module = nn.Identity()
        self.gate_act: nn.Module = nn.SiLU()
        self.state_quantizer: nn.Module = nn.Identity()

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def _ssm_inputs(self, x: torch.Tensor):
        """x: conv+SiLU output [..., d_inner] -> (u, delta, B, C) through the attachment points."""
        x_dbl = self.x_proj(x)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.bcdt_rms_eps is not None:  # FalconMamba: before the attachment points, as the SSM sees them
            dt, B, C = (weightless_rms_norm(t, self.bcdt_rms_eps) for t in (dt, B, C))
        delta = self.ssm_dt(F.softplus(self.dt_proj(dt).float()))
        return self.ssm_x(x), delta, self.ssm_B(B), self.ssm_C(C)

    def forward(self, hidden: torch.Tensor, mode: str = "parallel", cache: tuple | None = None,
                return_states: bool = False):
        """hidden [b, l, d_model] -> [b, l, d_model]. With `cache` (conv_state, ssm_state), fills it
        with the state after the last token (prefill). `return_states` adds every SSM state."""
        xz = self.in_proj(hidden)
        x, z = xz.chunk(2, dim=-1)
        x_in = x
        x = self.conv_act(causal_conv1d(x, self.conv1d.weight, self.conv1d.bias))
        u, delta, B, C = self._ssm_inputs(x)
        A = self._A()
        states = None
        if mode == "sequential":
            y, h_last = scan.mamba1_sequential(u, delta, A, B, C, self.D, state_fn=self._state_fn())
        elif return_states:
            y, h_last, states = scan.mamba1_scan(u, delta, A, B, C, self.D, return_states=True)
        else:
            y, h_last = scan.mamba1_scan(u, delta, A, B, C, self.D)
        if cache is not None:
            cache[0].copy_(conv_state_from_input(x_in, self.d_conv))
            cache[1].copy_(self.state_quantizer(h_last))
        y = (self.ssm_y(y) * self.gate_act(z.float())).to(hidden.dtype)
        out = self.out_proj(y)
        return (out, states) if return_states else out

    def _state_fn(self):
        return None if isinstance(self.state_quantizer, nn.Identity) else self.state_quantizer

    def allocate_cache(self, batch: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        conv = torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return conv, ssm

    def step(self, hidden: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One token: hidden [b, d_model] -> [b, d_model]; updates cache in place. The stored state
        goes through `state_quantizer` (quantized when stored, dequantized when read)."""
        conv_state, ssm_state = cache
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x = self.conv_act(causal_conv1d_step(conv_state, x.to(conv_state.dtype), self.conv1d.weight, self.conv1d.bias))
        u, delta, B, C = self._ssm_inputs(x.to(hidden.dtype))
        y, h = scan.mamba1_step(ssm_state, u, delta, self._A(), B, C, self.D)
        ssm_state.copy_(self.state_quantizer(h))
        y = (self.ssm_y(y) * self.gate_act(z.float())).to(hidden.dtype)
        return self.out_proj(y)
