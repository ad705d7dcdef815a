"""One Mamba-2 recurrent step (generation) with the state cache kept as DSQ-quantized integer codes.

Inputs: ``x [B, H, P]``, ``dt [B, H]`` (the final step size; or the raw one with ``dt_bias [H]``
and ``dt_softplus``: ``dt = clamp(softplus(dt + dt_bias), *dt_limit)`` is then fused, as in
mamba-ssm's ``selective_state_update``),
``A [H]``, ``B_in / C_in [B, G, N]`` (head ``h`` reads group ``h // (H / G)``), ``D [H]``, ``[H, P]``
or None. The state is either

* quantized: int8 codes ``state [B, H, P, N]``, or 4-bit codes packed two a byte along N
  (uint8 ``[B, H, P, N / 2]``, low nibble = even index: :mod:`mqtool.packing`), with DSQ scales
  ``scale_channel fp32 [B, H, P, 1]`` and ``scale_state fp32 [B, H, 1, N]``, dequantized as
  ``q * (scale_channel * scale_state)``; or
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

and the codes and both scales are written back in place (the fp32 state likewise). ``bits`` is
2..8 for int8 codes and 2..4 for packed ones.

Kernel: one program per (batch, head), walking its ``[P, N]`` state (64 x 128 for the released
Mamba-2 models) in blocks of rows (~2K values a block, so registers stay few and many programs
stay resident). A quantized state is walked twice: the first pass computes y and the column
maxima the state scale needs (it spans every row), the second recomputes the same ``h`` from the
old codes, still in place, and writes the new codes, the row scales and last the state scale;
so nothing is overwritten before it is read. Each row block is held as its even and odd state
columns (two ``[rows, N / 2]`` halves): a packed byte holds one of each, and an int8 pair is
read and written as one int16, so every storage form moves whole contiguous words. It is
memory-bound: per head it reads (twice, the second time from cache) and writes ``P*N`` bytes of
int8 codes, ``P*N/2`` packed (4 bytes a value unquantized) plus the small vectors. It updates its
inputs in place, so it is not autotuned.

Exactness: divisions and the square root are IEEE (``div_rn`` / ``sqrt_rn``) and rounding is
half-to-even, but ``exp`` and the sums (``h · C``, the mean over j) need not match PyTorch's to the
last bit, so ``y`` and the scales agree to fp32 rounding and a code can differ by one where
``h / step`` lands within an ulp of a half-integer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mqtool.packing import pack_int4, unpack_int4

from ._common import HAS_TRITON, STATE_EPS, qmax_for, true_div, use_triton

__all__ = [
    "CHANNEL_STATS", "METHODS", "mamba1_state_update", "mamba1_state_update_ref", "mamba1_state_update_triton",
    "state_update", "state_update_ref", "state_update_triton",
]

#: DSQ channel statistics (``mqtool.quant.states.CHANNEL_SCALES``).
CHANNEL_STATS = ("abs.max", "abs.max.sqrt", "abs.mean", "abs.mean.sqrt")
#: Scale layouts (``mqtool.quant.states.METHODS``); the kernel's METHOD constexpr is the index.
METHODS = ("dsq", "per-channel", "per-state", "per-tensor")


def _check(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
    C_in: torch.Tensor, D: torch.Tensor | None, scale_channel: torch.Tensor | None,
    scale_state: torch.Tensor | None, bits: int, channel_stat: str, method: str, fake_quant: bool,
    dt_bias: torch.Tensor | None,
) -> str:
    """Validate shapes; returns the storage form: "float", "int8" or "packed"."""
    assert x.dim() == 3, f"x must be [B, H, P], got {tuple(x.shape)}"
    b, h, p = x.shape
    assert B_in.dim() == 3 and B_in.shape[0] == b, f"B {tuple(B_in.shape)} is not [{b}, G, N]"
    n = B_in.shape[2]
    storage = {torch.int8: "int8", torch.uint8: "packed"}.get(state.dtype, "float")
    stored_n = n // 2 if storage == "packed" else n
    assert storage != "packed" or n % 2 == 0, f"packed states need an even state size, got {n}"
    assert state.dim() == 4 and state.shape == (b, h, p, stored_n), (
        f"state {tuple(state.shape)} is not [{b}, {h}, {p}, {stored_n}]")
    assert dt.shape == (b, h), f"dt {tuple(dt.shape)} is not {(b, h)}"
    assert A.shape == (h,), f"A {tuple(A.shape)} is not {(h,)}"
    assert dt_bias is None or dt_bias.shape == (h,), f"dt_bias {tuple(dt_bias.shape)} is not {(h,)}"
    assert C_in.shape == B_in.shape, f"C {tuple(C_in.shape)} != B {tuple(B_in.shape)}"
    assert h % B_in.shape[1] == 0, f"{h} heads do not split into {B_in.shape[1]} groups"
    assert D is None or tuple(D.shape) in ((h,), (h, p)), f"D {tuple(D.shape)} is not [{h}] or [{h}, {p}]"
    assert channel_stat in CHANNEL_STATS, f"channel_stat must be one of {CHANNEL_STATS}, got {channel_stat!r}"
    assert method in METHODS, f"method must be one of {METHODS}, got {method!r}"
    assert not (storage != "float" and fake_quant), "fake_quant keeps an fp32 state; codes are quantized already"
    assert storage != "packed" or qmax_for(bits) <= 7, f"{bits}-bit codes do not fit a nibble"
    if storage != "float":
        assert scale_channel is not None and scale_state is not None, "quantized states need both DSQ scales"
        assert scale_channel.shape == (b, h, p, 1), f"scale_channel {tuple(scale_channel.shape)} != {(b, h, p, 1)}"
        assert scale_state.shape == (b, h, 1, n), f"scale_state {tuple(scale_state.shape)} != {(b, h, 1, n)}"
        assert scale_channel.dtype == scale_state.dtype == torch.float32, "DSQ scales must be float32"
    else:
        assert state.dtype == torch.float32, f"state must be int8 / packed uint8 codes or float32, got {state.dtype}"
        assert scale_channel is None and scale_state is None, "an fp32 state takes no scales"
    return storage


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


def _step_size_ref(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
                   dt_limit: tuple[float, float]) -> torch.Tensor:
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    return dt


def state_update_ref(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
    C_in: torch.Tensor, D: torch.Tensor | None = None, scale_channel: torch.Tensor | None = None,
    scale_state: torch.Tensor | None = None, bits: int = 8, channel_stat: str = "abs.mean.sqrt",
    method: str = "dsq", fake_quant: bool = False, dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """PyTorch reference of :func:`state_update` (same arguments; updates in place, returns y)."""
    storage = _check(state, x, dt, A, B_in, C_in, D, scale_channel, scale_state, bits, channel_stat, method,
                     fake_quant, dt_bias)
    rep = x.shape[1] // B_in.shape[1]
    if storage == "float":
        h_prev = state
    else:
        codes = unpack_int4(state) if storage == "packed" else state
        h_prev = codes.float() * (scale_channel * scale_state)
    dtf, xf = _step_size_ref(dt, dt_bias, dt_softplus, dt_limit), x.float()
    Bh = B_in.float().repeat_interleave(rep, dim=1)                       # [b, h, n]
    Ch = C_in.float().repeat_interleave(rep, dim=1)
    dA = torch.exp(dtf * A.float())                                         # [b, h]
    h = h_prev * dA[:, :, None, None] + (dtf[:, :, None] * xf)[..., None] * Bh[:, :, None, :]
    y = (h * Ch[:, :, None, :]).sum(dim=-1)                                 # [b, h, p]
    if D is not None:
        y = y + xf * (D.float()[:, None] if D.dim() == 1 else D.float())
    if storage != "float":
        q, s_c, s_s = _dsq_ref(h, bits, channel_stat, method)
        state.copy_(pack_int4(q) if storage == "packed" else q)
        scale_channel.copy_(s_c)
        scale_state.copy_(s_s)
    elif fake_quant:
        q, s_c, s_s = _dsq_ref(h, bits, channel_stat, method)
        state.copy_(q.float() * (s_c * s_s))
    else:
        state.copy_(h)
    return y


# --------------------------------------------------------------------------------------- kernel

#: The kernel's STORAGE constexpr.
_STORAGE = {"float": 0, "int8": 1, "packed": 2}
#: Mamba-2 codes: three launches over (batch, head, row block) programs (`split=True`) rather than
#: one program a head walking its rows twice. The one-program form is the default because it is
#: the one timed on the GPU so far (docs/results.md); the split form (Mamba-1's only form) is
#: tested against the reference on the CPU, not yet timed.
SPLIT_ROWS = False

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import quant_codes

    @triton.jit
    def _new_state(state_ptr, sc_ptr, ss_ptr, x_ptr, base, offs_p, offs_j, mask_p, mask_e, mask_o, N, NJ,
                   x_row, dA_e, dA_o, dt, Be, Bo, sse, sso, STORAGE: tl.constexpr):
        """Rows ``offs_p`` of the new state, as its even and odd columns: h = dA * h_prev + dt x B
        (dA a head's scalar and dt too for Mamba-2; a [rows, N / 2] tile and a [rows] vector for Mamba-1)."""
        mask_te = mask_p[:, None] & mask_e[None, :]
        mask_to = mask_p[:, None] & mask_o[None, :]
        if STORAGE == 0:
            elem = (base + offs_p[:, None]) * N + 2 * offs_j[None, :]
            he = tl.load(state_ptr + elem, mask=mask_te, other=0.0)
            ho = tl.load(state_ptr + elem + 1, mask=mask_to, other=0.0)
        else:
            pair = (base + offs_p[:, None]) * NJ + offs_j[None, :]
            w = tl.load(state_ptr + pair, mask=mask_te, other=0).to(tl.int32)
            if STORAGE == 1:   # int8 pairs read as one int16 (little-endian: even in the low byte)
                qe = (w << 24) >> 24
                qo = w >> 8
            else:              # packed nibbles (int8 view): even in the low nibble
                qe = (w << 28) >> 28
                qo = w >> 4
            sc = tl.load(sc_ptr + base + offs_p, mask=mask_p, other=0.0)
            he = qe.to(tl.float32) * (sc[:, None] * sse[None, :])
            ho = qo.to(tl.float32) * (sc[:, None] * sso[None, :])
        x = tl.load(x_row + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        dtx = (dt * x)[:, None]
        he = he * dA_e + dtx * Be[None, :]     # masked entries are 0 * 0 + 0 = 0
        ho = ho * dA_o + dtx * Bo[None, :]
        return he, ho, x

    @triton.jit
    def _channel_scale(ae, ao, N, METHOD: tl.constexpr, QMAX: tl.constexpr, STAT_MAX: tl.constexpr,
                       STAT_SQRT: tl.constexpr, EPS: tl.constexpr):
        """The per-row factor of the method's scale (1 where the method has none)."""
        if METHOD == 0:      # dsq
            if STAT_MAX:
                stat = tl.maximum(tl.max(ae, axis=1), tl.max(ao, axis=1))
            else:
                stat = tl.math.div_rn(tl.sum(ae, axis=1) + tl.sum(ao, axis=1), N * 1.0)
            if STAT_SQRT:
                stat = tl.sqrt_rn(stat)
            s_c = tl.maximum(stat, EPS)
        elif METHOD == 1:    # per-channel
            s_c = tl.math.div_rn(tl.maximum(tl.maximum(tl.max(ae, axis=1), tl.max(ao, axis=1)), EPS), QMAX * 1.0)
        else:                # per-state, per-tensor (whose one scale is filled in later)
            s_c = tl.max(ae, axis=1) * 0.0 + 1.0
        return s_c

    @triton.jit
    def _state_scales(col_e, col_o, METHOD: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr,
                      BLOCK_J: tl.constexpr):
        """From the column maxima: the state scale of the even and odd columns (1 where the method has
        none) and per-tensor's one scale."""
        one = tl.full([BLOCK_J], 1.0, tl.float32)
        if METHOD == 0 or METHOD == 2:     # dsq, per-state: a scale per state column
            s_se = tl.math.div_rn(tl.maximum(col_e, EPS), QMAX * 1.0)
            s_so = tl.math.div_rn(tl.maximum(col_o, EPS), QMAX * 1.0)
        else:
            s_se = one
            s_so = one
        s_t = tl.math.div_rn(tl.maximum(tl.maximum(tl.max(col_e, axis=0), tl.max(col_o, axis=0)), EPS), QMAX * 1.0)
        return s_se, s_so, s_t

    @triton.jit
    def _write_block(state_ptr, sc_ptr, base, offs_p, offs_j, mask_p, mask_e, mask_o, N, NJ, he, ho, s_c, s_se,
                     s_so, QMAX: tl.constexpr, STORAGE: tl.constexpr, EXACT_DIV: tl.constexpr):
        """Quantize rows ``offs_p`` of the new state with their scales and store them in the state's
        form (codes + row scales, or the dequantized fp32 value)."""
        step_e = s_c[:, None] * s_se[None, :]
        step_o = s_c[:, None] * s_so[None, :]
        if EXACT_DIV:
            ce = quant_codes(tl.math.div_rn(he, step_e), QMAX)
            co = quant_codes(tl.math.div_rn(ho, step_o), QMAX)
        else:  # one division a row and a column, a multiply an element (an ulp off at times)
            inv_c = tl.math.div_rn(s_c * 0.0 + 1.0, s_c)
            ce = quant_codes(he * (inv_c[:, None] * tl.math.div_rn(s_se * 0.0 + 1.0, s_se)[None, :]), QMAX)
            co = quant_codes(ho * (inv_c[:, None] * tl.math.div_rn(s_so * 0.0 + 1.0, s_so)[None, :]), QMAX)
        mask_te = mask_p[:, None] & mask_e[None, :]
        if STORAGE == 0:
            mask_to = mask_p[:, None] & mask_o[None, :]
            elem = (base + offs_p[:, None]) * N + 2 * offs_j[None, :]
            tl.store(state_ptr + elem, ce * step_e, mask=mask_te)
            tl.store(state_ptr + elem + 1, co * step_o, mask=mask_to)
        else:
            pair = (base + offs_p[:, None]) * NJ + offs_j[None, :]
            ie = ce.to(tl.int32)
            io = co.to(tl.int32)
            if STORAGE == 1:
                tl.store(state_ptr + pair, ((ie & 0xFF) | (io << 8)).to(tl.int16), mask=mask_te)
            else:
                tl.store(state_ptr + pair, ((ie & 0xF) | (io << 4)).to(tl.int8), mask=mask_te)
            tl.store(sc_ptr + base + offs_p, s_c, mask=mask_p)

    @triton.jit
    def _state_update_kernel(
        state_ptr, sc_ptr, ss_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
        H, P, N, HEADS_PER_GROUP, DT_LO, DT_HI,
        stride_xb, stride_xh, stride_dtb, stride_bb, stride_bg,
        STORAGE: tl.constexpr, FAKE: tl.constexpr, METHOD: tl.constexpr, QMAX: tl.constexpr,
        STAT_MAX: tl.constexpr, STAT_SQRT: tl.constexpr,
        HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, DT_CLAMP: tl.constexpr,
        HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, EPS: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, EXACT_DIV: tl.constexpr,
    ):
        # One program per (batch, head) = pid; its [P, N] state is walked in blocks of BLOCK_P rows,
        # twice when it is quantized: the first pass finds the scales (a column scale spans every
        # row), the second recomputes the same h and writes the codes. Nothing is written before
        # the second pass has read it, so the update in place has no race.
        pid = tl.program_id(0)
        b = pid // H
        hd = pid % H
        g = hd // HEADS_PER_GROUP
        NJ = N // 2                        # state columns j: even n = 2j, odd n = 2j + 1
        offs_j = tl.arange(0, BLOCK_J)
        mask_e = 2 * offs_j < N
        mask_o = 2 * offs_j + 1 < N
        base = pid.to(tl.int64) * P
        x_row = x_ptr + b * stride_xb + hd * stride_xh

        dt = tl.load(dt_ptr + b * stride_dtb + hd).to(tl.float32)
        if HAS_DT_BIAS:
            dt += tl.load(dt_bias_ptr + hd).to(tl.float32)
        if DT_SOFTPLUS:  # torch's softplus: x itself beyond 20
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        if DT_CLAMP:
            dt = tl.minimum(tl.maximum(dt, DT_LO), DT_HI)
        dA = tl.exp(dt * tl.load(A_ptr + hd).to(tl.float32))
        bc = b * stride_bb + g * stride_bg + 2 * offs_j
        Be = tl.load(B_ptr + bc, mask=mask_e, other=0.0).to(tl.float32)
        Bo = tl.load(B_ptr + bc + 1, mask=mask_o, other=0.0).to(tl.float32)
        Ce = tl.load(C_ptr + bc, mask=mask_e, other=0.0).to(tl.float32)
        Co = tl.load(C_ptr + bc + 1, mask=mask_o, other=0.0).to(tl.float32)
        ss_off = pid.to(tl.int64) * N + 2 * offs_j
        if STORAGE != 0:
            sse = tl.load(ss_ptr + ss_off, mask=mask_e, other=0.0)
            sso = tl.load(ss_ptr + ss_off + 1, mask=mask_o, other=0.0)
        else:
            sse = Be
            sso = Bo
        if HAS_D and not D_PER_CHANNEL:
            d_head = tl.load(D_ptr + hd).to(tl.float32)
        QUANTIZE: tl.constexpr = STORAGE != 0 or FAKE

        # pass 1: y, and the column maxima the state scale needs
        col_e = tl.zeros([BLOCK_J], dtype=tl.float32)
        col_o = tl.zeros([BLOCK_J], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            he, ho, x = _new_state(state_ptr, sc_ptr, ss_ptr, x_ptr, base, offs_p, offs_j, mask_p, mask_e, mask_o,
                                   N, NJ, x_row, dA, dA, dt, Be, Bo, sse, sso, STORAGE)
            y = tl.sum(he * Ce[None, :], axis=1) + tl.sum(ho * Co[None, :], axis=1)
            if HAS_D:
                if D_PER_CHANNEL:
                    y += x * tl.load(D_ptr + hd * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
                else:
                    y += x * d_head
            tl.store(y_ptr + base + offs_p, y, mask=mask_p)
            if QUANTIZE:
                ae = tl.abs(he)                                                  # 0 where masked
                ao = tl.abs(ho)
                if METHOD == 0:
                    s_c = _channel_scale(ae, ao, N, METHOD, QMAX, STAT_MAX, STAT_SQRT, EPS)
                    if EXACT_DIV:
                        col_e = tl.maximum(col_e, tl.max(tl.math.div_rn(ae, s_c[:, None]), axis=0))
                        col_o = tl.maximum(col_o, tl.max(tl.math.div_rn(ao, s_c[:, None]), axis=0))
                    else:  # one division a row, a multiply an element (an ulp off at times)
                        inv = tl.math.div_rn(tl.full([BLOCK_P], 1.0, tl.float32), s_c)
                        col_e = tl.maximum(col_e, tl.max(ae * inv[:, None], axis=0))
                        col_o = tl.maximum(col_o, tl.max(ao * inv[:, None], axis=0))
                elif METHOD >= 2:
                    col_e = tl.maximum(col_e, tl.max(ae, axis=0))
                    col_o = tl.maximum(col_o, tl.max(ao, axis=0))
            else:
                mask_te = mask_p[:, None] & mask_e[None, :]
                mask_to = mask_p[:, None] & mask_o[None, :]
                elem = (base + offs_p[:, None]) * N + 2 * offs_j[None, :]
                tl.store(state_ptr + elem, he, mask=mask_te)
                tl.store(state_ptr + elem + 1, ho, mask=mask_to)

        if QUANTIZE:
            s_se, s_so, s_t = _state_scales(col_e, col_o, METHOD, QMAX, EPS, BLOCK_J)
            # pass 2: the same h again (from the old codes, still in place), quantized
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                mask_p = offs_p < P
                he, ho, x = _new_state(state_ptr, sc_ptr, ss_ptr, x_ptr, base, offs_p, offs_j, mask_p, mask_e,
                                       mask_o, N, NJ, x_row, dA, dA, dt, Be, Bo, sse, sso, STORAGE)
                s_c = _channel_scale(tl.abs(he), tl.abs(ho), N, METHOD, QMAX, STAT_MAX, STAT_SQRT, EPS)
                if METHOD == 3:
                    s_c = s_c * s_t
                _write_block(state_ptr, sc_ptr, base, offs_p, offs_j, mask_p, mask_e, mask_o, N, NJ, he, ho, s_c,
                             s_se, s_so, QMAX, STORAGE, EXACT_DIV)
            if STORAGE != 0:   # last: every row above dequantized with the old state scale
                tl.store(ss_ptr + ss_off, s_se, mask=mask_e)
                tl.store(ss_ptr + ss_off + 1, s_so, mask=mask_o)

    @triton.jit
    def _step_size(dt_ptr, dt_bias_ptr, A_ptr, b, hd, stride_dtb, DT_LO, DT_HI, HAS_DT_BIAS: tl.constexpr,
                   DT_SOFTPLUS: tl.constexpr, DT_CLAMP: tl.constexpr):
        dt = tl.load(dt_ptr + b * stride_dtb + hd).to(tl.float32)
        if HAS_DT_BIAS:
            dt += tl.load(dt_bias_ptr + hd).to(tl.float32)
        if DT_SOFTPLUS:  # torch's softplus: x itself beyond 20
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        if DT_CLAMP:
            dt = tl.minimum(tl.maximum(dt, DT_LO), DT_HI)
        return dt, tl.exp(dt * tl.load(A_ptr + hd).to(tl.float32))

    @triton.jit
    def _split_pass_kernel(
        state_ptr, sc_ptr, ss_ptr, col_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
        H, P, N, HEADS_PER_GROUP, DT_LO, DT_HI,
        stride_xb, stride_xh, stride_dtb, stride_bb, stride_bg,
        STORAGE: tl.constexpr, FAKE: tl.constexpr, METHOD: tl.constexpr, QMAX: tl.constexpr,
        STAT_MAX: tl.constexpr, STAT_SQRT: tl.constexpr,
        HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, DT_CLAMP: tl.constexpr,
        HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, EPS: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, SECOND: tl.constexpr, MAMBA1: tl.constexpr = False,
    ):
        # The same step as _state_update_kernel, one program per (batch, head, block of rows), in
        # launches: the first (SECOND=False) computes y and folds the block's column maxima into
        # col [b*H, N] (atomic max: order-free, so deterministic); the second recomputes the same h
        # from the old codes and writes the codes and row scales of its own rows; a third launch
        # (_split_finish_kernel) turns col into the state scale, which every second-launch program
        # had to read in its old form.
        pid = tl.program_id(0)
        b = pid // H
        hd = pid % H
        g = hd // HEADS_PER_GROUP
        NJ = N // 2
        offs_j = tl.arange(0, BLOCK_J)
        mask_e = 2 * offs_j < N
        mask_o = 2 * offs_j + 1 < N
        base = pid.to(tl.int64) * P
        x_row = x_ptr + b * stride_xb + hd * stride_xh
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        if MAMBA1:  # one "head" of d_inner rows: dt per row, A per (row, state)
            dt = tl.load(dt_ptr + b * stride_dtb + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            if HAS_DT_BIAS:
                dt += tl.load(dt_bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            if DT_SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            if DT_CLAMP:
                dt = tl.minimum(tl.maximum(dt, DT_LO), DT_HI)
            a_off = offs_p[:, None] * N + 2 * offs_j[None, :]
            A_e = tl.load(A_ptr + a_off, mask=mask_p[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
            A_o = tl.load(A_ptr + a_off + 1, mask=mask_p[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
            dA_e = tl.exp(dt[:, None] * A_e)
            dA_o = tl.exp(dt[:, None] * A_o)
        else:
            dt, dA_e = _step_size(dt_ptr, dt_bias_ptr, A_ptr, b, hd, stride_dtb, DT_LO, DT_HI, HAS_DT_BIAS,
                                  DT_SOFTPLUS, DT_CLAMP)
            dA_o = dA_e
        bc = b * stride_bb + g * stride_bg + 2 * offs_j
        Be = tl.load(B_ptr + bc, mask=mask_e, other=0.0).to(tl.float32)
        Bo = tl.load(B_ptr + bc + 1, mask=mask_o, other=0.0).to(tl.float32)
        ss_off = pid.to(tl.int64) * N + 2 * offs_j
        if STORAGE != 0:
            sse = tl.load(ss_ptr + ss_off, mask=mask_e, other=0.0)
            sso = tl.load(ss_ptr + ss_off + 1, mask=mask_o, other=0.0)
        else:
            sse = Be
            sso = Bo
        he, ho, x = _new_state(state_ptr, sc_ptr, ss_ptr, x_ptr, base, offs_p, offs_j, mask_p, mask_e, mask_o,
                               N, NJ, x_row, dA_e, dA_o, dt, Be, Bo, sse, sso, STORAGE)
        ae = tl.abs(he)
        ao = tl.abs(ho)
        s_c = _channel_scale(ae, ao, N, METHOD, QMAX, STAT_MAX, STAT_SQRT, EPS)
        if not SECOND:
            Ce = tl.load(C_ptr + bc, mask=mask_e, other=0.0).to(tl.float32)
            Co = tl.load(C_ptr + bc + 1, mask=mask_o, other=0.0).to(tl.float32)
            y = tl.sum(he * Ce[None, :], axis=1) + tl.sum(ho * Co[None, :], axis=1)
            if HAS_D:
                if D_PER_CHANNEL:
                    y += x * tl.load(D_ptr + hd * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
                else:
                    y += x * tl.load(D_ptr + hd).to(tl.float32)
            tl.store(y_ptr + base + offs_p, y, mask=mask_p)
            if METHOD != 1:   # per-channel needs no column maximum
                if METHOD == 0:
                    ce = tl.max(tl.math.div_rn(ae, s_c[:, None]), axis=0)
                    co = tl.max(tl.math.div_rn(ao, s_c[:, None]), axis=0)
                else:
                    ce = tl.max(ae, axis=0)
                    co = tl.max(ao, axis=0)
                tl.atomic_max(col_ptr + ss_off, ce, mask=mask_e)
                tl.atomic_max(col_ptr + ss_off + 1, co, mask=mask_o)
        else:
            col_e = tl.load(col_ptr + ss_off, mask=mask_e, other=0.0)
            col_o = tl.load(col_ptr + ss_off + 1, mask=mask_o, other=0.0)
            s_se, s_so, s_t = _state_scales(col_e, col_o, METHOD, QMAX, EPS, BLOCK_J)
            if METHOD == 3:
                s_c = s_c * s_t
            _write_block(state_ptr, sc_ptr, base, offs_p, offs_j, mask_p, mask_e, mask_o, N, NJ, he, ho, s_c,
                         s_se, s_so, QMAX, STORAGE, True)

    @triton.jit
    def _split_finish_kernel(ss_ptr, col_ptr, N, METHOD: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr,
                             BLOCK_N: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * N + tl.arange(0, BLOCK_N)
        mask = tl.arange(0, BLOCK_N) < N
        col = tl.load(col_ptr + offs, mask=mask, other=0.0)
        if METHOD == 0 or METHOD == 2:
            s_s = tl.math.div_rn(tl.maximum(col, EPS), QMAX * 1.0)
        else:
            s_s = tl.full([BLOCK_N], 1.0, tl.float32)
        tl.store(ss_ptr + offs, s_s, mask=mask)


def _launch_split(heads: int, rows: int, n: int, scale_state: torch.Tensor, args: tuple, col: torch.Tensor,
                  flags: dict, num_warps: int) -> None:
    """The split form's three launches over (head, block of rows) programs: y and the column
    maxima, then the codes, then the state scale from the maxima. `args` are the pass kernel's."""
    grid = (heads, triton.cdiv(rows, flags["BLOCK_P"]))
    _split_pass_kernel[grid](*args, **flags, SECOND=False, num_warps=num_warps)
    _split_pass_kernel[grid](*args, **flags, SECOND=True, num_warps=num_warps)
    _split_finish_kernel[(heads,)](scale_state, col, n, METHOD=flags["METHOD"], QMAX=flags["QMAX"], EPS=STATE_EPS,
                                   BLOCK_N=triton.next_power_of_2(n), num_warps=1)


def state_update_triton(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
    C_in: torch.Tensor, D: torch.Tensor | None = None, scale_channel: torch.Tensor | None = None,
    scale_state: torch.Tensor | None = None, bits: int = 8, channel_stat: str = "abs.mean.sqrt",
    method: str = "dsq", fake_quant: bool = False, dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
    num_warps: int | None = None, block_p: int | None = None, exact_div: bool = True,
    split: bool | None = None,
) -> torch.Tensor:
    """Launch the kernel (arguments as :func:`state_update`).

    Shapes: ``state`` fp32 ``[B, H, P, N]``, int8 ``[B, H, P, N]`` or packed uint8
    ``[B, H, P, N / 2]`` (contiguous: updated in place); ``scale_channel fp32 [B, H, P, 1]`` and
    ``scale_state fp32 [B, H, 1, N]`` (contiguous; in place) for codes; ``x [B, H, P]``,
    ``dt [B, H]``, ``dt_bias [H] | None``, ``A [H]``, ``B_in / C_in [B, G, N]``,
    ``D [H] | [H, P] | None`` in any float dtype -> ``y fp32 [B, H, P]``.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    storage = _check(state, x, dt, A, B_in, C_in, D, scale_channel, scale_state, bits, channel_stat, method,
                     fake_quant, dt_bias)
    qmax = qmax_for(bits)
    b, nh, p = x.shape
    n = B_in.shape[2]
    assert state.is_contiguous(), "state is updated in place and must be contiguous"
    if storage != "float":
        assert scale_channel.is_contiguous() and scale_state.is_contiguous(), "scales are updated in place"
    if storage == "int8":
        assert n % 2 == 0, f"the int8 kernel reads code pairs and needs an even state size, got {n}"
        words = state.view(torch.int16)
    elif storage == "packed":
        words = state.view(torch.int8)  # signed, so the high nibble shifts down with its sign
    else:
        words = state
    # the inputs are small: make them contiguous so B and C share strides and dt, A, D are flat
    x, dt, A, B_in, C_in = (t.contiguous() for t in (x, dt, A, B_in, C_in))
    D = None if D is None else D.contiguous()
    dt_bias = None if dt_bias is None else dt_bias.contiguous()
    y = torch.empty((b, nh, p), dtype=torch.float32, device=x.device)
    if b == 0:
        return y
    bj = triton.next_power_of_2((n + 1) // 2)
    # rows per block: ~2K values a block keeps the registers few and many programs resident
    bp = block_p or max(1, min(triton.next_power_of_2(p), 2048 // bj))
    assert bp & (bp - 1) == 0, f"block_p must be a power of two, got {bp}"
    if num_warps is None:
        num_warps = 4
    lo, hi = (float(v) for v in dt_limit)
    flags = dict(
        STORAGE=_STORAGE[storage], FAKE=fake_quant, METHOD=METHODS.index(method), QMAX=qmax,
        STAT_MAX=channel_stat.startswith("abs.max"), STAT_SQRT=channel_stat.endswith(".sqrt"),
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, DT_CLAMP=(lo, hi) != (0.0, float("inf")),
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, EPS=STATE_EPS,
        BLOCK_P=bp, BLOCK_J=bj,
    )
    if split is None:
        split = SPLIT_ROWS
    if split and storage != "float":
        # quantized codes: three launches over (batch, head, row block) programs
        col = torch.zeros((b * nh, n), dtype=torch.float32, device=x.device)
        _launch_split(b * nh, p, n, scale_state, (
            words, scale_channel, scale_state, col, x, dt, dt_bias, A, B_in, C_in, D, y,
            nh, p, n, nh // B_in.shape[1], lo, min(hi, 3.0e38),
            x.stride(0), x.stride(1), dt.stride(0), B_in.stride(0), B_in.stride(1)), col, flags, num_warps)
        return y
    _state_update_kernel[(b * nh,)](
        words, scale_channel, scale_state, x, dt, dt_bias, A, B_in, C_in, D, y,
        nh, p, n, nh // B_in.shape[1], lo, min(hi, 3.0e38),
        x.stride(0), x.stride(1), dt.stride(0), B_in.stride(0), B_in.stride(1),
        **flags, EXACT_DIV=exact_div, num_warps=num_warps,
    )
    return y


def state_update(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
    C_in: torch.Tensor, D: torch.Tensor | None = None, scale_channel: torch.Tensor | None = None,
    scale_state: torch.Tensor | None = None, bits: int = 8, channel_stat: str = "abs.mean.sqrt",
    method: str = "dsq", fake_quant: bool = False, dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """One Mamba-2 step on a quantized (int8 or packed int4 ``state`` + scales), fake-quantized or
    fp32 state cache.

    Updates ``state`` (and the scales) in place and returns ``y fp32 [B, H, P]``. The Triton
    kernel on CUDA (or on CPU under ``TRITON_INTERPRET=1``), else the reference. An int8 state of
    odd size runs the reference (the kernel reads code pairs).
    """
    args = (state, x, dt, A, B_in, C_in, D, scale_channel, scale_state, bits, channel_stat, method, fake_quant,
            dt_bias, dt_softplus, dt_limit)
    if use_triton(x) and not (state.dtype == torch.int8 and B_in.shape[2] % 2):
        return state_update_triton(*args)
    return state_update_ref(*args)


# ------------------------------------------------------------------------------------- Mamba-1
# The Mamba-1 state [B, d_inner, N] is the Mamba-2 kernel's one head of P = d_inner rows, with the
# step size per row (not per head) and A per (row, state): the split kernel's MAMBA1 form.


def _check_mamba1(state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
                  C_in: torch.Tensor, D: torch.Tensor | None, scale_channel: torch.Tensor, scale_state: torch.Tensor,
                  bits: int, channel_stat: str, method: str, dt_bias: torch.Tensor | None) -> str:
    assert u.dim() == 2, f"u must be [B, d_inner], got {tuple(u.shape)}"
    b, d = u.shape
    assert B_in.dim() == 2 and B_in.shape[0] == b and C_in.shape == B_in.shape, "B, C must be [B, N]"
    n = B_in.shape[1]
    storage = {torch.int8: "int8", torch.uint8: "packed"}.get(state.dtype)
    assert storage is not None, f"the Mamba-1 kernel takes int8 or packed uint8 codes, got {state.dtype}"
    assert n % 2 == 0, f"the kernel reads code pairs and needs an even state size, got {n}"
    stored = n // 2 if storage == "packed" else n
    assert state.shape == (b, d, stored), f"state {tuple(state.shape)} is not [{b}, {d}, {stored}]"
    assert delta.shape == (b, d) and A.shape == (d, n), f"delta {tuple(delta.shape)} / A {tuple(A.shape)}"
    assert dt_bias is None or dt_bias.shape == (d,), f"dt_bias {tuple(dt_bias.shape)} is not {(d,)}"
    assert D is None or D.shape == (d,), f"D {tuple(D.shape)} is not {(d,)}"
    assert scale_channel.shape == (b, d, 1) and scale_state.shape == (b, 1, n), "scales are [B, d, 1], [B, 1, N]"
    assert scale_channel.dtype == scale_state.dtype == torch.float32, "scales must be float32"
    assert channel_stat in CHANNEL_STATS and method in METHODS
    assert storage != "packed" or qmax_for(bits) <= 7, f"{bits}-bit codes do not fit a nibble"
    return storage


def mamba1_state_update_ref(
    state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
    C_in: torch.Tensor, D: torch.Tensor | None, scale_channel: torch.Tensor, scale_state: torch.Tensor,
    bits: int = 8, channel_stat: str = "abs.mean.sqrt", method: str = "dsq",
    dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
) -> torch.Tensor:
    """PyTorch reference of :func:`mamba1_state_update` (updates in place, returns y fp32 [B, d])."""
    storage = _check_mamba1(state, u, delta, A, B_in, C_in, D, scale_channel, scale_state, bits, channel_stat,
                            method, dt_bias)
    codes = unpack_int4(state) if storage == "packed" else state
    h_prev = codes.float() * (scale_channel * scale_state)
    dt = _step_size_ref(delta, dt_bias, dt_softplus, (0.0, float("inf")))
    uf = u.float()
    h = torch.exp(dt.unsqueeze(-1) * A.float()) * h_prev + (dt * uf).unsqueeze(-1) * B_in.float().unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", h, C_in.float())
    if D is not None:
        y = y + uf * D.float()
    q, s_c, s_s = _dsq_ref(h, bits, channel_stat, method)
    state.copy_(pack_int4(q) if storage == "packed" else q)
    scale_channel.copy_(s_c)
    scale_state.copy_(s_s)
    return y


def mamba1_state_update_triton(
    state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
    C_in: torch.Tensor, D: torch.Tensor | None, scale_channel: torch.Tensor, scale_state: torch.Tensor,
    bits: int = 8, channel_stat: str = "abs.mean.sqrt", method: str = "dsq",
    dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
    block_p: int | None = None, num_warps: int = 4,
) -> torch.Tensor:
    """Launch the split kernel in its Mamba-1 form (arguments as :func:`mamba1_state_update`)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    storage = _check_mamba1(state, u, delta, A, B_in, C_in, D, scale_channel, scale_state, bits, channel_stat,
                            method, dt_bias)
    assert state.is_contiguous() and scale_channel.is_contiguous() and scale_state.is_contiguous(), (
        "the state and its scales are updated in place and must be contiguous")
    b, d = u.shape
    n = B_in.shape[1]
    words = state.view(torch.int16) if storage == "int8" else state.view(torch.int8)
    u, delta, B_in, C_in = (t.contiguous() for t in (u, delta, B_in, C_in))
    A = A.float().contiguous()
    D = None if D is None else D.contiguous()
    dt_bias = None if dt_bias is None else dt_bias.contiguous()
    y = torch.empty((b, d), dtype=torch.float32, device=u.device)
    if b == 0:
        return y
    bj = triton.next_power_of_2(n // 2)
    bp = block_p or max(1, min(triton.next_power_of_2(d), 2048 // bj))
    assert bp & (bp - 1) == 0, f"block_p must be a power of two, got {bp}"
    qmax = qmax_for(bits)
    col = torch.zeros((b, n), dtype=torch.float32, device=u.device)
    flags = dict(
        STORAGE=_STORAGE[storage], FAKE=False, METHOD=METHODS.index(method), QMAX=qmax,
        STAT_MAX=channel_stat.startswith("abs.max"), STAT_SQRT=channel_stat.endswith(".sqrt"),
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, DT_CLAMP=False,
        HAS_D=D is not None, D_PER_CHANNEL=True, EPS=STATE_EPS, BLOCK_P=bp, BLOCK_J=bj, MAMBA1=True,
    )
    _launch_split(b, d, n, scale_state, (   # one "head" a sequence: no head or group strides
        words, scale_channel, scale_state, col, u, delta, dt_bias, A, B_in, C_in, D, y,
        1, d, n, 1, 0.0, 3.0e38, u.stride(0), 0, delta.stride(0), B_in.stride(0), 0), col, flags, num_warps)
    return y


def mamba1_state_update(
    state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B_in: torch.Tensor,
    C_in: torch.Tensor, D: torch.Tensor | None, scale_channel: torch.Tensor, scale_state: torch.Tensor,
    bits: int = 8, channel_stat: str = "abs.mean.sqrt", method: str = "dsq",
    dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
) -> torch.Tensor:
    """One Mamba-1 step on a quantized state cache: int8 codes ``[B, d_inner, N]`` or packed int4
    ``[B, d_inner, N / 2]`` with ``scale_channel fp32 [B, d_inner, 1]`` and ``scale_state fp32
    [B, 1, N]`` (updated in place); ``u, delta [B, d_inner]`` (delta raw with ``dt_bias`` and
    ``dt_softplus``), ``A [d_inner, N]``, ``B_in / C_in [B, N]``, ``D [d_inner]`` -> ``y fp32
    [B, d_inner]`` (before the gate). The Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``),
    else the reference."""
    args = (state, u, delta, A, B_in, C_in, D, scale_channel, scale_state, bits, channel_stat, method, dt_bias,
            dt_softplus)
    if use_triton(u):
        return mamba1_state_update_triton(*args)
    return mamba1_state_update_ref(*args)
