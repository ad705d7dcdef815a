"""State-cache quantization (Q-Mamba): DSQ and the per-tensor / per-channel / per-state baselines.

A state is ``h[..., P, N]``: the second-to-last dim is the *channel* ``i`` (Mamba-2 headdim, Mamba-1
d_inner) and the last is the *state* ``j`` (d_state). Every leading dim (batch, heads, time, ...)
gets its own scales, so scales are per sample and per head.

Scales are dynamic: they are recomputed from the state itself at every step rather than
calibrated once. The state changes with every token (it accumulates input and decays), so a
static scale calibrated on some tokens clips on others; Q-Mamba also computes them on the fly.
All scales here are min-max, so nothing is ever clipped; the methods differ only in how the
range is shared:

* ``per-tensor``: one scale per (sample, head), ``max|h| / qmax``.
* ``per-channel`` (MinMax, the paper's baseline): per channel ``i``, ``max_j |h_ij| / qmax``.
* ``per-state``: per state ``j``, ``max_i |h_ij| / qmax``.
* ``dsq`` (decoupled scale quantization): ``S_channel,i = f(h_i.)`` (default
  ``sqrt(mean_j |h_ij|)``), ``S_state,j = max_i |h_ij| / S_channel,i`` and
  ``scale_ij = S_channel,i * S_state,j / qmax``. Taking the max of the ratio over ``i`` makes the
  outer-product scale cover every entry, so DSQ is clip-free too.

The integer form returns the two factors, ``scale_channel[..., P, 1]`` and ``scale_state[..., 1,
N]`` (the missing one is ones; ``1/qmax`` lives in whichever factor carries the range), and the
dequantized state is ``q * (scale_channel * scale_state)``, computed in that order in fp32.
``quantize_state`` uses the very same scales and operations, so fake quantization and
quantize-int-then-dequantize agree bit for bit (kernels and export must use this product).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from mqtool.errors import MqtoolError
from mqtool.quant.quantizers import true_div

METHODS: tuple[str, ...] = ("per-tensor", "per-channel", "per-state", "dsq")
CHANNEL_SCALES: tuple[str, ...] = ("abs.max", "abs.max.sqrt", "abs.mean", "abs.mean.sqrt")
BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 16)
# Floor for every range statistic: an all-zero row/column/state would otherwise divide 0 by 0.
# With the floor a zero entry gives code 0 and dequantizes to exactly 0. It is far below any state
# magnitude that matters, and EPS**2 / qmax is still a normal fp32 number, so scales never underflow.
EPS = 1e-12


def _check(bits: int, method: str, channel_scale: str) -> None:
    # bool is an int subclass; `bits=True` is a user mistake, not 1 bit.
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise MqtoolError(f"state bits must be one of {list(BITS)} (16 = unquantized), got {bits!r}")
    if method not in METHODS:
        raise MqtoolError(f"unknown state quantization method {method!r}; choose one of {list(METHODS)}")
    if channel_scale not in CHANNEL_SCALES:
        raise MqtoolError(
            f"unknown DSQ channel_scale {channel_scale!r}; choose one of {list(CHANNEL_SCALES)}"
        )


def _check_state(h: Tensor) -> None:
    if not isinstance(h, Tensor) or not h.is_floating_point() or h.dim() < 2:
        raise MqtoolError("a state must be a floating-point tensor [..., channel, state] (>= 2 dims)")


def qmax_for(bits: int) -> int:
    """Largest symmetric code for ``bits`` (e.g. 7 for 4 bits)."""
    return 2 ** (bits - 1) - 1


def _channel_statistic(a: Tensor, channel_scale: str) -> Tensor:
    """``f(|h_i.|)`` over the state dim, keepdim -> [..., P, 1]."""
    stat = a.amax(dim=-1, keepdim=True) if channel_scale.startswith("abs.max") else a.mean(-1, keepdim=True)
    return stat.sqrt() if channel_scale.endswith(".sqrt") else stat


def _scales(h32: Tensor, bits: int, method: str, channel_scale: str) -> tuple[Tensor, Tensor]:
    """Unchecked fp32 scale factors ``([..., P, 1], [..., 1, N])``; their product is the step size."""
    qmax = qmax_for(bits)
    a = h32.abs()
    row_shape = (*h32.shape[:-1], 1)
    col_shape = (*h32.shape[:-2], 1, h32.shape[-1])
    if method == "per-tensor":
        s = true_div(a.amax(dim=(-2, -1), keepdim=True).clamp_min(EPS), qmax)
        return s.expand(row_shape).contiguous(), h32.new_ones(col_shape)
    if method == "per-channel":
        return true_div(a.amax(dim=-1, keepdim=True).clamp_min(EPS), qmax), h32.new_ones(col_shape)
    if method == "per-state":
        return h32.new_ones(row_shape), true_div(a.amax(dim=-2, keepdim=True).clamp_min(EPS), qmax)
    # dsq
    s_channel = _channel_statistic(a, channel_scale).clamp_min(EPS)
    s_state = (a / s_channel).amax(dim=-2, keepdim=True).clamp_min(EPS)
    return s_channel, true_div(s_state, qmax)


def state_scales(
    h: Tensor, bits: int, method: str, channel_scale: str = "abs.mean.sqrt"
) -> tuple[Tensor, Tensor]:
    """Dynamic fp32 scales ``(scale_channel [..., P, 1], scale_state [..., 1, N])`` of state ``h``.

    The quantization step is ``scale_channel * scale_state``; the factor a method does not use is ones.
    """
    _check(bits, method, channel_scale)
    _check_state(h)
    if bits == 16:
        raise MqtoolError("16-bit states are unquantized: there are no scales or integer codes")
    return _scales(h.detach().float(), bits, method, channel_scale)


def _round_ste(x: Tensor) -> Tensor:
    # x + (round(x) - x) is exactly round(x) in floating point (the difference is exact and the sum
    # is an integer), so the forward value is unchanged and the backward is the identity.
    return x + (x.round() - x).detach()


def quantize_state(
    h: Tensor, bits: int, method: str, channel_scale: str = "abs.mean.sqrt", ste: bool = False
) -> Tensor:
    """Fake-quantize state ``h`` (quantize, then dequantize) to ``bits``; returns ``h``'s dtype.

    ``ste=True`` makes the backward the identity (straight-through round, scales treated as
    constants) without changing the forward value; reconstruction training needs it.
    """
    _check(bits, method, channel_scale)
    _check_state(h)
    if bits == 16:
        return h
    qmax = qmax_for(bits)
    h32 = h.float()
    if ste:
        # Scales are a per-step statistic, not something to learn: gradients through max/mean
        # would be sparse and noisy, so they are constants for the backward.
        with torch.no_grad():
            s_channel, s_state = _scales(h32, bits, method, channel_scale)
        step = s_channel * s_state
        x = _round_ste(h32 / step)
        # Min-max scales never clip, but h/step can exceed qmax by an ulp; a plain clamp would
        # zero the gradient of exactly those (largest) entries, so clamp straight-through as well.
        codes = x + (x.clamp(-qmax, qmax) - x).detach()
    else:
        s_channel, s_state = _scales(h32, bits, method, channel_scale)
        step = s_channel * s_state
        codes = (h32 / step).round().clamp(-qmax, qmax)
    return (codes * step).to(h.dtype)


def quantize_state_int(
    h: Tensor, bits: int, method: str, channel_scale: str = "abs.mean.sqrt"
) -> tuple[Tensor, Tensor, Tensor]:
    """Integer form: ``(q int8, scale_channel [..., P, 1], scale_state [..., 1, N])``."""
    s_channel, s_state = state_scales(h, bits, method, channel_scale)
    qmax = qmax_for(bits)
    # Same operations, same order as quantize_state: the two forms must agree bit for bit.
    q = (h.detach().float() / (s_channel * s_state)).round().clamp(-qmax, qmax).to(torch.int8)
    return q, s_channel, s_state


def dequantize_state_int(
    q: Tensor, scale_channel: Tensor, scale_state: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``q * (scale_channel * scale_state)`` in fp32, cast to ``dtype``."""
    return (q.float() * (scale_channel.float() * scale_state.float())).to(dtype)


