"""Weight quantization (RTN, GPTQ) and activation-quantizer attachment for the model's linears.

Weights are *simulated*: each target's weight is replaced by its dequantized value ``q * scale``
(float32), in exactly the integer format of :mod:`mqtool.quant.quantizers`. The stored weight is a
fixed point of that format's RTN rule, so the integer codes and scales are reproducible from the
checkpoint alone: ``quantize_weight(w, bits, group_size)`` on a stored weight returns the very
codes and scales it was made from, and ``dequantize_weight`` gives back the stored tensor bit for
bit (:func:`weight_codes` does this and checks it). For RTN that holds by construction; a GPTQ
group whose largest code is below ``qmax`` is re-expressed on the standard grid (its scale
``max|w| / qmax``, a finer step, so the change is below half a GPTQ step); the record counts
those groups (``regridded_groups``).

GPTQ's Hessian is ``H = 2 X^T X / n`` of the linear's input as the layer sees it (after its
online input transform), from the calibration statistics (``<linear>.xtx``, ``.count``) of the
model before this stage (inputs from the unquantized model, not re-collected layer by layer).

Activations: an :class:`~mqtool.quant.quantizers.ActQuantizer` at each target's input
(``online["act_quant"]``), dynamic per token or static per tensor with the scale
``max|x| / qmax`` from the calibration abs-max of that input.

SSM inputs: the same quantizers at the mixers' attachment points ``ssm_x``, ``ssm_B``, ``ssm_C``
(and ``ssm_dt``, Δ after softplus, only when asked: quantizing the step size ahead of ``exp(Δ A)``
is harmful) (``online["ssm_act_quant"]``). Per token means one scale per token over the tap's
channels (x: d_inner, before Mamba-2's head reshape; B, C: d_state, or ngroups * d_state for
Mamba-2; Δ: d_inner, or nheads); per tensor takes ``max|x| / qmax`` from the calibration abs-max
recorded at the tap (``backbone.layers.<i>.mixer.<tap>.absmax``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mqtool.calibrate import Calibration
from mqtool.errors import MqtoolError
from mqtool.models import MambaLMHeadModel
from mqtool.quant import attach
from mqtool.quant.gptq import gptq_quantize
from mqtool.quant.quantizers import (
    dequantize_weight,
    fake_quantize_weight,
    qmax_for,
    quantize_weight,
    static_scale_from_absmax,
)

__all__ = ["ACT_DEFAULTS", "DEFAULT_SSM_TARGETS", "DEFAULT_TARGETS", "SSM_ACT_DEFAULTS", "WEIGHT_DEFAULTS",
           "apply_quantize", "exact_weight", "keep_codes", "weight_codes"]

DEFAULT_TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj")
WEIGHT_DEFAULTS: dict[str, Any] = {"bits": 8, "method": "rtn", "group_size": None, "damp": 0.01,
                                   "act_order": False, "block_size": 128}
ACT_DEFAULTS: dict[str, Any] = {"bits": 8, "mode": "per_token"}
# Δ (ssm_dt) stays in FP unless asked for: an error in the step size is amplified by exp(Δ A)
DEFAULT_SSM_TARGETS = ("ssm_x", "ssm_B", "ssm_C")
SSM_ACT_DEFAULTS: dict[str, Any] = {"bits": 8, "mode": "per_token", "targets": list(DEFAULT_SSM_TARGETS)}
WEIGHT_METHODS = ("rtn", "gptq")
ACT_MODES = ("per_token", "per_tensor")


def _spec(given: dict | None, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise MqtoolError(f"{what} settings must be a mapping, got {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise MqtoolError(f"unknown {what} settings {unknown}; known: {', '.join(defaults)}")
    return {**defaults, **given}


def _check_weight_spec(w: dict[str, Any]) -> None:
    qmax_for(w["bits"])
    if w["method"] not in WEIGHT_METHODS:
        raise MqtoolError(f"unknown weight quantization method {w['method']!r}; use one of {WEIGHT_METHODS}")
    gs = w["group_size"]
    if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0):
        raise MqtoolError(f"group_size must be a positive integer or null, got {gs!r}")
    bs = w["block_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
        raise MqtoolError(f"block_size must be a positive integer, got {bs!r}")
    if isinstance(w["damp"], bool) or not isinstance(w["damp"], (int, float)) or w["damp"] < 0:
        raise MqtoolError(f"damp must be a non-negative number, got {w['damp']!r}")
    if not isinstance(w["act_order"], bool):
        raise MqtoolError(f"act_order must be true or false, got {w['act_order']!r}")


def _check_act_spec(a: dict[str, Any]) -> None:
    qmax_for(a["bits"])
    if a["mode"] not in ACT_MODES:
        raise MqtoolError(f"unknown activation quantization mode {a['mode']!r}; use one of {ACT_MODES}")


def _check_ssm_act_spec(a: dict[str, Any]) -> None:
    _check_act_spec(a)
    taps = a["targets"]
    if not isinstance(taps, (list, tuple)) or not taps or not all(isinstance(t, str) for t in taps):
        raise MqtoolError(f"SSM activation targets must be a non-empty list of names, got {taps!r}")
    unknown = sorted(set(taps) - set(attach.SSM_TARGETS))
    if unknown:
        raise MqtoolError(f"unknown SSM activation targets {unknown}; known: {', '.join(attach.SSM_TARGETS)}")


def _tap_width(mixer: nn.Module, tap: str) -> int:
    """Channels of an SSM attachment point's input (what a per-token scale spans)."""
    if tap in ("ssm_B", "ssm_C"):
        return getattr(mixer, "ngroups", 1) * mixer.d_state
    if tap == "ssm_dt" and hasattr(mixer, "nheads"):  # Mamba-2: one Δ per head
        return mixer.nheads
    return mixer.d_inner


