"""Attach what a checkpoint's manifest says inference must apply online, at the model's
attachment points. A stage that adds an online transform records it in `manifest.online`; loading a
checkpoint calls `apply_online` before the weights (and any scales) are loaded, so a saved and
reloaded model computes exactly what the stage's model computed.

`manifest.online` keys (each optional):
  "hadamard":        {"targets": ["out_proj", ...], "kind": "hadamard", "seed": null}
                     online rotation x -> x @ H at the input of each target linear (the matching
                     H^T is fused into the weight offline by the stage that adds it)
  "smooth_scale":    {"targets": ["out_proj", ...]} divide the input by a per-channel scale before
                     the rotation (buffer `<linear>.input_transform.smooth`) — used only where
                     no weight can absorb it
  "act_quant":       {"targets": [...], "bits": 8, "mode": "per_token" | "per_tensor"}
                     (per-tensor scales are buffers `<linear>.input_quantizer.scale`)
  "ssm_act_quant":   {"targets": ["ssm_x", "ssm_B", "ssm_C", "ssm_dt"], "bits": 8, "mode": ...}
  "s_silu":          {} the gate's SiLU becomes x * sigmoid(s * x) (buffer `...gate_act.s`)
  "ssm_smooth":      {} the conv's SiLU becomes S-SiLU (buffer `<mixer>.conv_act.s`) and the SSM's
                     output is multiplied back by the same scale (buffer `<mixer>.ssm_y.s`):
                     smoothing of the SSM's input x (see quant/smooth.py)
  "matmul_smooth":   {} the SSM's output matmul smoothed (B / s, C * s per state channel); Mamba-1:
                     all in x_proj's weight, nothing online; Mamba-2: the conv's SiLU becomes S-SiLU
                     (buffer `<mixer>.conv_act.s`, shared with ssm_smooth)
  "state_quantizer": {"bits": 4, "method": "dsq", "channel_scale": "abs.mean.sqrt"} for every layer, or
                     {"per_layer": [spec, ...]} one such spec a layer (`quantize-states --method auto`)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mqtool.errors import MqtoolError
from mqtool.models import MambaLMHeadModel
from mqtool.models.layers import Linear
from mqtool.quant.hadamard import apply_hadamard, has_hadamard, orthogonal_transform_matrix
from mqtool.quant.quantizers import ActQuantizer
from mqtool.quant.states import StateQuantizer

LINEAR_TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj", "lm_head")
SSM_TARGETS = ("ssm_x", "ssm_B", "ssm_C", "ssm_dt")


class OnlineHadamard(nn.Module):
    """x -> (x / smooth) @ H along the last dim. Fast (butterfly) when a Hadamard of order n exists,
    else the block-diagonal matrix from `orthogonal_transform_matrix` (kept as a non-persistent
    buffer: it is rebuilt from the manifest, never stored)."""

    def __init__(self, n: int, kind: str = "hadamard", seed: int | None = None, smooth: bool = False) -> None:
        super().__init__()
        self.n, self.kind, self.seed = n, kind, seed
        self.fast = kind == "hadamard" and has_hadamard(n)
        matrix = None if self.fast else orthogonal_transform_matrix(n, kind, seed, torch.float32)[0]
        self.register_buffer("matrix", matrix, persistent=False)
        self.register_buffer("smooth", torch.ones(n) if smooth else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        return apply_hadamard(x) if self.fast else apply_hadamard(x, self.matrix)

    def extra_repr(self) -> str:
        return f"n={self.n}, kind={self.kind}, fast={self.fast}, smooth={self.smooth is not None}"


class SSiLU(nn.Module):
    """MambaQuant's S-SiLU: x * sigmoid(s * x). With the gate projection's rows divided by s, the
    gate's output is SiLU(z) / s, so a smoothing scale s moves into out_proj's weight for free."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("s", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.s.to(x.dtype) * x)


