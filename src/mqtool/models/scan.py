"""The SSM recurrences of Mamba-1 and Mamba-2, in three forms that must agree:

* parallel: Mamba-2's chunked SSD (matmuls per chunk); Mamba-1's selective scan (inputs prepared
  for the whole sequence at once, one fused multiply-add per step over batch x channels x state).
  On CUDA, mamba-ssm's kernels are used when installed.
* step: one token with a state cache (generation, recurrent evaluation, quantized states).
* sequential: the plain per-token loop built from `*_step`, the reference tests compare against.

All state arithmetic is float32 whatever the input dtype (a 16-bit state measurably loses quality).
Shapes: Mamba-1 u, delta [b, l, d], A [d, n], B, C [b, l, n], state [b, d, n].
Mamba-2 x [b, l, h, p], dt [b, l, h], A [h], B, C [b, l, g, n], D [h] or [h, p], state [b, h, p, n].
`delta` / `dt` are final step sizes (softplus and bias already applied).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


@functools.cache
def mamba_ssm_ops() -> dict | None:
    """mamba-ssm's CUDA/Triton scan kernels, or None when not installed (always None on CPU)."""
    if os.environ.get("MQTOOL_NO_MAMBA_SSM") or not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return {"selective_scan_fn": selective_scan_fn, "mamba_chunk_scan_combined": mamba_chunk_scan_combined}


# ---------------------------------------------------------------------------------------- Mamba-1

