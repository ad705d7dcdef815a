"""Integer formats shared by every method, the exporter and the integer kernels.

Conventions (the kernels must reproduce these bit for bit, so they are spelled out once here):

* Symmetric, no zero point. A ``bits``-bit value lies in ``[-qmax, qmax]`` with
  ``qmax = 2**(bits-1) - 1`` (int8: [-127, 127], int4: [-7, 7]). The most negative code (-128 / -8)
  is never produced, so negation is exact and the grid is symmetric around zero.
* Integers are stored in ``torch.int8`` whatever ``bits`` is (int4 packing happens at export).
* Scales are ``float32``, computed in float32 as ``absmax / qmax`` (a true division, not a multiply
  by ``1/qmax``) and clamped below at :data:`SCALE_MIN` so an all-zero row still has a usable scale.
* ``q = clamp(round(x / scale), -qmax, qmax)`` with ``torch.round`` (round half to even), again a
  true division. Dequantization is ``q * scale`` in float32.
* Weights ``[out, in]``: per output channel -> ``scale [out, 1]``; per group of ``group_size``
  consecutive input columns -> ``scale [out, in // group_size]``.
* Activations: dynamic per token -> ``scale [..., 1]`` (one per row of the last dim);
  static per tensor -> a 0-d scale fixed at calibration.

Every fake-quant function computes in float32 and returns the input's dtype; with ``ste=True`` the
rounding uses a straight-through estimator so gradients reach the input (used by reconstruction).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mqtool.errors import MqtoolError

#: Smallest scale ever produced; keeps ``x / scale`` finite for all-zero rows or tensors.
SCALE_MIN = 1e-8

__all__ = [
    "SCALE_MIN",
    "ActQuantizer",
    "dequantize_weight",
    "fake_quantize_per_tensor",
    "fake_quantize_per_token",
    "fake_quantize_weight",
    "qmax_for",
    "quantize_per_tensor",
    "quantize_per_token",
    "quantize_weight",
    "round_ste",
    "scale_from_absmax",
    "static_scale_from_absmax",
    "weight_scale",
]


def qmax_for(bits: int) -> int:
    """Largest code of the symmetric ``bits``-bit grid (``2**(bits-1) - 1``); bits must be 2..8."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise MqtoolError(f"bits must be an integer from 2 to 8 (int8 storage), got {bits!r}")
    return 2 ** (bits - 1) - 1


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def true_div(x: Tensor, d: float) -> Tensor:
    """``x / d`` as an IEEE division on every device. On CUDA, PyTorch turns a division by a Python
    number into a multiply by its reciprocal (an ulp off at times), which would make scales, and so
    codes, differ between CPU and GPU and from the kernels' ``div_rn``; a divisor tensor on ``x``'s
    device keeps the true division."""
    return x / torch.full((), d, dtype=x.dtype, device=x.device)


def scale_from_absmax(absmax: Tensor, bits: int) -> Tensor:
    """The one scale rule: ``max(absmax / qmax, SCALE_MIN)`` in float32 (true division)."""
    qmax = qmax_for(bits)
    return true_div(absmax.float(), qmax).clamp_min(SCALE_MIN)


def static_scale_from_absmax(absmax: Tensor | float, bits: int = 8) -> Tensor:
    """A static per-tensor activation scale (0-d float32 tensor) from a calibrated absolute maximum."""
    a = torch.as_tensor(absmax, dtype=torch.float32)
    if a.numel() != 1:
        raise MqtoolError(f"a per-tensor absmax must have one element, got shape {tuple(a.shape)}")
    return scale_from_absmax(a.reshape(()), bits)


def _codes(x: Tensor, scale: Tensor, qmax: int, ste: bool) -> Tensor:
    """Float codes ``clamp(round(x / scale), -qmax, qmax)``; x and scale already float32."""
    v = x / scale
    v = round_ste(v) if ste else torch.round(v)
    return v.clamp(-qmax, qmax)


# --------------------------------------------------------------------------------------- weights


def _check_weight(w: Tensor, group_size: int | None) -> None:
    if w.dim() != 2:
        raise MqtoolError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if group_size is not None:
        if group_size <= 0 or w.shape[1] % group_size != 0:
            raise MqtoolError(
                f"group_size {group_size} must be positive and divide the input dimension {w.shape[1]}"
            )


