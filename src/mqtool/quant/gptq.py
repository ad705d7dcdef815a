"""GPTQ (Frantar et al., 2022) as pure functions: stream a Hessian, then quantize one weight.

The result is in exactly the format of :func:`mqtool.quant.quantizers.quantize_weight` (int8 codes
in ``[-qmax, qmax]``, float32 scales ``[out, 1]`` or ``[out, in // group_size]``), so
``dequantize_weight`` and the exporter treat GPTQ and RTN weights alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mqtool.errors import MqtoolError
from mqtool.quant.quantizers import _check_weight, qmax_for, weight_scale

__all__ = ["accumulate_hessian", "gptq_quantize"]


def accumulate_hessian(H: Tensor | None, x: Tensor, n_seen: int) -> tuple[Tensor, int]:
    """Add a batch of layer inputs ``x [..., in]`` to the running ``H = 2/n * X^T X`` (float32).

    ``n_seen`` counts rows (tokens) so far; every leading dimension of ``x`` counts as rows.
    Returns the updated ``(H, n_seen)``; pass ``H=None, n_seen=0`` for the first batch.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    n = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    elif H.shape != (x.shape[1], x.shape[1]):
        raise MqtoolError(f"Hessian shape {tuple(H.shape)} does not match input width {x.shape[1]}")
    if n == 0:
        return H, n_seen
    total = n_seen + n
    # Rescale the running mean instead of summing raw X^T X: keeps magnitudes bounded in fp32.
    H = H * (n_seen / total)
    x = x * (2.0 / total) ** 0.5
    return H.addmm_(x.t(), x), total


def _fq(w: Tensor, scale: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """Quantize one column with the shared rule -> (float codes, dequantized column)."""
    q = torch.round(w / scale).clamp_(-qmax, qmax)
    return q, q * scale


def gptq_quantize(
    w: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> tuple[Tensor, Tensor]:
    """Quantize ``w [out, in]`` with GPTQ given ``hessian [in, in]`` -> ``(q int8, scale float32)``.

    * Dead inputs (``H_ii == 0``) get weight 0 and do not take part in error feedback.
    * Damping adds ``damp * mean(diag H)`` to the diagonal before the Cholesky factorisation.
    * Without ``act_order`` a group's scales are computed from the *updated* weights when the
      sweep enters the group (as in the GPTQ paper). With ``act_order`` columns are visited in
      order of decreasing ``H_ii`` but groups stay the *original* consecutive column ranges, with
      scales fixed up front from the original weights ("static groups" of the GPTQ repo); this
      keeps the plain ``[out, in // group_size]`` layout, so no group index is needed at export.
    * Per channel (``group_size=None``) the scales come from the original weights.

    Runs in float32 on ``w``'s device; the inputs are not modified.
    """
    _check_weight(w, group_size)
    qmax = qmax_for(bits)
    out, k = w.shape
    if hessian.shape != (k, k):
        raise MqtoolError(f"Hessian shape {tuple(hessian.shape)} does not match weight input width {k}")
    if block_size <= 0:
        raise MqtoolError(f"block_size must be positive, got {block_size}")
    if damp < 0:
        raise MqtoolError(f"damp must be non-negative, got {damp}")

    W = w.detach().float().clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Per-channel or static-group scales from the weights before any error feedback.
    static_scale = None
    if group_size is None or act_order:
        static_scale = weight_scale(W, bits, group_size)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    diag = torch.arange(k, device=W.device)
    H[diag, diag] += damp * torch.mean(torch.diag(H))
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise MqtoolError(
            "GPTQ: the damped Hessian is not positive definite; raise damp or use more calibration data"
        )
    Hinv = torch.cholesky_inverse(L)
    Hinv, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if info.item() != 0:
        raise MqtoolError("GPTQ: the inverse Hessian is not positive definite; raise damp")

    Q = torch.zeros_like(W)
    if group_size is None:
        scale = static_scale
        col_scale = scale.expand(out, k)  # per-column view of the scale
    elif act_order:
        scale = static_scale
        col_scale = scale.repeat_interleave(group_size, dim=1)[:, perm]
    else:
        scale = torch.empty(out, k // group_size, dtype=torch.float32, device=W.device)
        col_scale = None  # filled group by group as the sweep reaches them

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col_scale is None:
                g = col // group_size
                if col % group_size == 0:
                    # Scale from the weights as updated so far, including columns in later blocks.
                    cols = torch.cat([W1[:, i : i + group_size], W[:, i2 : col + group_size]], dim=1)
                    scale[:, g] = weight_scale(cols, bits).squeeze(1)
                s = scale[:, g]
            else:
                s = col_scale[:, col]
            wcol = W1[:, i]
            q, dq = _fq(wcol, s, qmax)
            Q[:, col] = q
            err = (wcol - dq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        # Lazy batch update: the rest of the matrix sees this block's error in one matmul.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8), scale