class StateQuantizer(nn.Module):
    """Fake-quantizes a state cache with dynamic scales; attach at the model's state-update point.

    With gradients enabled the forward uses the straight-through estimator: its value is identical
    to plain fake quantization and it lets reconstruction (ESR) backpropagate through the state.
    """

    def __init__(self, bits: int = 8, method: str = "dsq", channel_scale: str = "abs.mean.sqrt") -> None:
        super().__init__()
        _check(bits, method, channel_scale)
        self.bits = bits
        self.method = method
        self.channel_scale = channel_scale

    def forward(self, h: Tensor) -> Tensor:
        # the straight-through form only when something may backpropagate: same values, fewer ops
        return quantize_state(h, self.bits, self.method, self.channel_scale, ste=torch.is_grad_enabled())

    def mamba2_step(self, state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                    D: Tensor | None) -> Tensor | None:
        """One Mamba-2 step and this quantization fused in one Triton kernel (``mqtool.kernels``)
        on the model's fp32 cache, updated in place to ``Q(h_t)``; returns ``y [b, h, p]`` fp32.

        The unfused step reads and writes the whole state about a dozen times (abs, mean, max,
        divide, round, multiply ...); the kernel once, so a state-quantized recurrent evaluation is
        several times faster on a GPU. ``MQTOOL_FUSED_STATE``: unset = on CUDA when Triton is
        installed, ``0`` = never, ``1`` = wherever Triton runs (on CPU: Triton's interpreter, for tests).
        Returns None where it does not apply (also: gradients wanted, 16 bits): the caller then runs
        ``scan.mamba2_step`` and this module's ``forward``, which compute the same values.
        """
        wanted = os.environ.get("MQTOOL_FUSED_STATE", "")
        if self.bits == 16 or torch.is_grad_enabled() or wanted == "0" or (wanted != "1" and not state.is_cuda):
            return None
        # imported here: importing mqtool.kernels fixes whether Triton interprets (TRITON_INTERPRET)
        from mqtool import kernels

        if not kernels.use_triton(state):
            return None
        return kernels.state_update(state, x, dt, A, B, C, D, bits=self.bits, channel_stat=self.channel_scale,
                                    method=self.method, fake_quant=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON description for the checkpoint manifest."""
        return {"bits": self.bits, "method": self.method, "channel_scale": self.channel_scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StateQuantizer:
        """Inverse of :meth:`to_dict`; a missing or unknown key is a manifest error."""
        if not isinstance(d, dict):
            raise MqtoolError(f"state quantizer entry must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {"bits", "method", "channel_scale"}
        if unknown or "bits" not in d or "method" not in d:
            raise MqtoolError(
                f"state quantizer entry needs 'bits' and 'method' (optional 'channel_scale'), got {sorted(d)}"
            )
        return cls(d["bits"], d["method"], d.get("channel_scale", "abs.mean.sqrt"))

    def extra_repr(self) -> str:
        extra = f", channel_scale={self.channel_scale}" if self.method == "dsq" else ""
        return f"bits={self.bits}, method={self.method}{extra}"


def quantize_one_step(
    h_all: Tensor, dA: Tensor, dBx: Tensor, quantizer: StateQuantizer, h0: Tensor | None = None
) -> Tensor:
    """ESR's quantization-aware parallel step: ``h_q[:, t] = dA[:, t] * Q(h[:, t-1]) + dBx[:, t]``.

    ``h_all[b, t, ..., P, N]`` are the exact states after each step (from a parallel scan),
    ``dBx`` has ``h_all``'s shape, and ``dA[b, t, ...]`` is aligned from the left and broadcast
    over its missing trailing dims (so a Mamba-2 ``[b, t, H]`` decay works as is). ``h0`` is the
    state before step 0 (zeros if omitted). Only one step is quantized, which is what makes this
    parallel; the quantizer's straight-through backward lets gradients reach ``dA`` and ``dBx``.
    """
    if h_all.dim() < 4:
        raise MqtoolError(f"h_all must be [batch, time, ..., channel, state], got shape {tuple(h_all.shape)}")
    if dBx.shape != h_all.shape:
        raise MqtoolError(f"dBx shape {tuple(dBx.shape)} must equal h_all shape {tuple(h_all.shape)}")
    if dA.dim() > h_all.dim():
        raise MqtoolError(f"dA shape {tuple(dA.shape)} has more dims than h_all {tuple(h_all.shape)}")
    dA = dA.reshape(*dA.shape, *([1] * (h_all.dim() - dA.dim())))
    try:
        torch.broadcast_shapes(dA.shape, h_all.shape)
    except RuntimeError as e:
        raise MqtoolError(
            f"dA shape {tuple(dA.shape)} does not broadcast to h_all {tuple(h_all.shape)}"
        ) from e
    step_shape = (h_all.shape[0], *h_all.shape[2:])
    if h0 is None:
        h0 = h_all.new_zeros(step_shape)
    elif h0.shape != step_shape:
        raise MqtoolError(f"h0 shape {tuple(h0.shape)} must be {step_shape} (h_all without the time dim)")
    h_prev = torch.cat([h0.to(h_all.dtype).unsqueeze(1), h_all[:, :-1]], dim=1)
    # The time dim is just another leading dim for the quantizer: every step gets its own scales.
    return dA * quantizer(h_prev) + dBx