def _grouped(w: Tensor, group_size: int | None) -> Tensor:
    """View [out, in] as [out, n_groups, group] (n_groups = 1 when per channel)."""
    out, k = w.shape
    g = k if group_size is None else group_size
    return w.reshape(out, k // g, g)


def weight_scale(w: Tensor, bits: int, group_size: int | None = None) -> Tensor:
    """Scales of :func:`quantize_weight`: ``[out, 1]`` or ``[out, in // group_size]`` float32."""
    _check_weight(w, group_size)
    return scale_from_absmax(_grouped(w.float(), group_size).abs().amax(dim=-1), bits)


def quantize_weight(w: Tensor, bits: int, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric RTN of a ``[out, in]`` weight -> ``(q int8 [out, in], scale float32)``.

    ``scale`` is ``[out, 1]`` per output channel, or ``[out, in // group_size]`` per group.
    """
    scale = weight_scale(w, bits, group_size)
    wg = _grouped(w.float(), group_size)
    q = _codes(wg, scale.unsqueeze(-1), qmax_for(bits), ste=False)
    return q.reshape(w.shape).to(torch.int8), scale


def dequantize_weight(q: Tensor, scale: Tensor, group_size: int | None = None) -> Tensor:
    """``q * scale`` as float32 ``[out, in]``; works for the output of quantize_weight and gptq_quantize."""
    _check_weight(q, group_size)
    expected = q.shape[1] // group_size if group_size is not None else 1
    if scale.shape != (q.shape[0], expected):
        raise MqtoolError(
            f"scale shape {tuple(scale.shape)} does not match q {tuple(q.shape)} "
            f"with group_size={group_size} (expected {(q.shape[0], expected)})"
        )
    wq = _grouped(q.float(), group_size) * scale.float().unsqueeze(-1)
    return wq.reshape(q.shape)


def fake_quantize_weight(w: Tensor, bits: int, group_size: int | None = None, ste: bool = False) -> Tensor:
    """``dequantize(quantize(w))`` in w's dtype (computed in float32).

    With ``ste=True`` gradients flow to ``w`` through the rounding (STE) and through the scale.
    """
    scale = weight_scale(w, bits, group_size)
    wg = _grouped(w.float(), group_size)
    s = scale.unsqueeze(-1)
    return (_codes(wg, s, qmax_for(bits), ste) * s).reshape(w.shape).to(w.dtype)


# ----------------------------------------------------------------------------------- activations


def _token_scale(x: Tensor, bits: int) -> Tensor:
    return scale_from_absmax(x.float().abs().amax(dim=-1, keepdim=True), bits)


def quantize_per_token(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token quantization -> ``(q int8 like x, scale float32 [..., 1])``."""
    scale = _token_scale(x, bits)
    return _codes(x.float(), scale, qmax_for(bits), ste=False).to(torch.int8), scale


def fake_quantize_per_token(x: Tensor, bits: int = 8, ste: bool = False) -> Tensor:
    """Per-token fake quantization in x's dtype; the scale follows the data (dynamic). With ``ste``
    the backward is the identity: the scale is a constant there (a gradient through the row's
    max would reach one element per token and mean nothing)."""
    scale = _token_scale(x.detach() if ste else x, bits)
    return (_codes(x.float(), scale, qmax_for(bits), ste) * scale).to(x.dtype)


def _tensor_scale(scale: Tensor | float) -> Tensor:
    s = torch.as_tensor(scale, dtype=torch.float32)
    if s.numel() != 1:
        raise MqtoolError(f"a per-tensor scale must have one element, got shape {tuple(s.shape)}")
    return s.reshape(())


def quantize_per_tensor(x: Tensor, scale: Tensor | float, bits: int = 8) -> Tensor:
    """Static per-tensor quantization with a calibrated scale -> int8 codes like x."""
    s = _tensor_scale(scale).to(x.device)
    return _codes(x.float(), s, qmax_for(bits), ste=False).to(torch.int8)


def fake_quantize_per_tensor(x: Tensor, scale: Tensor | float, bits: int = 8, ste: bool = False) -> Tensor:
    """Static per-tensor fake quantization in x's dtype; values beyond ``qmax * scale`` saturate."""
    s = _tensor_scale(scale).to(x.device)
    return (_codes(x.float(), s, qmax_for(bits), ste) * s).to(x.dtype)


# ----------------------------------------------------------------------------------------- module

_ACT_MODES = ("per_token", "per_tensor")


class ActQuantizer(nn.Module):
    """Fake-quantizes its input; plugged into a model's activation attachment points.

    ``mode="per_token"`` is dynamic (no state); ``mode="per_tensor"`` uses the ``scale`` buffer,
    which may be given now or set later (e.g. after calibration) with :meth:`set_scale`.
    ``ste`` switches the rounding to the straight-through estimator for reconstruction.
    """

    scale: Tensor | None

    def __init__(
        self, bits: int = 8, mode: str = "per_token", scale: Tensor | float | None = None, ste: bool = False
    ) -> None:
        super().__init__()
        qmax_for(bits)  # validate early, not on the first forward
        if mode not in _ACT_MODES:
            raise MqtoolError(f"unknown activation quantization mode {mode!r}; use one of {_ACT_MODES}")
        if mode == "per_token" and scale is not None:
            raise MqtoolError("a per_token quantizer is dynamic and takes no scale")
        self.bits = bits
        self.mode = mode
        self.ste = ste
        # A buffer so the calibrated scale moves with .to(device) and lands in the state dict.
        self.register_buffer("scale", None if scale is None else _tensor_scale(scale).clone())

    def set_scale(self, scale: Tensor | float) -> None:
        """Set the static per-tensor scale (e.g. ``static_scale_from_absmax(absmax, bits)``)."""
        if self.mode != "per_tensor":
            raise MqtoolError("only a per_tensor quantizer has a static scale")
        device = self.scale.device if self.scale is not None else None
        self.scale = _tensor_scale(scale).clone().to(device)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "per_token":
            return fake_quantize_per_token(x, self.bits, self.ste)
        if self.scale is None:
            raise MqtoolError("per_tensor ActQuantizer has no scale yet: calibrate it or call set_scale()")
        return fake_quantize_per_tensor(x, self.scale, self.bits, self.ste)

    def extra_repr(self) -> str:
        s = f"bits={self.bits}, mode={self.mode}"
        if self.scale is not None:
            s += f", scale={self.scale.item():.6g}"
        if self.ste:
            s += ", ste=True"
        return s