def mamba1_step(
    h: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, D: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. h [b, d, n] (fp32, read as given); u, delta [b, d]; B, C [b, n]. Returns (y [b, d], h_new)."""
    u, delta = u.float(), delta.float()
    dA = torch.exp(delta.unsqueeze(-1) * A)
    h_new = dA * h + (delta * u).unsqueeze(-1) * B.float().unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", h_new, C.float())
    if D is not None:
        y = y + u * D.float()
    return y, h_new


def mamba1_sequential(u, delta, A, B, C, D, h0=None, state_fn=None):
    """Reference: the per-token loop. `state_fn` (e.g. a state quantizer) is applied to the state
    that is stored for the next step, as recurrent mode does."""
    b, l, d = u.shape
    h = torch.zeros(b, d, A.shape[1], device=u.device, dtype=torch.float32) if h0 is None else h0.float()
    ys = []
    for t in range(l):
        y, h = mamba1_step(h, u[:, t], delta[:, t], A, B[:, t], C[:, t], D)
        if state_fn is not None:
            h = state_fn(h)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def mamba1_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, h0: torch.Tensor | None = None, return_states: bool = False,
    time_chunk: int = 128,
):
    """Parallel-mode selective scan. Returns (y [b, l, d] fp32, h_last [b, d, n]) and, with
    return_states, every state [b, l, d, n] (for quantization-aware reconstruction)."""
    ops = mamba_ssm_ops()
    if ops is not None and u.is_cuda and h0 is None and not return_states:
        # as mamba-ssm's own Mamba calls it: u, delta, B, C in one (the input) dtype, A and D fp32;
        # the kernel refuses a delta of another dtype ("Expected delta.scalar_type() == input_type")
        dt_ = u.dtype
        y, h_last = ops["selective_scan_fn"](
            u.transpose(1, 2).contiguous(), delta.to(dt_).transpose(1, 2).contiguous(), A.float().contiguous(),
            B.to(dt_).transpose(1, 2).contiguous(), C.to(dt_).transpose(1, 2).contiguous(),
            None if D is None else D.float(), return_last_state=True,
        )
        return y.transpose(1, 2).float(), h_last.float()
    b, l, d = u.shape
    A = A.float()
    h = torch.zeros(b, d, A.shape[1], device=u.device, dtype=torch.float32) if h0 is None else h0.float()
    ys, states = [], []
    # Prepare decays and inputs a time-chunk at a time (bounded memory), then one fused
    # multiply-add per step: the loop body is as small as a step can be.
    for s in range(0, l, time_chunk):
        dt = delta[:, s:s + time_chunk].float()
        dA = torch.exp(dt.unsqueeze(-1) * A)                                       # [b, T, d, n]
        dBx = (dt * u[:, s:s + time_chunk].float()).unsqueeze(-1) * B[:, s:s + time_chunk, None, :].float()
        hs = torch.empty_like(dA)
        for t in range(dA.shape[1]):
            h = torch.addcmul(dBx[:, t], dA[:, t], h)
            hs[:, t] = h
        ys.append(torch.einsum("btdn,btn->btd", hs, C[:, s:s + time_chunk].float()))
        if return_states:
            states.append(hs)
    y = torch.cat(ys, dim=1)
    if D is not None:
        y = y + u.float() * D.float()
    if return_states:
        return y, h, torch.cat(states, dim=1)
    return y, h


# ---------------------------------------------------------------------------------------- Mamba-2

def _heads(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """Broadcast per-group B or C [..., g, n] to per-head [..., h, n]."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def _d_term(x: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor | float:
    if D is None:
        return 0.0
    return x * (D.float()[:, None] if D.dim() == 1 else D.float())


def mamba2_step(h, x, dt, A, B, C, D):
    """One token. h [b, h, p, n]; x [b, h, p]; dt [b, h]; B, C [b, g, n]. Returns (y [b, h, p], h_new)."""
    x, dt = x.float(), dt.float()
    Bh, Ch = _heads(B.float(), x.shape[1]), _heads(C.float(), x.shape[1])
    dA = torch.exp(dt * A.float())
    h_new = h * dA[:, :, None, None] + torch.einsum("bh,bhp,bhn->bhpn", dt, x, Bh)
    y = torch.einsum("bhpn,bhn->bhp", h_new, Ch) + _d_term(x, D)
    return y, h_new


def mamba2_sequential(x, dt, A, B, C, D, h0=None, state_fn=None):
    """Reference: the per-token loop (see mamba1_sequential)."""
    b, l, nh, p = x.shape
    h = torch.zeros(b, nh, p, B.shape[-1], device=x.device, dtype=torch.float32) if h0 is None else h0.float()
    ys = []
    for t in range(l):
        y, h = mamba2_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        if state_fn is not None:
            h = state_fn(h)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def mamba2_ssd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, chunk_size: int = 256, h0: torch.Tensor | None = None,
    return_states: bool = False,
):
    """Parallel-mode SSD (Mamba-2's chunked state-space duality). Returns (y [b, l, h, p] fp32,
    h_last [b, h, p, n]) and, with return_states, every state [b, l, h, p, n]."""
    ops = mamba_ssm_ops()
    if ops is not None and x.is_cuda and not return_states:
        y, h_last = ops["mamba_chunk_scan_combined"](
            x, dt, A.float(), B, C, chunk_size, D=None if D is None else D.float(),
            initial_states=None if h0 is None else h0.float(), return_final_states=True,
        )
        return y.float(), h_last.float()
    b, l, nh, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    T = min(chunk_size, l)
    pad = (-l) % T
    xf, dtf, Bf, Cf = x.float(), dt.float(), B.float(), C.float()
    if pad:  # dt = 0 on the pads: decay 1, no input, so outputs and the final state are unchanged
        xf, dtf, Bf, Cf = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xf, dtf, Bf, Cf))
    nc = xf.shape[1] // T
    # head-major layout [b, heads, chunks, T, ...]; heads of one group share B and C, so the
    # C·B products are computed once per group and broadcast over its heads
    X = (xf * dtf.unsqueeze(-1)).view(b, nc, T, nh, p).permute(0, 3, 1, 2, 4)      # [b, h, c, T, p]
    Bg = Bf.view(b, nc, T, g, n).permute(0, 3, 1, 2, 4)                              # [b, g, c, T, n]
    Cg = Cf.view(b, nc, T, g, n).permute(0, 3, 1, 2, 4)
    a_cum = torch.cumsum((dtf * A.float()).view(b, nc, T, nh).permute(0, 3, 1, 2), dim=-1)  # [b, h, c, T]
    hg = nh // g

    def per_head(t: torch.Tensor) -> torch.Tensor:  # [b, g, ...] -> [b, g, h/g, ...] (a view)
        return t.unsqueeze(2)

    def grouped(t: torch.Tensor) -> torch.Tensor:  # [b, h, ...] -> [b, g, h/g, ...]
        return t.view(b, g, hg, *t.shape[2:])

    # 1. within each chunk: y_t = sum_{s<=t} C_t·B_s exp(a_cum_t - a_cum_s) X_s
    seg = a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)                                 # [b, h, c, T, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    L = torch.exp(seg.masked_fill_(~causal, float("-inf")))
    scores = grouped(L) * per_head(Cg @ Bg.transpose(-1, -2))
    y = (scores @ grouped(X)).view(b, nh, nc, T, p)
    # 2. the state each chunk ends with, from its own inputs
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)                                # [b, h, c, T]
    chunk_states = ((grouped(X) * grouped(decay_to_end).unsqueeze(-1)).transpose(-1, -2)
                    @ per_head(Bg)).view(b, nh, nc, p, n)
    # 3. carry states across chunks (a short loop: one step per chunk)
    chunk_decay = torch.exp(a_cum[..., -1])                                          # [b, h, c]
    h = torch.zeros(b, nh, p, n, device=x.device) if h0 is None else h0.float()
    carried = []
    for c in range(nc):
        carried.append(h)
        h = h * chunk_decay[:, :, c, None, None] + chunk_states[:, :, c]
    carried_t = torch.stack(carried, dim=2)                                          # [b, h, c, p, n]
    # 4. the carried-in state's contribution to each position
    y = y + (per_head(Cg) @ grouped(carried_t).transpose(-1, -2)).view(b, nh, nc, T, p) * torch.exp(a_cum).unsqueeze(-1)
    y = y.permute(0, 2, 3, 1, 4).reshape(b, nc * T, nh, p)[:, :l] + _d_term(x.float(), D)
    if not return_states:
        return y, h
    Bh = Bg.repeat_interleave(hg, dim=1)                                             # [b, h, c, T, n]
    # sum_s L[t, s] X_s B_s^T as one matmul over s (no [.., T, T, p] intermediate)
    within = (L @ (X.unsqueeze(-1) * Bh.unsqueeze(-2)).flatten(-2)).unflatten(-1, (p, n))
    all_states = within + carried_t.unsqueeze(3) * torch.exp(a_cum)[..., None, None]
    return y, h, all_states.permute(0, 2, 3, 1, 4, 5).reshape(b, nc * T, nh, p, n)[:, :l]
