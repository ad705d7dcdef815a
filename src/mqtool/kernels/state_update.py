"""One Mamba-2 recurrent step (generation) with the state cache kept as DSQ-quantized integer codes.

Inputs: ``x [B, H, P]``, ``dt [B, H]`` (the final step size: softplus and bias already applied),
``A [H]``, ``B_in / C_in [B, G, N]`` (head ``h`` reads group ``h // (H / G)``), ``D [H]``, ``[H, P]``
or None. The state is either

* quantized: int8 codes ``state [B, H, P, N]`` with DSQ scales ``scale_channel fp32 [B, H, P, 1]``
  and ``scale_state fp32 [B, H, 1, N]``, dequantized as ``q * (scale_channel * scale_state)``; or
* fake-quantized: an fp32 ``state [B, H, P, N]`` holding the dequantized values ``q * step``
  (``fake_quant=True``, no scales kept): the same numbers as the quantized form, in the model's
  own fp32 cache layout, which is what simulated (accuracy) evaluation runs; or
* unquantized: an fp32 ``state [B, H, P, N]`` (no scales).

The step (all fp32, as ``mqtool.models.scan.mamba2_step``)::

    h_prev = dequant(state)
    h      = exp(dt * A) * h_prev + (dt * x) ⊗ B          # [P, N] per (batch, head)
    y      = h · C + D * x                                # [B, H, P] fp32

then ``h`` is re-quantized with dynamic scales (restated from ``mqtool.quant.states``; EPS = 1e-12).
``method="dsq"`` (default)::

    S_c[i]  = max(stat_j |h_ij|, EPS)          stat: sqrt(mean) (default), mean, max or sqrt(max)
    S_s[j]  = max(max_i (|h_ij| / S_c[i]), EPS) / qmax
    q[i, j] = clamp(round_half_even(h_ij / (S_c[i] * S_s[j])), -qmax, qmax)

and the single-scale baselines: ``per-channel`` ``S_c[i] = max(max_j |h_ij|, EPS) / qmax, S_s = 1``;
``per-state`` ``S_c = 1, S_s[j] = max(max_i |h_ij|, EPS) / qmax``; ``per-tensor`` ``S_c[i] =
max(max_ij |h_ij|, EPS) / qmax`` for every ``i``, ``S_s = 1``.

and the codes and both scales are written back in place (the fp32 state likewise). ``bits`` is 8
or 4 (any 2..8 works); 4-bit codes are kept one per int8 byte for now (not packed).

Kernel: one program per (batch, head) holding the whole ``[P, N]`` tile (64 x 128 for the
released Mamba-2 models) in registers, so the max / mean reductions over both axes need no
second pass and the in-place update has no race. It is memory-bound: per head it reads and
writes ``P*N`` bytes of codes (4 bytes a value unquantized) plus the small vectors. It updates
its inputs in place, so it is not autotuned (``num_warps`` is picked from the tile size).

Exactness: divisions and the square root are IEEE (``div_rn`` / ``sqrt_rn``) and rounding is
half-to-even, but ``exp`` and the sums (``h · C``, the mean over j) need not match PyTorch's to the
last bit, so ``y`` and the scales agree to fp32 rounding and a code can differ by one where
``h / step`` lands within an ulp of a half-integer.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, STATE_EPS, qmax_for, true_div, use_triton

__all__ = ["CHANNEL_STATS", "METHODS", "state_update", "state_update_ref", "state_update_triton"]

#: DSQ channel statistics (``mqtool.quant.states.CHANNEL_SCALES``).
CHANNEL_STATS = ("abs.max", "abs.max.sqrt", "abs.mean", "abs.mean.sqrt")
#: Scale layouts (``mqtool.quant.states.METHODS``); the kernel's METHOD constexpr is the index.
METHODS = ("dsq", "per-channel", "per-state", "per-tensor")


def _check(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
    C_in: torch.Tensor, D: torch.Tensor | None, scale_channel: torch.Tensor | None,
    scale_state: torch.Tensor | None, channel_stat: str, method: str = "dsq", fake_quant: bool = False,
) -> bool:
    """Validate shapes; returns whether the state is int8 codes."""
    assert x.dim() == 3, f"x must be [B, H, P], got {tuple(x.shape)}"
    b, h, p = x.shape
    assert state.dim() == 4 and state.shape[:3] == (b, h, p), f"state {tuple(state.shape)} is not [{b}, {h}, {p}, N]"
    n = state.shape[3]
    assert dt.shape == (b, h), f"dt {tuple(dt.shape)} is not {(b, h)}"
    assert A.shape == (h,), f"A {tuple(A.shape)} is not {(h,)}"
    assert B_in.dim() == 3 and B_in.shape[0] == b and B_in.shape[2] == n, f"B {tuple(B_in.shape)} is not [{b}, G, {n}]"
    assert C_in.shape == B_in.shape, f"C {tuple(C_in.shape)} != B {tuple(B_in.shape)}"
    assert h % B_in.shape[1] == 0, f"{h} heads do not split into {B_in.shape[1]} groups"
    assert D is None or tuple(D.shape) in ((h,), (h, p)), f"D {tuple(D.shape)} is not [{h}] or [{h}, {p}]"
    assert channel_stat in CHANNEL_STATS, f"channel_stat must be one of {CHANNEL_STATS}, got {channel_stat!r}"
    assert method in METHODS, f"method must be one of {METHODS}, got {method!r}"
    quantized = state.dtype == torch.int8
    assert not (quantized and fake_quant), "fake_quant keeps an fp32 state; int8 codes are quantized already"
    if quantized:
        assert scale_channel is not None and scale_state is not None, "int8 states need both DSQ scales"
        assert scale_channel.shape == (b, h, p, 1), f"scale_channel {tuple(scale_channel.shape)} != {(b, h, p, 1)}"
        assert scale_state.shape == (b, h, 1, n), f"scale_state {tuple(scale_state.shape)} != {(b, h, 1, n)}"
        assert scale_channel.dtype == scale_state.dtype == torch.float32, "DSQ scales must be float32"
    else:
        assert state.dtype == torch.float32, f"state must be int8 codes or float32, got {state.dtype}"
        assert scale_channel is None and scale_state is None, "an fp32 state takes no scales"
    return quantized


# ------------------------------------------------------------------------------------ reference


def _dsq_ref(h: torch.Tensor, bits: int, channel_stat: str,
             method: str = "dsq") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize an fp32 state ``[..., P, N]`` -> ``(codes int8, scale_channel [..., P, 1], scale_state [..., 1, N])``
    with ``method``'s dynamic scales."""
    qmax = qmax_for(bits)
    a = h.abs()
    ones_c = h.new_ones((*h.shape[:-1], 1))
    ones_s = h.new_ones((*h.shape[:-2], 1, h.shape[-1]))
    if method == "per-channel":
        s_c, s_s = true_div(a.amax(dim=-1, keepdim=True).clamp_min(STATE_EPS), qmax), ones_s
    elif method == "per-state":
        s_c, s_s = ones_c, true_div(a.amax(dim=-2, keepdim=True).clamp_min(STATE_EPS), qmax)
    elif method == "per-tensor":
        s_c = true_div(a.amax(dim=(-2, -1), keepdim=True).clamp_min(STATE_EPS), qmax).expand_as(ones_c).contiguous()
        s_s = ones_s
    else:
        stat = a.amax(dim=-1, keepdim=True) if channel_stat.startswith("abs.max") else a.mean(dim=-1, keepdim=True)
        if channel_stat.endswith(".sqrt"):
            stat = stat.sqrt()
        s_c = stat.clamp_min(STATE_EPS)
        s_s = true_div((a / s_c).amax(dim=-2, keepdim=True).clamp_min(STATE_EPS), qmax)
    q = (h / (s_c * s_s)).round().clamp(-qmax, qmax).to(torch.int8)
    return q, s_c, s_s