class ChannelScale(nn.Module):
    """y -> y * s per channel (last dim): undoes a smoothing scale the SSM's input was divided by."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("s", torch.ones(n))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.s.to(y.dtype)


def linears(model: MambaLMHeadModel, targets: list[str] | tuple[str, ...]) -> dict[str, Linear]:
    """name -> Linear for the target kinds (in_proj, x_proj, dt_proj, out_proj, lm_head)."""
    unknown = set(targets) - set(LINEAR_TARGETS)
    if unknown:
        raise MqtoolError(f"unknown linear targets {sorted(unknown)}; known: {', '.join(LINEAR_TARGETS)}")
    found = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and name.split(".")[-1] in targets:
            found[name] = mod
    return found


def gate_modules(model: MambaLMHeadModel) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of each layer's gate activation (Mamba-1: mixer; Mamba-2: mixer.norm)."""
    return [(m.norm, "gate_act") if hasattr(m, "norm") else (m, "gate_act") for m in model.mixers]


def apply_online(model: MambaLMHeadModel, online: dict[str, Any]) -> MambaLMHeadModel:
    """Attach every online module the manifest names (idempotent on a fresh model)."""
    unknown = set(online) - {"hadamard", "smooth_scale", "act_quant", "ssm_act_quant", "s_silu", "ssm_smooth",
                             "matmul_smooth", "state_quantizer"}
    if unknown:
        raise MqtoolError(f"manifest has unknown online transforms {sorted(unknown)}: made by a newer mqtool?")
    device = model.backbone.embedding.weight.device
    if "hadamard" in online:
        spec = online["hadamard"]
        smooth_targets = set(online.get("smooth_scale", {}).get("targets", []))
        for name, lin in linears(model, spec["targets"]).items():
            lin.input_transform = OnlineHadamard(lin.in_features, spec.get("kind", "hadamard"), spec.get("seed"),
                                                 smooth=name.split(".")[-1] in smooth_targets).to(device)
    if "act_quant" in online:
        spec = online["act_quant"]
        for lin in linears(model, spec["targets"]).values():
            scale = torch.ones(()) if spec.get("mode", "per_token") == "per_tensor" else None
            lin.input_quantizer = ActQuantizer(spec.get("bits", 8), spec.get("mode", "per_token"), scale).to(device)
    if "ssm_act_quant" in online:
        spec = online["ssm_act_quant"]
        for mixer in model.mixers:
            for tap in spec["targets"]:
                if tap not in SSM_TARGETS:
                    raise MqtoolError(f"unknown SSM target {tap!r}; known: {', '.join(SSM_TARGETS)}")
                scale = torch.ones(()) if spec.get("mode", "per_token") == "per_tensor" else None
                setattr(mixer, tap, ActQuantizer(spec.get("bits", 8), spec.get("mode", "per_token"), scale).to(device))
    if "s_silu" in online:
        for (owner, attr), mixer in zip(gate_modules(model), model.mixers, strict=True):
            setattr(owner, attr, SSiLU(mixer.d_inner).to(device))
    if "ssm_smooth" in online or ("matmul_smooth" in online and not hasattr(model.mixers[0], "x_proj")):
        for mixer in model.mixers:
            if not isinstance(mixer.conv_act, SSiLU):
                mixer.conv_act = SSiLU(mixer.conv1d.out_channels).to(device)
    if "ssm_smooth" in online:
        for mixer in model.mixers:
            mixer.ssm_y = ChannelScale(mixer.d_inner).to(device)
    if "state_quantizer" in online:
        for mixer, spec in zip(model.mixers, state_quantizer_specs(online["state_quantizer"], len(model.mixers)),
                               strict=True):
            mixer.state_quantizer = StateQuantizer.from_dict(spec)
    return model


def state_quantizer_specs(entry: Any, n_layers: int) -> list[dict[str, Any]]:
    """The manifest's ``state_quantizer`` entry as one spec a layer (it is one spec for every layer,
    or ``{"per_layer": [...]}``)."""
    if isinstance(entry, dict) and "per_layer" in entry:
        specs = entry["per_layer"]
        if set(entry) != {"per_layer"} or not isinstance(specs, list) or len(specs) != n_layers:
            raise MqtoolError(f"state_quantizer per_layer must be the only key and list {n_layers} specs "
                              f"(one a layer), got {entry!r:.120}")
        return specs
    return [entry] * n_layers
