"""Smoothing: SmoothQuant's per-channel migration of activation outliers into the weights, and
MambaQuant's smooth-fused variant that also smooths where only an S-SiLU or an online Hadamard
can take the scale.

For a linear ``y = x W^T`` with input channel j, SmoothQuant (Xiao et al., 2023) picks

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(from calibration abs-maxima, both clamped below at 1e-5; channels that are dead in the data or in
the weight keep s_j = 1) and computes ``(x / s) (W diag(s))^T``: the same function, with the
input's outliers divided down and the weight's columns scaled up. ``x / s`` costs nothing when
the module that produces x has a per-channel weight it can be folded into. Where each target's s
goes (``fusion map``):

==========  ===================================  ======================================================
target      smoothquant                          smooth-fused (MambaQuant), in addition
==========  ===================================  ======================================================
in_proj     block norm weight (and bias) / s     same
lm_head     norm_f weight / s; lm_head untied    same
            from the embedding first
dt_proj     x_proj's first dt_rank rows / s      same
            (Mamba-1: dt_proj reads them)
out_proj    Mamba-2: gated norm weight / s       Mamba-1: S-SiLU — in_proj's gate rows (z) / s and the
            Mamba-1: skipped (the gate           gate act becomes ``SSiLU`` with buffer s, so it
            multiplies: no weight precedes)      yields SiLU(z) / s (``online["s_silu"]``)
x_proj      skipped (input is conv + SiLU:       with an online Hadamard at x_proj: the Hadamard's
            nothing to fold into)                ``smooth`` buffer divides by s before rotating
                                                 (``online["smooth_scale"]``); else skipped
==========  ===================================  ======================================================

In every case the target's weight absorbs ``diag(s)`` on the side of the *pre-transform* input:
when the linear has an online Hadamard, its stored weight is ``W_stored = W H`` (``W`` acting on
the un-rotated input), so the smoothed weight is ``(W diag(s)) H = W_stored H^T diag(s) H``, and
s is computed from the statistics observed *before* the transform (``<linear>.pre.absmax``) and
from ``W = W_stored H^T`` (divided by an existing ``smooth`` buffer, which the input meets first).

The SSM's input (target ``ssm``, smooth-fused only): the scan's input x (per d_inner channel, what
the ``ssm_x`` quantizer sees) is divided by ``s = max|x|^alpha`` (SmoothQuant's formula with no weight
on the other side). The scan is linear in x per channel (``h_t = exp(Δ A) h_{t-1} + Δ B x_t``, ``y = C
h + D x``), so a scan fed ``x / s`` yields exactly ``y / s``: s goes *through* the scan, which is
MambaQuant's point in absorbing it there. ``x / s`` costs nothing: x is ``SiLU(conv(...))``, so the
conv's x-channel weights and bias are divided by s and its SiLU becomes S-SiLU with s, ``(c/s)
sigmoid(s c/s) = SiLU(c)/s``; Mamba-1's x_proj, which reads x too, takes s into its columns. The
output ``y / s`` is multiplied back by s before the gate (Mamba-1) or the gated norm (Mamba-2, whose
RMS over channels no weight after it could undo): one multiply per channel, ``online["ssm_smooth"]``.
(The ``addcmul(-ln s, Δ, A)`` of MambaQuant's scan belongs to the matmul smoothing below, not to this one.)

The SSM's output matmul (target ``matmul``, smooth-fused only; MambaQuant's "Matmul" smoothing, its
S4 scales): the scan's states h feed the matmul ``y_t = C_t · h_t`` (per state channel n, ``y[d] =
sum_n h[d, n] C[n]``), and its inputs h and C have outliers along n. SmoothQuant's rule on that
matmul, h as the activation and C as the weight, gives one scale per state channel,
``s_n = max|h_n|^alpha / max|C_n|^(1-alpha)`` (Mamba-1: h's abs-max over the d_inner channels;
Mamba-2: over the heads of a group and their headdim, so one s per (group, n); from the recurrent
``<mixer>.state.absmax`` statistic, so the calibration needs ``state_samples > 0``). The state is
linear in B per state channel, ``h_t[:, n] = exp(Δ_t A[:, n]) h_{t-1}[:, n] + Δ_t x_t B_t[n]``, so
feeding the scan ``B / s`` makes every state exactly ``h / s`` (from h_0 = 0, at every step, in
parallel, chunked and recurrent mode alike, and in the state cache), and ``C s`` restores ``y = (C s) ·
(h / s)``: the scale passes through the scan with no extra work in it. Where B and C are made: Mamba-1's
x_proj rows (B rows / s, C rows * s: a per-row scale, which per-row weight quantization does not
see); Mamba-2's conv channels, which then pass S-SiLU (B channels: weights and bias / s, buffer s, so
``SiLU(c) / s``; C channels: * s and buffer 1 / s, so ``SiLU(c) s``). MambaQuant's code adds the
decay term ``addcmul(-ln s, Δ, A) = ΔA - ln s`` at the *first* step only (``out[:, 0] += ln(1/s)``):
it turns an initial state given in the unsmoothed units into ``h_0 / s``; from a zero initial state
it changes nothing, and mqtool's scans always start at zero (decode continues from a cache that is
already in the smoothed units), so that term is not needed here and is not added. FalconMamba's
RMS norm over B and C would undo the scale: refused.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from mqtool.calibrate import Calibration
from mqtool.errors import MqtoolError
from mqtool.models import MambaLMHeadModel
from mqtool.quant import attach
from mqtool.quant.hadamard import hadamard_matrix

__all__ = ["DEFAULT_TARGETS", "MATMUL_TARGET", "METHODS", "SSM_TARGET", "apply_smooth", "smoothing_scale"]

METHODS = ("smoothquant", "smooth-fused")
DEFAULT_TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj")
SSM_TARGET = "ssm"  # the SSM's input x (not a linear): smooth-fused only
MATMUL_TARGET = "matmul"  # the SSM's output matmul C · h (B / s, C * s): smooth-fused only
# out_proj before in_proj (S-SiLU rescales in_proj's gate rows, in_proj's own s then sees them);
# dt_proj before x_proj (the same for x_proj's dt rows).
_ORDER = ("out_proj", "dt_proj", "in_proj", "x_proj", "lm_head")
EPS = 1e-5
S_MIN, S_MAX = 1e-5, 1e5
_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.mixer\.")


def smoothing_scale(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's ``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel (float64), clamped to
    [1e-5, 1e5]; 1 where the channel is dead (zero or non-finite) in the data or the weight."""
    a = act_absmax.detach().to(torch.float64)
    w = weight_absmax.detach().to(device=a.device, dtype=torch.float64)
    s = (a.clamp_min(EPS).pow(alpha) / w.clamp_min(EPS).pow(1.0 - alpha)).clamp(S_MIN, S_MAX)
    live = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w)
    return torch.where(live, s, torch.ones_like(s))


