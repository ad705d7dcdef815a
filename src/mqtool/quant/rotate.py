"""Rotations fused into the weights: QuaRot's randomized Hadamard and MambaQuant's KLT-enhanced one.

`apply_rotate` changes a model in place, without changing what it computes (up to rounding):

1. **Norm folding.** Every pre-norm's weight g moves into the linear(s) reading it
   (block norm -> in_proj, ``norm_f`` -> lm_head: ``W -> W diag(g)``) and the weight becomes 1.
   Mamba-2's gated norm weight moves into out_proj the same way. lm_head is untied from the
   embedding first (its own Parameter, ``config.tie_embeddings = False``): the two differ afterwards.
2. **Residual stream** (d_model x d_model, offline): with Q orthogonal, the residual r becomes r Q:
   embedding ``E -> E Q``, every out_proj ``W -> Q^T W`` (bias ``b -> b Q``), every in_proj and
   lm_head ``W -> W Q``. An RMSNorm with unit weight commutes with Q (it preserves the mean square).
3. **dt path** (Mamba-1, dt_rank x dt_rank, offline, per layer): x_proj's dt rows
   ``W[:r] -> Q_dt^T W[:r]``, dt_proj ``W -> W Q_dt``.
4. **Online Hadamard** at the input of `online_targets` (out_proj; x_proj for Mamba-1): an
   `attach.OnlineHadamard` computes ``x @ H`` and the weight becomes ``W H``, so
   ``(x H)(W H)^T = x W^T``. The manifest's ``online["hadamard"]`` rebuilds it on load.

Q is ``random_hadamard_matrix(n, seed)`` for "hadamard" (QuaRot) and ``K H`` for "klt"
(MambaQuant), K the eigenvectors of the covariance of the activation Q acts on; for orders with no
Hadamard matrix both use the block-diagonal fallback of `orthogonal_transform_matrix`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mqtool.calibrate import Calibration
from mqtool.errors import MqtoolError
from mqtool.models import MambaLMHeadModel
from mqtool.models.layers import RMSNorm
from mqtool.quant import attach
from mqtool.quant.hadamard import hadamard_matrix, orthogonal_transform_matrix
from mqtool.quant.klt import klt_rotation

__all__ = ["METHODS", "ONLINE_TARGETS", "apply_rotate"]

METHODS = ("hadamard", "klt")
ONLINE_TARGETS = ("out_proj", "x_proj")
# online transforms that make a rotation meaningless when already present (rotate runs before them)
_CONFLICTING_ONLINE = ("hadamard", "smooth_scale", "act_quant", "ssm_act_quant")


def _hadamard_rotation(n: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    """Randomized Hadamard of order n (float64), block-diagonal when no Hadamard of order n exists.

    Equals `random_hadamard_matrix(n, seed)` when one does (same sign draw)."""
    Q, info = orthogonal_transform_matrix(n, "random_hadamard", seed)
    return Q, {"size": n, "block_size": info.block_size, "n_blocks": info.n_blocks,
               "full_hadamard": info.is_full}


def _klt(cov: Tensor, H: Tensor) -> Tensor:
    cov = cov.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(cov).all():
        raise MqtoolError("calibration covariance has non-finite entries; re-run `mqtool calibrate`")
    return klt_rotation(cov, H)


def _scaled_cov(calib: Calibration, name: str, g: Tensor) -> Tensor:
    """Covariance of `name`'s input divided by the norm weight g: diag(1/g) C diag(1/g)."""
    C = calib.covariance(name).detach().to(device="cpu", dtype=torch.float64)
    if C.shape != (g.numel(), g.numel()):
        raise MqtoolError(f"calibration for {name} has shape {tuple(C.shape)}, the model needs "
                          f"{(g.numel(), g.numel())}: was it made with this model?")
    g = g.detach().to(device="cpu", dtype=torch.float64)
    g = torch.where(g.abs() < 1e-12, torch.full_like(g, 1e-12), g)  # a dead channel stays (near) zero
    inv = 1.0 / g
    return C * torch.outer(inv, inv)


@torch.no_grad()
def _set(p: Tensor, value: Tensor) -> None:
    p.copy_(value.to(device=p.device, dtype=p.dtype))


def _check(model: MambaLMHeadModel, online: dict, method: str, targets: list[str]) -> None:
    if method not in METHODS:
        raise MqtoolError(f"unknown rotation method {method!r}; use one of {', '.join(METHODS)}")
    if not model.config.rms_norm:
        raise MqtoolError("rotation needs RMSNorm (config rms_norm=true); "
                          "LayerNorm with a bias is not supported")
    norms = [layer.norm for layer in model.backbone.layers] + [model.backbone.norm_f]
    if not all(isinstance(n, RMSNorm) for n in norms):
        raise MqtoolError("rotation needs every block norm and norm_f to be an RMSNorm")
    present = [k for k in _CONFLICTING_ONLINE if k in online]
    if present:
        raise MqtoolError(f"the checkpoint already has online transforms {present}: rotate must run before "
                          "smoothing and activation quantization, and only once")
    for name, lin in attach.linears(model, attach.LINEAR_TARGETS).items():
        attached = (lin.input_transform, lin.input_quantizer)
        if not all(isinstance(m, nn.Identity) for m in attached):
            raise MqtoolError(f"{name} already has an input transform or quantizer attached; "
                              "rotate must run first")
    unknown = sorted(set(targets) - set(ONLINE_TARGETS))
    if unknown:
        raise MqtoolError(f"unknown online Hadamard targets {unknown}; allowed: {', '.join(ONLINE_TARGETS)}")
    if "x_proj" in targets and model.config.layer != "Mamba1":
        raise MqtoolError("online Hadamard at x_proj is for Mamba-1 only (Mamba-2 has no x_proj)")
    if len(set(targets)) != len(targets):
        raise MqtoolError(f"duplicate online Hadamard targets: {targets}")


