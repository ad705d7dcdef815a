"""The decode step: one token per sequence through every layer, reading and writing a
:class:`~mqtool.runtime.cache.StateCache`.

Each piece runs the fastest implementation that computes what the simulated model computes:

* mamba-ssm's fused kernels where they are installed, the tensors are on CUDA and the attachment
  point they would skip is plain (a quantizer or S-SiLU attached there forces the PyTorch path;
  quantizers on the SSM inputs run before `selective_state_update`, which then takes them as given):
  residual add + RMSNorm (`rms_norm_fn`), `causal_conv1d_update` (conv + SiLU),
  `selective_state_update` (float states; dt bias, softplus, D and Mamba-1's gate fused) and the
  gated RMSNorm (`rmsnorm_fn`);
* mqtool's Triton kernels for int8 and packed int4 codes of both families (codes in, codes out,
  dt bias and softplus fused);
* otherwise the plain-PyTorch reference: the simulated model's own modules and
  `scan.mamba{1,2}_step` on the dequantized state, then `LayerCache.write`.

Every linear is called as the model's module, so whatever is attached to it (activation
quantizers, online Hadamards, integer kernels) runs.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mqtool.models import scan
from mqtool.models.layers import Linear, RMSNorm, causal_conv1d_step
from mqtool.runtime.cache import LayerCache, StateCache

__all__ = ["fused_ops", "model_step"]


@functools.lru_cache(maxsize=1)
def fused_ops() -> dict[str, Any]:
    """mamba-ssm / causal-conv1d's fused decode pieces that import here ({} without them, or with
    ``MQTOOL_NO_MAMBA_SSM=1``)."""
    if os.environ.get("MQTOOL_NO_MAMBA_SSM") == "1" or not torch.cuda.is_available():
        return {}
    ops: dict[str, Any] = {}
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        ops["selective_state_update"] = selective_state_update
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        pass
    try:
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

        ops["rms_norm_fn"] = rms_norm_fn
    except Exception:  # noqa: BLE001
        pass
    try:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

        ops["rmsnorm_gated_fn"] = rmsnorm_fn
    except Exception:  # noqa: BLE001
        pass
    try:
        from causal_conv1d import causal_conv1d_update

        ops["causal_conv1d_update"] = causal_conv1d_update
    except Exception:  # noqa: BLE001
        pass
    return ops


def _plain(*modules: nn.Module) -> bool:
    return all(isinstance(m, nn.Identity) for m in modules)


def _use(name: str, t: Tensor) -> Any:
    return fused_ops().get(name) if t.is_cuda else None


def _quant_kernel(lc: LayerCache, family: str = "Mamba2") -> Any:
    """mqtool's fused quantized-state step (int8 or packed int4 codes) for this cache and family,
    when it runs here (CUDA + Triton, an even state size)."""
    forced = os.environ.get("MQTOOL_FUSED_STATE")   # "0": never; "1": on the CPU too, interpreted (tests)
    if not lc.fmt.quantized or forced == "0":
        return None
    from mqtool import kernels

    here = lc.state.is_cuda or (forced == "1" and kernels.INTERPRET)
    if not (kernels.HAS_TRITON and here) or lc.state_shape[-1] % 2:
        return None
    return kernels.state_update if family == "Mamba2" else kernels.mamba1_state_update


def _conv(mixer: nn.Module, lc: LayerCache, xin: Tensor) -> Tensor:
    """conv window update + conv output through `conv_act`."""
    upd = _use("causal_conv1d_update", xin)
    if upd is not None and type(mixer.conv_act) is nn.SiLU:
        w = mixer.conv1d.weight.squeeze(1)
        return upd(xin.to(lc.conv.dtype), lc.conv, w, mixer.conv1d.bias, "silu")
    return mixer.conv_act(causal_conv1d_step(lc.conv, xin.to(lc.conv.dtype), mixer.conv1d.weight, mixer.conv1d.bias))


def _mamba2_inputs(mixer: nn.Module, xBC: Tensor, dt: Tensor, raw_dt: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x [b, h, p], dt [b, h], B, C [b, g, n]) through the SSM-input attachment points; with
    `raw_dt` the step size is left raw (dt bias, softplus and limit fused in the kernel)."""
    if not raw_dt:
        return mixer._ssm_inputs(xBC, dt)
    gn = mixer.ngroups * mixer.d_state
    x, B, C = torch.split(xBC, [mixer.d_inner, gn, gn], dim=-1)
    x = mixer.ssm_x(x).unflatten(-1, (mixer.nheads, mixer.headdim))
    B = mixer.ssm_B(B).unflatten(-1, (mixer.ngroups, mixer.d_state))
    C = mixer.ssm_C(C).unflatten(-1, (mixer.ngroups, mixer.d_state))
    return x, dt, B, C


