"""The decode runtime's state cache: per layer the conv window and the SSM state in its stored form.

A state is ``[b, H, P, N]`` (Mamba-2) or ``[b, d_inner, N]`` (Mamba-1). Its stored form is one of

* float (``bits == 16``) in a chosen dtype: the model's (as mamba-ssm's generate keeps it) or fp32
  (as the accuracy reference and vLLM's fp32 SSM cache keep it);
* int8 codes (5..8 bits), one a byte, or packed int4 codes (2..4 bits), two a byte along the state
  axis (low nibble = even state index), with the state quantizer's two fp32 scale factors
  ``scale_channel [..., P, 1]`` and ``scale_state [..., 1, N]``. These are the only copy of the
  state: nothing keeps a float state beside them.

`read` / `write` are the plain-PyTorch reference of the fused kernels: dequantize with
``q * (scale_channel * scale_state)`` and quantize with `mqtool.quant.states.quantize_state_int`,
the very operations the simulated model's fake quantizer runs, so the two agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mqtool.errors import MqtoolError
from mqtool.packing import pack_int4, unpack_int4  # the export's packing: low nibble = even index
from mqtool.quant.states import StateQuantizer, quantize_state_int

__all__ = ["LayerCache", "MixedStateFormat", "StateCache", "StateFormat", "pack_int4", "state_format_of",
           "unpack_int4"]


@dataclass(frozen=True)
class StateFormat:
    """How the SSM state is stored: ``bits == 16`` is a float state of ``dtype``; otherwise codes
    with the state quantizer's ``method`` / ``channel_scale`` (packed two a byte when ``bits <= 4``)."""

    bits: int = 16
    dtype: torch.dtype = torch.float32
    method: str = "dsq"
    channel_scale: str = "abs.mean.sqrt"

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def packed(self) -> bool:
        return self.bits <= 4

    def describe(self) -> str:
        if not self.quantized:
            return str(self.dtype).removeprefix("torch.")
        form = "int4 packed" if self.packed else "int8"
        return f"H{self.bits} {self.method} ({form})"


@dataclass(frozen=True)
class MixedStateFormat:
    """One :class:`StateFormat` a layer, where layers quantize their states differently
    (``quantize-states --method auto`` chooses per layer)."""

    layers: tuple[StateFormat, ...]

    @property
    def quantized(self) -> bool:
        return any(f.quantized for f in self.layers)

    def of_layer(self, i: int) -> StateFormat:
        return self.layers[i]

    def describe(self) -> str:
        """e.g. ``H4 mixed (dsq abs.max x10, per-channel x2)``; ``H4/8`` and per-entry bits when they differ."""
        widths = sorted({f.bits for f in self.layers})
        counts: dict[str, int] = {}
        for f in self.layers:
            name = (f"{f.method} {f.channel_scale}" if f.method == "dsq" else f.method) if f.quantized else f.describe()
            key = name if len(widths) == 1 else f"H{f.bits} {name}"
            counts[key] = counts.get(key, 0) + 1
        parts = ", ".join(f"{k} x{n}" for k, n in counts.items())
        return f"H{'/'.join(map(str, widths))} mixed ({parts})"


def _layer_format(model: nn.Module, mixer: nn.Module, state_dtype: torch.dtype | None) -> StateFormat:
    sq = mixer.state_quantizer
    if isinstance(sq, StateQuantizer) and sq.bits < 16:
        if state_dtype is not None:
            raise MqtoolError(f"the state is quantized to {sq.bits} bits: --state-dtype does not apply")
        return StateFormat(sq.bits, torch.float32, sq.method, sq.channel_scale)
    return StateFormat(16, state_dtype or model.backbone.embedding.weight.dtype)