def _transform_matrix(name: str, lin: nn.Module) -> Tensor | None:
    """The rotation H (float64, CPU) of the linear's online input transform; None without one."""
    t = lin.input_transform
    if isinstance(t, nn.Identity):
        return None
    if isinstance(t, attach.OnlineHadamard):
        return hadamard_matrix(t.n) if t.fast else t.matrix.detach().to(device="cpu", dtype=torch.float64)
    raise MqtoolError(f"{name} has an input transform smoothing does not know ({type(t).__name__})")


def _effective_weight(lin: nn.Module, H: Tensor | None) -> Tensor:
    """W acting on the pre-transform input x: ``W_stored H^T diag(1/smooth)`` (float64)."""
    W = lin.weight.detach().to(torch.float64)
    if H is None:
        return W
    W = W @ H.to(W.device).T
    smooth = lin.input_transform.smooth
    return W if smooth is None else W / smooth.detach().to(W)


@torch.no_grad()
def _set(p: Tensor, value: Tensor) -> None:
    p.copy_(value.to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def _scale_columns(lin: nn.Module, s: Tensor, H: Tensor | None) -> None:
    """Fold diag(s) into the weight on the pre-transform side: ``W_stored H^T diag(s) H``."""
    W = lin.weight.detach().to(torch.float64)
    s = s.to(W.device)
    if H is None:
        _set(lin.weight, W * s)
    else:
        H = H.to(W.device)
        _set(lin.weight, ((W @ H.T) * s) @ H)


@torch.no_grad()
def _divide_norm(norm: nn.Module, s: Tensor) -> None:
    if getattr(norm, "weight", None) is None:
        raise MqtoolError(f"{type(norm).__name__} without a weight cannot absorb a smoothing scale")
    _set(norm.weight, norm.weight.double() / s.to(norm.weight.device))
    if getattr(norm, "bias", None) is not None:
        _set(norm.bias, norm.bias.double() / s.to(norm.bias.device))


@torch.no_grad()
def _divide_rows(lin: nn.Module, start: int, s: Tensor) -> None:
    """Divide output rows ``start : start + len(s)`` of a linear (weight and bias) by s."""
    end = start + s.numel()
    W = lin.weight.detach().to(torch.float64).clone()
    W[start:end] /= s.to(W.device)[:, None]
    _set(lin.weight, W)
    if lin.bias is not None:
        b = lin.bias.detach().to(torch.float64).clone()
        b[start:end] /= s.to(b.device)
        _set(lin.bias, b)


def _outlier_ratio(absmax: Tensor) -> float:
    """max / median of per-channel abs-max: how far the worst channel stands out."""
    a = absmax.detach().double()
    return float(a.max() / a.median().clamp_min(1e-30))


def _plan(model: MambaLMHeadModel, name: str, lin: nn.Module, method: str) -> tuple[str | None, str]:
    """(route, note): where the target's s can go, or (None, why it is skipped)."""
    kind = name.split(".")[-1]
    mamba1 = model.config.layer == "Mamba1"
    has_h = isinstance(lin.input_transform, attach.OnlineHadamard)
    if kind == "dt_proj" and model.get_submodule(name.rsplit(".", 1)[0]).bcdt_rms_eps is not None:
        return None, "FalconMamba: an RMS norm between x_proj and dt_proj would undo a scale folded into x_proj"
    if kind in ("in_proj", "lm_head", "dt_proj"):
        return kind, ""
    if kind == "out_proj":
        if not mamba1:
            return "gated_norm", ""
        if method == "smooth-fused":
            return "s_silu", ""
        return None, ("Mamba-1 out_proj: the gate multiplies its input, no weight precedes it "
                      "(smooth-fused uses S-SiLU)")
    if kind == "x_proj":
        if method == "smooth-fused" and has_h:
            return "online_smooth", ""
        why = "x_proj's input is conv + SiLU: nothing can absorb the scale"
        if method != "smooth-fused":
            why += " (smooth-fused uses an online Hadamard's smooth buffer)"
        return None, why + ("" if has_h else "; no online Hadamard to carry it")
    raise MqtoolError(f"no smoothing route for {name}")  # pragma: no cover - linears() filters kinds


@torch.no_grad()
def apply_smooth(model: MambaLMHeadModel, online: dict, calib: Calibration | None,
                 method: str = "smoothquant", alpha: float = 0.5,
                 targets: list[str] | tuple[str, ...] | None = None) -> dict:
    """Smooth the inputs of the target linears (kinds: in_proj, x_proj, dt_proj, out_proj, lm_head;
    default all but lm_head) with SmoothQuant scales of strength `alpha`, folding each scale where
    the module doc's table says; target ``ssm`` (smooth-fused only) smooths the SSM's input x.
    The model computes the same function afterwards (up to rounding).

    `calib` holds the statistics of the model as it is now (required). Updates `online` with
    ``"s_silu"`` / ``"smooth_scale"`` when those carry scales, and returns the record: per target
    where its s went (``into``: the tensors that absorbed 1/s and s), per skipped target why."""
    if method not in METHODS:
        raise MqtoolError(f"unknown smoothing method {method!r}; use one of {', '.join(METHODS)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise MqtoolError(f"alpha must be a number from 0 to 1, got {alpha!r}")
    alpha = float(alpha)
    if calib is None:
        raise MqtoolError("smoothing needs calibration statistics (`mqtool calibrate`, then --calib)")
    kinds = list(DEFAULT_TARGETS if targets is None else targets)
    if len(set(kinds)) != len(kinds):
        raise MqtoolError(f"duplicate smoothing targets: {kinds}")
    present = [k for k in ("act_quant", "ssm_act_quant") if k in online]
    if present:
        raise MqtoolError(f"the checkpoint already quantizes activations ({present}): smooth must run before "
                          "activation quantization")
    smooth_ssm = SSM_TARGET in kinds
    smooth_mm = MATMUL_TARGET in kinds
    kinds = [k for k in kinds if k not in (SSM_TARGET, MATMUL_TARGET)]
    if smooth_ssm:
        if method != "smooth-fused":
            raise MqtoolError("the SSM input ('ssm' target) is smoothed by smooth-fused only (its scale goes "
                              "through the scan into an S-SiLU and back at the SSM's output)")
        if "ssm_smooth" in online:
            raise MqtoolError("the SSM's input is already smoothed (online ssm_smooth)")
        ssm_acts = _ssm_input_absmax(model, calib)  # validate before changing anything
    if smooth_mm:
        if method != "smooth-fused":
            raise MqtoolError("the SSM's output matmul ('matmul' target) is smoothed by smooth-fused only (its "
                              "scale goes through the scan: B / s, C * s)")
        if "matmul_smooth" in online:
            raise MqtoolError("the SSM's output matmul is already smoothed (online matmul_smooth)")
        mm_stats = _matmul_absmax(model, calib)  # validate before changing anything
    found = attach.linears(model, kinds) if kinds else {}  # raises on unknown kinds
    for name, lin in found.items():
        if not isinstance(lin.input_quantizer, nn.Identity):
            raise MqtoolError(f"{name} already has an input quantizer attached: smooth must run before it")

    def key(name: str) -> tuple[int, int]:
        m = _LAYER.match(name)
        return _ORDER.index(name.split(".")[-1]), int(m.group(1)) if m else -1

    names = sorted(found, key=key)
    # validate every target and its statistics before changing anything
    plans: dict[str, tuple[str | None, str, Tensor | None, Tensor | None]] = {}
    for name in names:
        lin = found[name]
        route, why = _plan(model, name, lin, method)
        if route is None:
            plans[name] = (None, why, None, None)
            continue
        act = calib.get(f"{name}.pre", "absmax")
        if act.numel() != lin.in_features:
            raise MqtoolError(f"calibration for {name} has {act.numel()} channels, the model "
                              f"{lin.in_features}: was it made with this model (as it is now)?")
        plans[name] = (route, "", act.detach().to(device="cpu", dtype=torch.float64),
                       _transform_matrix(name, lin))

    record: dict[str, Any] = {"method": method, "alpha": alpha, "targets": {}, "skipped": {}}
    untied = False
    for name in names:
        route, why, act, H = plans[name]
        if route is None:
            record["skipped"][name] = why
            continue
        lin = found[name]
        m = _LAYER.match(name)
        layer = model.backbone.layers[int(m.group(1))] if m else None
        # weight abs-max per input channel, in the pre-transform basis (the weight x actually meets)
        W_eff = _effective_weight(lin, H)
        s = smoothing_scale(act, W_eff.abs().amax(0).cpu(), alpha)
        prefix = name.rsplit(".", 1)[0]
        entry: dict[str, Any] = {"via": route, "before_hadamard": H is not None}
        if route == "in_proj":
            norm_name = prefix.rsplit(".", 1)[0] + ".norm"
            _divide_norm(layer.norm, s)
            has_bias = getattr(layer.norm, "bias", None) is not None
            entry["into"] = [f"{norm_name}.weight"] + ([f"{norm_name}.bias"] if has_bias else [])
        elif route == "lm_head":
            if model.lm_head.weight is model.backbone.embedding.weight:
                emb = model.backbone.embedding.weight
                model.lm_head.weight = nn.Parameter(emb.detach().clone(), requires_grad=emb.requires_grad)
                untied = True
            model.config.tie_embeddings = False
            _divide_norm(model.backbone.norm_f, s)
            entry["into"] = ["backbone.norm_f.weight"] + (
                ["backbone.norm_f.bias"] if getattr(model.backbone.norm_f, "bias", None) is not None else [])
        elif route == "dt_proj":
            _divide_rows(layer.mixer.x_proj, 0, s)
            entry["into"] = [f"{prefix}.x_proj.weight[:{s.numel()}]"]
        elif route == "gated_norm":
            _divide_norm(layer.mixer.norm, s)
            entry["into"] = [f"{prefix}.norm.weight"]
        elif route == "s_silu":
            mixer = layer.mixer
            _divide_rows(mixer.in_proj, mixer.d_inner, s)  # z = second half of in_proj's output
            if not isinstance(mixer.gate_act, attach.SSiLU):
                mixer.gate_act = attach.SSiLU(mixer.d_inner).to(lin.weight.device)
            mixer.gate_act.s.mul_(s.to(mixer.gate_act.s))
            online["s_silu"] = {}
            entry["into"] = [f"{prefix}.in_proj.weight[{mixer.d_inner}:]", f"{prefix}.gate_act.s"]
        elif route == "online_smooth":
            t = lin.input_transform
            if t.smooth is None:
                new = attach.OnlineHadamard(t.n, t.kind, t.seed, smooth=True).to(lin.weight.device)
                lin.input_transform = new
                t = new
            t.smooth.mul_(s.to(t.smooth))
            spec = online.setdefault("smooth_scale", {"targets": []})
            if name.split(".")[-1] not in spec["targets"]:
                spec["targets"].append(name.split(".")[-1])
            entry["into"] = [f"{name}.input_transform.smooth"]
        _scale_columns(lin, s, H)
        entry["into"].append(f"{name}.weight")
        entry["outlier_ratio"] = [round(_outlier_ratio(act), 4), round(_outlier_ratio(act / s), 4)]
        entry["s_range"] = [float(s.min()), float(s.max())]
        record["targets"][name] = entry
    record["untied"] = untied
    if smooth_ssm:  # last: Mamba-1's x_proj takes s into its (possibly just smoothed) weight
        record["targets"][SSM_TARGET] = _smooth_ssm_input(model, online, ssm_acts, alpha)
    if smooth_mm:  # after the SSM input: both multiply the conv's S-SiLU buffer (Mamba-2)
        record["targets"][MATMUL_TARGET] = _smooth_matmul(model, online, mm_stats, alpha)
    return record


def _ssm_input_absmax(model: MambaLMHeadModel, calib: Calibration) -> list[Tensor]:
    """Per-layer calibration abs-max of the SSM's input x (``<mixer>.ssm_x``), float64 on the CPU."""
    out = []
    for i, mixer in enumerate(model.mixers):
        act = calib.get(f"backbone.layers.{i}.mixer.ssm_x", "absmax").detach().to(device="cpu", dtype=torch.float64)
        if act.numel() != mixer.d_inner:
            raise MqtoolError(f"calibration for layer {i}'s SSM input has {act.numel()} channels, the model "
                              f"{mixer.d_inner}: was it made with this model (as it is now)?")
        out.append(act)
    return out


@torch.no_grad()
def _smooth_ssm_input(model: MambaLMHeadModel, online: dict, acts: list[Tensor], alpha: float) -> dict:
    """Divide every mixer's SSM input x by ``s = max|x|^alpha`` (conv weights / s + S-SiLU) and
    multiply its output back (``ssm_y``); Mamba-1's x_proj columns take s. See the module doc."""
    online["ssm_smooth"] = {}
    ratios, s_min, s_max = [], float("inf"), 0.0
    for mixer, act in zip(model.mixers, acts, strict=True):
        s = smoothing_scale(act, torch.ones_like(act), alpha)
        d = mixer.d_inner
        _conv_ssilu(mixer)
        mixer.ssm_y = attach.ChannelScale(d).to(mixer.conv1d.weight.device)
        _divide_conv_channels(mixer.conv1d, s)                   # x channels come first (Mamba-2: then B, C)
        mixer.conv_act.s[:d] *= s.to(mixer.conv_act.s)
        mixer.ssm_y.s.copy_(s.to(mixer.ssm_y.s))
        if hasattr(mixer, "x_proj"):                             # Mamba-1: x_proj reads x / s now
            lin = mixer.x_proj
            _scale_columns(lin, s, _transform_matrix("x_proj", lin))
        ratios.append([round(_outlier_ratio(act), 4), round(_outlier_ratio(act / s), 4)])
        s_min, s_max = min(s_min, float(s.min())), max(s_max, float(s.max()))
    into = ["<mixer>.conv1d.weight[:d_inner]", "<mixer>.conv1d.bias[:d_inner]", "<mixer>.conv_act.s",
            "<mixer>.ssm_y.s"] + (["<mixer>.x_proj.weight"] if hasattr(model.mixers[0], "x_proj") else [])
    return {"via": "ssm_smooth", "into": into, "outlier_ratio": ratios, "s_range": [s_min, s_max]}


@torch.no_grad()
def _divide_conv_channels(conv: nn.Conv1d, s: Tensor, start: int = 0) -> None:
    """Divide output channels ``start : start + len(s)`` of a depthwise conv (weight and bias) by s."""
    end = start + s.numel()
    w = conv.weight.detach().to(torch.float64).clone()
    w[start:end] /= s.to(w.device)[:, None, None]
    _set(conv.weight, w)
    if conv.bias is not None:
        b = conv.bias.detach().to(torch.float64).clone()
        b[start:end] /= s.to(b.device)
        _set(conv.bias, b)


def _conv_ssilu(mixer: nn.Module) -> None:
    """Make the conv's SiLU an S-SiLU over every conv channel (s = 1), keeping one already there."""
    if not isinstance(mixer.conv_act, attach.SSiLU):
        mixer.conv_act = attach.SSiLU(mixer.conv1d.out_channels).to(mixer.conv1d.weight.device)


def _matmul_absmax(model: MambaLMHeadModel, calib: Calibration) -> list[tuple[Tensor, Tensor]]:
    """Per layer (max|h_n|, max|C_n|) per state channel (Mamba-2: per group and state channel,
    flattened as C's channels are), float64 on the CPU."""
    out = []
    for i, mixer in enumerate(model.mixers):
        prefix = f"backbone.layers.{i}.mixer"
        if getattr(mixer, "bcdt_rms_eps", None) is not None:
            raise MqtoolError("FalconMamba: the RMS norm over B and C would undo a matmul smoothing scale")
        if f"{prefix}.state.absmax" not in calib.stats:
            raise MqtoolError("the 'matmul' smoothing target needs state statistics: calibrate with "
                              "--state-samples above 0")
        h = calib.get(prefix + ".state", "absmax").detach().to(device="cpu", dtype=torch.float64)
        c = calib.get(prefix + ".ssm_C", "absmax").detach().to(device="cpu", dtype=torch.float64)
        g = getattr(mixer, "ngroups", 1)
        n = mixer.d_state
        if c.numel() != g * n or h.shape[-1] != n or h.numel() % (g * n):
            raise MqtoolError(f"calibration for layer {i}'s states / C does not match the model (d_state {n}): "
                              "was it made with this model (as it is now)?")
        # Mamba-1 h [d_inner, n]; Mamba-2 [heads, headdim, n], heads grouped as B and C are
        h_n = h.reshape(g, -1, n).amax(1).reshape(-1)
        out.append((h_n, c))
    return out


@torch.no_grad()
def _smooth_matmul(model: MambaLMHeadModel, online: dict, stats: list[tuple[Tensor, Tensor]],
                   alpha: float) -> dict:
    """B / s and C * s per state channel, ``s = max|h|^alpha / max|C|^(1-alpha)``: every state becomes
    h / s and ``y = C · h`` is unchanged. See the module doc."""
    attach.apply_online(model, {"matmul_smooth": {}})
    online["matmul_smooth"] = {}
    h_ratios, c_ratios, s_min, s_max = [], [], float("inf"), 0.0
    mamba1 = hasattr(model.mixers[0], "x_proj")
    for mixer, (h, c) in zip(model.mixers, stats, strict=True):
        s = smoothing_scale(h, c, alpha)
        gn = s.numel()
        if mamba1:  # x_proj rows: [dt | B | C]
            _divide_rows(mixer.x_proj, mixer.dt_rank, s)
            _divide_rows(mixer.x_proj, mixer.dt_rank + gn, 1.0 / s)
        else:  # conv channels: [x | B | C]; S-SiLU with s (B) and 1/s (C) keeps SiLU(c) / s and SiLU(c) s
            d = mixer.d_inner
            _divide_conv_channels(mixer.conv1d, s, d)
            _divide_conv_channels(mixer.conv1d, 1.0 / s, d + gn)
            mixer.conv_act.s[d:d + gn] *= s.to(mixer.conv_act.s)
            mixer.conv_act.s[d + gn:d + 2 * gn] /= s.to(mixer.conv_act.s)
        h_ratios.append([round(_outlier_ratio(h), 4), round(_outlier_ratio(h / s), 4)])
        c_ratios.append([round(_outlier_ratio(c), 4), round(_outlier_ratio(c * s), 4)])
        s_min, s_max = min(s_min, float(s.min())), max(s_max, float(s.max()))
    into = (["<mixer>.x_proj.weight[B rows]", "<mixer>.x_proj.weight[C rows]"] if mamba1 else
            ["<mixer>.conv1d.weight[B, C channels]", "<mixer>.conv1d.bias[B, C channels]", "<mixer>.conv_act.s"])
    return {"via": "matmul_smooth", "into": into, "state_outlier_ratio": h_ratios, "C_outlier_ratio": c_ratios,
            "s_range": [s_min, s_max]}