def mamba2_step(mixer: nn.Module, hidden: Tensor, lc: LayerCache) -> Tensor:
    z, xBC, dt = mixer._split(mixer.in_proj(hidden))
    xBC = _conv(mixer, lc, xBC).to(hidden.dtype)
    b = hidden.shape[0]
    A, D = mixer._A(), mixer._D()
    no_limit = mixer.dt_limit == (0.0, float("inf"))
    ssu = None if lc.fmt.quantized else _use("selective_state_update", hidden)
    kernel = _quant_kernel(lc)
    if ssu is not None:
        # mamba-ssm's Mamba2.step (per-head values broadcast over P, N); dt bias and softplus fused
        # unless a quantizer sits on Δ or a limit clamps it (the kernel applies neither)
        raw = _plain(mixer.ssm_dt) and no_limit
        x, dt, B, C = _mamba2_inputs(mixer, xBC, dt, raw)
        h, p, n = mixer.nheads, mixer.headdim, mixer.d_state
        dt_e = dt.unsqueeze(-1).expand(b, h, p)
        A_e = A[:, None, None].expand(h, p, n)
        # a zero bias, not None: mamba-ssm 2.3's kernel reads dt_bias' strides unconditionally
        dtb = mixer.dt_bias[:, None].expand(h, p) if raw else dt.new_zeros(1).expand(h, p)
        D_e = D if D.dim() == 2 else D[:, None].expand(h, p)
        y = ssu(lc.state, x, dt_e, A_e, B, C, D_e, z=None, dt_bias=dtb, dt_softplus=raw)
    elif kernel is not None:
        raw = _plain(mixer.ssm_dt)
        x, dt, B, C = _mamba2_inputs(mixer, xBC, dt, raw)
        fused_dt = {"dt_bias": mixer.dt_bias, "dt_softplus": True, "dt_limit": mixer.dt_limit} if raw else {}
        y = kernel(lc.state, x, dt, A, B, C, D, lc.scale_channel, lc.scale_state, bits=lc.fmt.bits,
                   channel_stat=lc.fmt.channel_scale, method=lc.fmt.method, **fused_dt)
    else:
        x, delta, B, C = mixer._ssm_inputs(xBC, dt)
        y, h_new = scan.mamba2_step(lc.read(), x, delta, A, B, C, D)
        lc.write(h_new)
    y = y.reshape(b, mixer.d_inner)
    norm = mixer.norm
    gated = _use("rmsnorm_gated_fn", hidden)
    if gated is not None and _plain(mixer.ssm_y) and type(norm.gate_act) is nn.SiLU:
        y = gated(y.to(hidden.dtype), norm.weight, None, z=z, eps=norm.eps, group_size=norm.group_size,
                  norm_before_gate=False)
    else:
        y = norm(mixer.ssm_y(y), z)
    return mixer.out_proj(y.to(hidden.dtype))