def state_update_ref(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
    C_in: torch.Tensor, D: torch.Tensor | None = None, scale_channel: torch.Tensor | None = None,
    scale_state: torch.Tensor | None = None, bits: int = 8, channel_stat: str = "abs.mean.sqrt",
    method: str = "dsq", fake_quant: bool = False,
) -> torch.Tensor:
    """PyTorch reference of :func:`state_update` (same arguments; updates in place, returns y)."""
    quantized = _check(state, x, dt, A, B_in, C_in, D, scale_channel, scale_state, channel_stat, method, fake_quant)
    rep = x.shape[1] // B_in.shape[1]
    if quantized:
        h_prev = state.float() * (scale_channel * scale_state)
    else:
        h_prev = state
    dtf, xf = dt.float(), x.float()
    Bh = B_in.float().repeat_interleave(rep, dim=1)                       # [b, h, n]
    Ch = C_in.float().repeat_interleave(rep, dim=1)
    dA = torch.exp(dtf * A.float())                                         # [b, h]
    h = h_prev * dA[:, :, None, None] + (dtf[:, :, None] * xf)[..., None] * Bh[:, :, None, :]
    y = (h * Ch[:, :, None, :]).sum(dim=-1)                                 # [b, h, p]
    if D is not None:
        y = y + xf * (D.float()[:, None] if D.dim() == 1 else D.float())
    if quantized:
        q, s_c, s_s = _dsq_ref(h, bits, channel_stat, method)
        state.copy_(q)
        scale_channel.copy_(s_c)
        scale_state.copy_(s_s)
    elif fake_quant:
        q, s_c, s_s = _dsq_ref(h, bits, channel_stat, method)
        state.copy_(q.float() * (s_c * s_s))
    else:
        state.copy_(h)
    return y