@torch.no_grad()
def apply_rotate(model: MambaLMHeadModel, online: dict, calib: Calibration | None, method: str = "hadamard",
                 online_targets: list[str] | None = None, seed: int | None = None) -> dict:
    """Fold norms, rotate the residual stream (and Mamba-1's dt path) offline, and attach an online
    Hadamard at `online_targets` (default ``["out_proj"]``; ``[]`` for none). See the module doc.

    `calib` (statistics of the model before this stage) is required for ``method="klt"``. `seed`
    draws the random Hadamard signs (None means 0). Updates `online` with the "hadamard" entry and
    returns the JSON record for the manifest."""
    targets = ["out_proj"] if online_targets is None else list(online_targets)
    _check(model, online, method, targets)
    if method == "klt" and calib is None:
        raise MqtoolError("the KLT rotation needs calibration statistics (`mqtool calibrate`, then --calib)")
    seed = 0 if seed is None else int(seed)
    cfg = model.config
    layers = list(model.backbone.layers)
    mamba1 = cfg.layer == "Mamba1"
    d = cfg.d_model
    dev = model.backbone.embedding.weight.device

    # --- untie lm_head from the embedding (they differ once norm_f's weight is folded in)
    was_tied = model.lm_head.weight is model.backbone.embedding.weight or cfg.tie_embeddings
    if model.lm_head.weight is model.backbone.embedding.weight:
        model.lm_head.weight = nn.Parameter(model.backbone.embedding.weight.detach().clone(),
                                            requires_grad=model.backbone.embedding.weight.requires_grad)
    cfg.tie_embeddings = False

    # --- residual rotation Q, from the statistics of the model as it is (norm weights not yet folded)
    H, res_info = _hadamard_rotation(d, seed)
    if method == "klt":
        cov = sum(_scaled_cov(calib, f"backbone.layers.{i}.mixer.in_proj", layer.norm.weight)
                  for i, layer in enumerate(layers))
        cov = cov + _scaled_cov(calib, "lm_head", model.backbone.norm_f.weight)
        Q = _klt(cov, H)
    else:
        Q = H
    Q = Q.to(dev)

    # dt rotations (Mamba-1), per layer for KLT
    dt_info = None
    dt_Qs: list[Tensor] = []
    if mamba1:
        r = layers[0].mixer.dt_rank
        Hdt, dt_info = _hadamard_rotation(r, seed)
        for i in range(len(layers)):
            if method == "klt":
                dt_Qs.append(_klt(calib.covariance(f"backbone.layers.{i}.mixer.dt_proj"), Hdt).to(dev))
            else:
                dt_Qs.append(Hdt.to(dev))

    # --- embedding and residual writers/readers
    emb = model.backbone.embedding.weight
    _set(emb, emb.double() @ Q)
    for i, layer in enumerate(layers):
        mixer = layer.mixer
        g = layer.norm.weight.double()
        W = mixer.in_proj.weight.double() * g  # fold: W diag(g)
        _set(mixer.in_proj.weight, W @ Q)
        layer.norm.weight.fill_(1.0)
        W = mixer.out_proj.weight.double()
        if not mamba1:  # Mamba-2's gated norm weight -> out_proj
            W = W * mixer.norm.weight.double()
            mixer.norm.weight.fill_(1.0)
        _set(mixer.out_proj.weight, Q.T @ W)
        if mixer.out_proj.bias is not None:
            _set(mixer.out_proj.bias, mixer.out_proj.bias.double() @ Q)
        if mamba1:
            Qdt = dt_Qs[i]
            r = mixer.dt_rank
            Wx = mixer.x_proj.weight.double().clone()
            Wx[:r] = Qdt.T @ Wx[:r]
            _set(mixer.x_proj.weight, Wx)
            _set(mixer.dt_proj.weight, mixer.dt_proj.weight.double() @ Qdt)
    gf = model.backbone.norm_f.weight.double()
    _set(model.lm_head.weight, (model.lm_head.weight.double() * gf) @ Q)
    model.backbone.norm_f.weight.fill_(1.0)

    # --- online Hadamard, attached exactly as apply_online rebuilds it on load
    online_info: dict[str, Any] = {}
    if targets:
        spec = {"targets": targets, "kind": "hadamard", "seed": None}
        attach.apply_online(model, {"hadamard": spec})
        for name, lin in attach.linears(model, targets).items():
            t: attach.OnlineHadamard = lin.input_transform
            Hon = hadamard_matrix(t.n) if t.fast else t.matrix.detach().to(device="cpu", dtype=torch.float64)
            _set(lin.weight, lin.weight.double() @ Hon.to(lin.weight.device))
            kind = name.split(".")[-1]
            if kind not in online_info:
                _, info = orthogonal_transform_matrix(t.n, "hadamard")
                online_info[kind] = {"size": t.n, "block_size": info.block_size, "n_blocks": info.n_blocks,
                                     "full_hadamard": info.is_full, "fast": t.fast}
        online["hadamard"] = spec

    record: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "residual": {**res_info, "klt": method == "klt"},
        "folded_norms": len(layers) + 1 + (0 if mamba1 else len(layers)),
        "online_targets": targets,
        "online": online_info,
        "untied": True,
        "was_tied": bool(was_tied),
    }
    if dt_info is not None:
        record["dt"] = {**dt_info, "klt": method == "klt"}
    return record