def mamba1_step(mixer: nn.Module, hidden: Tensor, lc: LayerCache) -> Tensor:
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)
    x = _conv(mixer, lc, x).to(hidden.dtype)
    A = mixer._A()
    fast_gate = _plain(mixer.ssm_y) and type(mixer.gate_act) is nn.SiLU
    ssu = None if lc.fmt.quantized or not fast_gate else _use("selective_state_update", hidden)
    kernel = _quant_kernel(lc, "Mamba1")
    if (ssu is not None or kernel is not None) and mixer.bcdt_rms_eps is None:  # FalconMamba's norms: below
        # quantizers on the SSM inputs run first; dt_proj's bias and softplus go into the kernel
        # (as mamba-ssm's Mamba.step does) unless something is attached there
        x_dbl = mixer.x_proj(x)
        dt, B, C = torch.split(x_dbl, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        dt_proj = mixer.dt_proj
        raw = (type(dt_proj) is Linear and dt_proj.bias is not None and _plain(mixer.ssm_dt)
               and _plain(dt_proj.input_transform, dt_proj.input_quantizer))
        if raw:
            dt, dt_bias = F.linear(dt, dt_proj.weight), dt_proj.bias
        else:
            dt, dt_bias = mixer.ssm_dt(F.softplus(dt_proj(dt).float())), None
        u, B, C = mixer.ssm_x(x), mixer.ssm_B(B), mixer.ssm_C(C)
        if ssu is not None:  # gate fused; a zero bias, not None: see mamba2_step
            dt_bias = dt.new_zeros(1).expand(mixer.d_inner) if dt_bias is None else dt_bias
            y = ssu(lc.state, u, dt, A, B, C, mixer.D, z=z, dt_bias=dt_bias, dt_softplus=raw)
            return mixer.out_proj(y.to(hidden.dtype))
        y = kernel(lc.state, u, dt, A, B, C, mixer.D, lc.scale_channel, lc.scale_state, bits=lc.fmt.bits,
                   channel_stat=lc.fmt.channel_scale, method=lc.fmt.method, dt_bias=dt_bias, dt_softplus=raw)
    else:
        u, delta, B, C = mixer._ssm_inputs(x)
        y, h_new = scan.mamba1_step(lc.read(), u, delta, A, B, C, mixer.D)
        lc.write(h_new)
    y = (mixer.ssm_y(y) * mixer.gate_act(z.float())).to(hidden.dtype)
    return mixer.out_proj(y)


def _add_norm(norm: nn.Module, hidden: Tensor, residual: Tensor | None, residual_in_fp32: bool,
              ) -> tuple[Tensor, Tensor]:
    """residual += hidden; normed = norm(residual) (mamba-ssm's fused add + RMSNorm where it runs)."""
    fn = _use("rms_norm_fn", hidden)
    if fn is not None and type(norm) is RMSNorm:
        out, res = fn(hidden, norm.weight, None, residual=residual, prenorm=True,
                      residual_in_fp32=residual_in_fp32, eps=norm.eps)
        return out, res
    residual = hidden if residual is None else residual + hidden
    if residual_in_fp32:
        residual = residual.float()
    return norm(residual.to(norm.weight.dtype)), residual


@torch.inference_mode()
def model_step(model: nn.Module, input_ids: Tensor, cache: StateCache) -> Tensor:
    """One token per sequence: ``input_ids [b]`` -> logits ``[b, padded_vocab]``; updates ``cache``."""
    step = mamba2_step if model.config.layer == "Mamba2" else mamba1_step
    hidden, residual = model.backbone.embedding(input_ids), None
    for layer, lc in zip(model.backbone.layers, cache.layers, strict=True):
        normed, residual = _add_norm(layer.norm, hidden, residual, layer.residual_in_fp32)
        hidden = step(layer.mixer, normed, lc)
    normed, _ = _add_norm(model.backbone.norm_f, hidden, residual, model.config.residual_in_fp32)
    return model.lm_head(normed)