def state_format_of(model: nn.Module, state_dtype: torch.dtype | None = None) -> StateFormat | MixedStateFormat:
    """The stored form a model's state quantizers imply: one :class:`StateFormat` when every layer
    agrees, else a :class:`MixedStateFormat` (one a layer); without a quantizer, a float state of
    ``state_dtype`` (default: the model's dtype)."""
    formats = tuple(_layer_format(model, m, state_dtype) for m in model.mixers)
    return formats[0] if len(set(formats)) == 1 else MixedStateFormat(formats)


class LayerCache:
    """One layer's cache: ``conv [b, conv_dim, d_conv]`` and the state in its stored form."""

    def __init__(self, conv: Tensor, state_shape: tuple[int, ...], fmt: StateFormat) -> None:
        self.conv, self.fmt, self.state_shape = conv, fmt, state_shape
        device = conv.device
        if not fmt.quantized:
            self.state = torch.zeros(state_shape, dtype=fmt.dtype, device=device)
            self.scale_channel = self.scale_state = None
            return
        n = state_shape[-1]
        if fmt.packed and n % 2:
            raise MqtoolError(f"packed int4 states need an even state size, got {n}")
        stored = (*state_shape[:-1], n // 2) if fmt.packed else state_shape
        self.state = torch.zeros(stored, dtype=torch.uint8 if fmt.packed else torch.int8, device=device)
        self.scale_channel = torch.zeros((*state_shape[:-1], 1), dtype=torch.float32, device=device)
        self.scale_state = torch.zeros((*state_shape[:-2], 1, n), dtype=torch.float32, device=device)

    def __iter__(self) -> Iterator[Tensor]:
        """Every tensor of the cache (zeroing all of them empties it: codes 0 dequantize to 0)."""
        yield self.conv
        yield self.state
        if self.scale_channel is not None:
            yield self.scale_channel
            yield self.scale_state

    def codes(self) -> Tensor:
        """The integer codes, one int8 a value (unpacked)."""
        return unpack_int4(self.state) if self.fmt.packed else self.state

    def read(self) -> Tensor:
        """The state as fp32 (dequantized where stored as codes)."""
        if not self.fmt.quantized:
            return self.state.float()
        return self.codes().float() * (self.scale_channel * self.scale_state)

    def write(self, h: Tensor) -> None:
        """Store fp32 state ``h`` (quantized with dynamic scales where the format says so)."""
        if not self.fmt.quantized:
            self.state.copy_(h)
            return
        q, s_c, s_s = quantize_state_int(h, self.fmt.bits, self.fmt.method, self.fmt.channel_scale)
        self.state.copy_(pack_int4(q) if self.fmt.packed else q)
        self.scale_channel.copy_(s_c)
        self.scale_state.copy_(s_s)

    def nbytes(self) -> dict[str, int]:
        def size(t: Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        return {"conv": size(self.conv), "state": size(self.state),
                "scales": size(self.scale_channel) + size(self.scale_state)}


class StateCache:
    """Every layer's :class:`LayerCache`; ``layers[i]`` iterates over that layer's tensors."""

    def __init__(self, layers: list[LayerCache], fmt: StateFormat | MixedStateFormat) -> None:
        self.layers, self.fmt = layers, fmt

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def nbytes(self) -> dict[str, int]:
        """Real bytes held: conv windows, state codes (or floats), state scales, and their total."""
        out = {"conv": 0, "state": 0, "scales": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                out[k] += v
        out["total"] = sum(out.values())
        return out

    @classmethod
    def allocate(cls, model: nn.Module, batch: int, fmt: StateFormat | MixedStateFormat) -> StateCache:
        """Zeroed caches for ``batch`` sequences, each layer in ``fmt`` (or its own, when mixed)."""
        p = model.backbone.embedding.weight
        layers = []
        for i, m in enumerate(model.mixers):
            conv, ssm = m.allocate_cache(batch, p.device, p.dtype)
            shape = tuple(ssm.shape)
            del ssm  # only its shape: the stored form is the format's
            layers.append(LayerCache(conv, shape, fmt.of_layer(i) if isinstance(fmt, MixedStateFormat) else fmt))
        return cls(layers, fmt)