def weight_codes(w: Tensor, spec: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The integer codes (int8) and float32 scales of a weight stored by :func:`apply_quantize`
    with per-tensor `spec` (``{"bits", "group_size", ...}``), checked to dequantize to it exactly."""
    bits, gs = spec["bits"], spec.get("group_size")
    q, scale = quantize_weight(w, bits, gs)
    # equal up to one ulp of the scale (see _on_grid): the codes are the same either way
    if not torch.allclose(dequantize_weight(q, scale, gs).to(w.dtype), w, rtol=1e-6, atol=0.0):
        raise MqtoolError(f"weight is not on the {bits}-bit grid (group_size={gs}) its spec records")
    return q, scale


# Where a low-precision linear keeps the codes its weight was quantized to (a plain attribute, not
# in the module's state dict): bf16(q * scale) is not q * scale, and export must recover the codes.
KEPT_CODES = "kept_weight_codes"


def keep_codes(lin: nn.Module, wq: Tensor, bits: int, group_size: int | None) -> None:
    """Copy the quantized float32 weight `wq` (a fixed point of RTN) into `lin.weight`; where that
    is bf16/fp16 the codes and scales are kept beside it, so :func:`exact_weight` can give the
    checkpoint the exact float32 value (about one byte a weight, not a float32 copy)."""
    if lin.weight.dtype == torch.float32:
        lin.weight.data.copy_(wq)
        if hasattr(lin, KEPT_CODES):
            delattr(lin, KEPT_CODES)
        return
    q, scale = quantize_weight(wq, bits, group_size)
    # the weight from the codes themselves (wq within an ulp: see _on_grid), so exact_weight agrees with it
    lin.weight.data.copy_(dequantize_weight(q, scale, group_size).to(lin.weight.dtype))
    setattr(lin, KEPT_CODES, (q, scale, group_size))


def exact_weight(lin: nn.Module) -> Tensor | None:
    """The float32 weight of `lin`'s kept codes, or None when none are kept or the weight changed
    since they were (then the weight itself is all there is)."""
    kept = getattr(lin, KEPT_CODES, None)
    if kept is None:
        return None
    w = dequantize_weight(*kept).to(lin.weight.device)
    return w if torch.equal(w.to(lin.weight.dtype), lin.weight.detach()) else None


def _on_grid(w: Tensor, bits: int, group_size: int | None) -> tuple[Tensor, int]:
    """The nearest fixed point of RTN at or after w (float32), and how many groups moved."""
    out = w
    for _ in range(4):
        nxt = fake_quantize_weight(out, bits, group_size)
        if torch.equal(nxt, out):
            break
        out = nxt
    # Else a 2-cycle: fl(fl(qmax * s) / qmax) can differ from s by one ulp and flip back (seen on
    # CUDA, where rounding differs). Both iterates carry the same codes; keep the last one.
    g = w.shape[1] if group_size is None else group_size
    moved = (out != w).reshape(w.shape[0], -1, g).any(-1)
    return out, int(moved.sum())


def _hessian(calib: Calibration, name: str, k: int, device: torch.device) -> Tensor:
    xtx = calib.get(name, "xtx")
    n = float(calib.get(name, "count"))
    if xtx.shape != (k, k):
        raise MqtoolError(f"calibration for {name} has an input of width {xtx.shape[-1]}, the model {k}: "
                          "was it made with this model (as it is now)?")
    if n <= 0:
        raise MqtoolError(f"calibration for {name} saw no tokens")
    return (2.0 * xtx.double() / n).to(device=device, dtype=torch.float32)


def _resolve_targets(targets, ignore) -> list[str]:
    targets, ignore = list(targets), list(ignore or ())
    for what, kinds in (("targets", targets), ("ignore", ignore)):
        unknown = sorted(set(kinds) - set(attach.LINEAR_TARGETS))
        if unknown:
            raise MqtoolError(f"unknown linear {what} {unknown}; known: {', '.join(attach.LINEAR_TARGETS)}")
    both = sorted(set(targets) & set(ignore))
    if both:
        raise MqtoolError(f"{both} both targeted and ignored; drop them from `ignore` to quantize them")
    return [t for t in dict.fromkeys(targets) if t not in ignore]


def _untie(model: MambaLMHeadModel) -> bool:
    """Give lm_head its own copy of the embedding (before one of them changes). True if it was tied."""
    model.config.tie_embeddings = False
    emb = model.backbone.embedding.weight
    if model.lm_head.weight is emb:
        model.lm_head.weight = nn.Parameter(emb.detach().clone(), requires_grad=emb.requires_grad)
        return True
    return False


@torch.no_grad()
def apply_quantize(model: MambaLMHeadModel, online: dict, calib: Calibration | None,
                   weights: dict | None = None, activations: dict | None = None,
                   targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
                   ignore: list[str] | tuple[str, ...] | None = ("lm_head",),
                   ssm_activations: dict | None = None) -> dict:
    """Quantize the weights of the target linears (kinds; `ignore` kinds excluded, lm_head by
    default) and/or attach activation quantizers at their inputs and/or at the SSM's inputs.

    `weights`: ``{"bits": 8|4, "method": "rtn"|"gptq", "group_size": None|int, "damp": 0.01,
    "act_order": False, "block_size": 128}`` (omitted keys take these defaults); a group_size that
    does not divide a linear's input width falls back to per channel for that linear (recorded).
    `activations`: ``{"bits": 8, "mode": "per_token"|"per_tensor"}``.
    `ssm_activations`: ``{"bits": 8, "mode": "per_token"|"per_tensor", "targets": ["ssm_x", "ssm_B",
    "ssm_C"]}`` (targets from ssm_x, ssm_B, ssm_C, ssm_dt), quantizers at the SSM's inputs of
    every mixer; `targets`/`ignore` do not apply to them.
    `calib` (statistics of the model before this stage) is needed by GPTQ and per-tensor scales.

    Returns the record: ``tensors`` maps ``<linear>.weight`` to its spec ``{"bits", "group_size",
    "method"}``; ``activations`` and ``ssm_activations`` the attached quantizers (and their static
    scales, by linear or by ``<mixer>.<tap>``)."""
    if weights is None and activations is None and ssm_activations is None:
        raise MqtoolError("nothing to quantize: give weight, activation and/or SSM activation settings")
    wspec = _spec(weights, WEIGHT_DEFAULTS, "weight") if weights is not None else None
    aspec = _spec(activations, ACT_DEFAULTS, "activation") if activations is not None else None
    sspec = _spec(ssm_activations, SSM_ACT_DEFAULTS, "SSM activation") if ssm_activations is not None else None
    if wspec is not None:
        _check_weight_spec(wspec)
    if aspec is not None:
        _check_act_spec(aspec)
        if "act_quant" in online:
            raise MqtoolError("the checkpoint already quantizes linear activations (online act_quant)")
    if sspec is not None:
        _check_ssm_act_spec(sspec)
        if "ssm_act_quant" in online:
            raise MqtoolError("the checkpoint already quantizes the SSM's inputs (online ssm_act_quant)")
    kinds = _resolve_targets(targets, ignore)
    found = attach.linears(model, kinds)
    if not found and (wspec is not None or aspec is not None):
        raise MqtoolError(f"no linear layers of kinds {kinds} in this model")
    taps = [t for t in attach.SSM_TARGETS if t in sspec["targets"]] if sspec is not None else []
    gptq = wspec is not None and wspec["method"] == "gptq"
    static = aspec is not None and aspec["mode"] == "per_tensor"
    ssm_static = sspec is not None and sspec["mode"] == "per_tensor"
    needs_calib = gptq or static or ssm_static
    if needs_calib and calib is None:
        raise MqtoolError("GPTQ and per-tensor activation scales need calibration statistics "
                          "(`mqtool calibrate`, then --calib)")
    # validate the calibration against every target before changing anything
    if needs_calib:
        for name, lin in found.items():
            if gptq:
                _hessian(calib, name, lin.in_features, torch.device("cpu"))
            if static:
                if calib.get(name, "absmax").numel() != lin.in_features:
                    raise MqtoolError(f"calibration for {name} does not match the model's input width")
    if ssm_static:
        for i, mixer in enumerate(model.mixers):
            for tap in taps:
                name = f"backbone.layers.{i}.mixer.{tap}"
                if calib.get(name, "absmax").numel() != _tap_width(mixer, tap):
                    raise MqtoolError(f"calibration for {name} does not match the model's width there")

    record: dict[str, Any] = {"targets": kinds, "ignore": list(ignore or ()), "untied": False}
    if wspec is not None:
        record["weights"] = dict(wspec)
        tensors: dict[str, dict[str, Any]] = {}
        fallback, regridded = [], 0
        for name, lin in found.items():
            if name == "lm_head":
                record["untied"] = _untie(model)
            gs = wspec["group_size"]
            if gs is not None and lin.in_features % gs:
                gs = None
                fallback.append(name)
            bits = wspec["bits"]
            w = lin.weight.detach().float()
            if wspec["method"] == "gptq":
                H = _hessian(calib, name, lin.in_features, w.device)
                q, scale = gptq_quantize(w, H, bits, group_size=gs, block_size=wspec["block_size"],
                                         damp=float(wspec["damp"]), act_order=wspec["act_order"])
                wq, moved = _on_grid(dequantize_weight(q, scale, gs), bits, gs)
                regridded += moved
            else:
                wq = fake_quantize_weight(w, bits, gs)
            keep_codes(lin, wq, bits, gs)
            tensors[f"{name}.weight"] = {"bits": bits, "group_size": gs, "method": wspec["method"]}
        record["tensors"] = tensors
        if fallback:
            record["per_channel_fallback"] = fallback
        if wspec["method"] == "gptq":
            record["regridded_groups"] = regridded
    if aspec is not None:
        present = sorted({name.split(".")[-1] for name in found}, key=attach.LINEAR_TARGETS.index)
        spec = {"targets": present, "bits": aspec["bits"], "mode": aspec["mode"]}
        attach.apply_online(model, {"act_quant": spec})
        scales: dict[str, float] = {}
        if aspec["mode"] == "per_tensor":
            for name, lin in attach.linears(model, present).items():
                scale = static_scale_from_absmax(calib.get(name, "absmax").max(), aspec["bits"])
                lin.input_quantizer.set_scale(scale)
                scales[name] = float(scale)
        online["act_quant"] = spec
        record["activations"] = {**spec, **({"scales": scales} if scales else {})}
    if sspec is not None:
        spec = {"targets": taps, "bits": sspec["bits"], "mode": sspec["mode"]}
        attach.apply_online(model, {"ssm_act_quant": spec})
        ssm_scales: dict[str, float] = {}
        if ssm_static:
            for i, mixer in enumerate(model.mixers):
                for tap in taps:
                    name = f"backbone.layers.{i}.mixer.{tap}"
                    scale = static_scale_from_absmax(calib.get(name, "absmax").max(), sspec["bits"])
                    getattr(mixer, tap).set_scale(scale)
                    ssm_scales[name] = float(scale)
        online["ssm_act_quant"] = spec
        record["ssm_activations"] = {**spec, **({"scales": ssm_scales} if ssm_scales else {})}
    return record