# --------------------------------------------------------------------------------------- kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import quant_codes

    @triton.jit
    def _state_update_kernel(
        state_ptr, sc_ptr, ss_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
        H, P, N, HEADS_PER_GROUP,
        stride_xb, stride_xh, stride_dtb, stride_bb, stride_bg,
        QUANTIZED: tl.constexpr, FAKE: tl.constexpr, METHOD: tl.constexpr, QMAX: tl.constexpr,
        STAT_MAX: tl.constexpr, STAT_SQRT: tl.constexpr,
        HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, EPS: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)             # = b * H + h: the state and its scales are contiguous
        b = pid // H
        hd = pid % H
        g = hd // HEADS_PER_GROUP
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        mask_p = offs_p < P
        mask_n = offs_n < N
        mask = mask_p[:, None] & mask_n[None, :]
        tile = pid.to(tl.int64) * P * N + offs_p[:, None] * N + offs_n[None, :]

        x = tl.load(x_ptr + b * stride_xb + hd * stride_xh + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + b * stride_dtb + hd).to(tl.float32)
        a_h = tl.load(A_ptr + hd).to(tl.float32)
        Bv = tl.load(B_ptr + b * stride_bb + g * stride_bg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + b * stride_bb + g * stride_bg + offs_n, mask=mask_n, other=0.0).to(tl.float32)

        if QUANTIZED:
            q = tl.load(state_ptr + tile, mask=mask, other=0).to(tl.float32)
            sc = tl.load(sc_ptr + pid.to(tl.int64) * P + offs_p, mask=mask_p, other=0.0)
            ss = tl.load(ss_ptr + pid.to(tl.int64) * N + offs_n, mask=mask_n, other=0.0)
            h_prev = q * (sc[:, None] * ss[None, :])
        else:
            h_prev = tl.load(state_ptr + tile, mask=mask, other=0.0)

        dA = tl.exp(dt * a_h)
        h = h_prev * dA + (dt * x)[:, None] * Bv[None, :]     # masked entries are 0 * 0 + 0 = 0

        y = tl.sum(h * Cv[None, :], axis=1)
        if HAS_D:
            if D_PER_CHANNEL:
                d = tl.load(D_ptr + hd * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            else:
                d = tl.load(D_ptr + hd).to(tl.float32)
            y += x * d
        tl.store(y_ptr + pid.to(tl.int64) * P + offs_p, y, mask=mask_p)

        if QUANTIZED or FAKE:
            a = tl.abs(h)                                                       # 0 where masked
            if METHOD == 0:      # dsq
                if STAT_MAX:
                    stat = tl.max(a, axis=1)
                else:
                    stat = tl.math.div_rn(tl.sum(a, axis=1), N * 1.0)
                if STAT_SQRT:
                    stat = tl.sqrt_rn(stat)
                s_c = tl.maximum(stat, EPS)                                     # [P]
                ratio = tl.math.div_rn(a, s_c[:, None])
                s_s = tl.math.div_rn(tl.maximum(tl.max(ratio, axis=0), EPS), QMAX * 1.0)   # [N]
            elif METHOD == 1:    # per-channel
                s_c = tl.math.div_rn(tl.maximum(tl.max(a, axis=1), EPS), QMAX * 1.0)
                s_s = tl.full([BLOCK_N], 1.0, tl.float32)
            elif METHOD == 2:    # per-state
                s_c = tl.full([BLOCK_P], 1.0, tl.float32)
                s_s = tl.math.div_rn(tl.maximum(tl.max(a, axis=0), EPS), QMAX * 1.0)
            else:                # per-tensor: the one scale kept in every channel's slot
                s_t = tl.math.div_rn(tl.maximum(tl.max(tl.max(a, axis=1), axis=0), EPS), QMAX * 1.0)
                s_c = tl.full([BLOCK_P], 1.0, tl.float32) * s_t
                s_s = tl.full([BLOCK_N], 1.0, tl.float32)
            step = s_c[:, None] * s_s[None, :]
            codes = quant_codes(tl.math.div_rn(h, step), QMAX)
            if QUANTIZED:
                tl.store(state_ptr + tile, codes.to(tl.int8), mask=mask)
                tl.store(sc_ptr + pid.to(tl.int64) * P + offs_p, s_c, mask=mask_p)
                tl.store(ss_ptr + pid.to(tl.int64) * N + offs_n, s_s, mask=mask_n)
            else:
                tl.store(state_ptr + tile, codes * step, mask=mask)
        else:
            tl.store(state_ptr + tile, h, mask=mask)


def state_update_triton(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
    C_in: torch.Tensor, D: torch.Tensor | None = None, scale_channel: torch.Tensor | None = None,
    scale_state: torch.Tensor | None = None, bits: int = 8, channel_stat: str = "abs.mean.sqrt",
    method: str = "dsq", fake_quant: bool = False, num_warps: int | None = None,
) -> torch.Tensor:
    """Launch the kernel (arguments as :func:`state_update`).

    Shapes: ``state`` int8 or fp32 ``[B, H, P, N]`` (contiguous: updated in place);
    ``scale_channel fp32 [B, H, P, 1]`` and ``scale_state fp32 [B, H, 1, N]`` (contiguous; in
    place) for int8 states; ``x [B, H, P]``, ``dt [B, H]``, ``A [H]``, ``B_in / C_in [B, G, N]``,
    ``D [H] | [H, P] | None`` in any float dtype -> ``y fp32 [B, H, P]``.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    quantized = _check(state, x, dt, A, B_in, C_in, D, scale_channel, scale_state, channel_stat, method, fake_quant)
    qmax = qmax_for(bits)
    b, nh, p = x.shape
    n = state.shape[3]
    assert state.is_contiguous(), "state is updated in place and must be contiguous"
    if quantized:
        assert scale_channel.is_contiguous() and scale_state.is_contiguous(), "scales are updated in place"
    # the inputs are small: make them contiguous so B and C share strides and dt, A, D are flat
    x, dt, A, B_in, C_in = (t.contiguous() for t in (x, dt, A, B_in, C_in))
    D = None if D is None else D.contiguous()
    y = torch.empty((b, nh, p), dtype=torch.float32, device=x.device)
    if b == 0:
        return y
    bp, bn = triton.next_power_of_2(p), triton.next_power_of_2(n)
    if num_warps is None:
        num_warps = 4 if bp * bn <= 4096 else 8
    _state_update_kernel[(b * nh,)](
        state, scale_channel, scale_state, x, dt, A, B_in, C_in, D, y,
        nh, p, n, nh // B_in.shape[1],
        x.stride(0), x.stride(1), dt.stride(0), B_in.stride(0), B_in.stride(1),
        QUANTIZED=quantized, FAKE=fake_quant, METHOD=METHODS.index(method), QMAX=qmax,
        STAT_MAX=channel_stat.startswith("abs.max"),
        STAT_SQRT=channel_stat.endswith(".sqrt"), HAS_D=D is not None,
        D_PER_CHANNEL=D is not None and D.dim() == 2, EPS=STATE_EPS,
        BLOCK_P=bp, BLOCK_N=bn, num_warps=num_warps,
    )
    return y


def state_update(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
    C_in: torch.Tensor, D: torch.Tensor | None = None, scale_channel: torch.Tensor | None = None,
    scale_state: torch.Tensor | None = None, bits: int = 8, channel_stat: str = "abs.mean.sqrt",
    method: str = "dsq", fake_quant: bool = False,
) -> torch.Tensor:
    """One Mamba-2 step on a quantized (int8 ``state`` + scales), fake-quantized or fp32 state cache.

    Updates ``state`` (and the scales) in place and returns ``y fp32 [B, H, P]``. The Triton
    kernel on CUDA (or on CPU under ``TRITON_INTERPRET=1``), else the reference.
    """
    args = (state, x, dt, A, B_in, C_in, D, scale_channel, scale_state, bits, channel_stat, method, fake_quant)
    if use_triton(x):
        return state_update_triton(*args)
    return state_update_ref(*args)
