"""MambaQuant's KLT-enhanced rotation ``H_K = K H``.

With the (centred) covariance of the activations ``C = K Λ K^T`` and a normalised Hadamard
matrix H, rotating the activations by ``H_K`` gives ``H_K^T C H_K = H^T Λ H``, whose diagonal is
``trace(C) / n`` for every channel: all channel variances become equal, not just the outliers'
magnitudes spread out as with a plain Hadamard rotation (which fails when channels are correlated).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mqtool.errors import MqtoolError
from mqtool.quant.hadamard import hadamard_matrix

__all__ = ["covariance_from_moments", "klt_rotation"]


def covariance_from_moments(sum_xxT: Tensor, sum_x: Tensor, n: int) -> Tensor:
    """Unbiased centred covariance ``X_c^T X_c / (n - 1)`` (float64) from streamed sums.

    ``sum_xxT = Σ x x^T`` and ``sum_x = Σ x`` over ``n`` samples (rows). Accumulate the sums in
    float64: the subtraction below cancels badly in float32 when the mean is large.
    """
    if n < 2:
        raise MqtoolError(f"a covariance needs at least 2 samples, got {n}")
    S = sum_xxT.to(torch.float64)
    mu = sum_x.to(torch.float64) / n
    if S.dim() != 2 or S.shape[0] != S.shape[1] or mu.shape != (S.shape[0],):
        raise MqtoolError(f"moment shapes do not match: sum_xxT {tuple(S.shape)}, sum_x {tuple(mu.shape)}")
    C = (S - n * torch.outer(mu, mu)) / (n - 1)
    return (C + C.T) / 2  # exact symmetry for eigh


def klt_rotation(cov: Tensor, hadamard: Tensor | None = None, mean: Tensor | None = None) -> Tensor:
    """KLT-enhanced rotation ``H_K = K H`` (float64 on CPU, orthogonal); apply as ``x @ H_K``.

    ``cov`` is the **centred** covariance of the channels when ``mean`` is None (e.g. from
    :func:`covariance_from_moments`). When ``mean`` is given, ``cov`` is taken to be the raw second
    moment ``E[x x^T]`` and is centred here as ``E[x x^T] - mu mu^T``.
    ``hadamard`` defaults to :func:`mqtool.quant.hadamard.hadamard_matrix` of order n.

    Eigenvectors are sorted by decreasing eigenvalue and their signs fixed (largest-magnitude
    entry positive) so the rotation is reproducible across devices and library versions.
    """
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise MqtoolError(f"covariance must be square [n, n], got shape {tuple(cov.shape)}")
    n = cov.shape[0]
    C = cov.detach().to(device="cpu", dtype=torch.float64)
    if mean is not None:
        mu = mean.detach().to(device="cpu", dtype=torch.float64)
        if mu.shape != (n,):
            raise MqtoolError(f"mean shape {tuple(mu.shape)} does not match covariance order {n}")
        C = C - torch.outer(mu, mu)
    C = (C + C.T) / 2
    H = hadamard_matrix(n) if hadamard is None else hadamard.detach().to(device="cpu", dtype=torch.float64)
    if H.shape != (n, n):
        raise MqtoolError(f"Hadamard shape {tuple(H.shape)} does not match covariance order {n}")

    evals, K = torch.linalg.eigh(C)
    order = torch.argsort(evals, descending=True)
    K = K[:, order]
    pivot = K.abs().argmax(dim=0)
    sign = torch.sign(K[pivot, torch.arange(n)])
    K = K * torch.where(sign == 0, torch.ones_like(sign), sign)
    return K @ H
