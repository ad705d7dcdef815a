"""Normalised Hadamard matrices for every width Mamba uses, and a fast transform.

A size ``n`` is built as ``H_n = H_m ⊗ H_{2^k}`` with ``n = m * 2^k``, where ``H_{2^k}`` is
Sylvester's matrix and ``H_m`` (the smallest base that works) comes from

* ``m in {1, 2}`` — Sylvester;
* Paley I — ``m = q + 1`` for ``q`` prime, ``q ≡ 3 (mod 4)``: 4, 8, 12, 20, 24, 32, 44, 48, 60, ...;
* Paley II — ``m = 2(q + 1)`` for ``q`` a prime or the square of a prime, ``q ≡ 1 (mod 4)``:
  12, 20, 28, 36, 52 (q = 25), 60, ...

so e.g. 1536 = 12·128, 2560 = 20·128, 5120 = 20·256, 1792 = 28·64, 40 = 20·2. Every matrix is
normalised (``H @ H.T = I``); entries are ``±1/sqrt(n)``. The product ``x @ H`` is what
:func:`apply_hadamard` computes, by a Walsh-Hadamard butterfly for the ``2^k`` factor and a small
matmul for the ``m`` factor, in O(n (log n + m)) per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from mqtool.errors import MqtoolError

__all__ = [
    "TransformInfo",
    "apply_hadamard",
    "hadamard_decomposition",
    "hadamard_matrix",
    "has_hadamard",
    "orthogonal_transform_matrix",
    "random_hadamard_matrix",
]


# ------------------------------------------------------------------------- base constructions


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    return all(p % d for d in range(2, math.isqrt(p) + 1))


def _prime_or_prime_square(q: int) -> int | None:
    """The prime p with q = p or q = p^2, else None."""
    if _is_prime(q):
        return q
    r = math.isqrt(q)
    if r * r == q and _is_prime(r):
        return r
    return None


def _field(q: int) -> tuple[list[tuple[int, int]], Callable, set]:
    """GF(q) for q = p or p^2 (p odd): elements, subtraction, and the set of non-zero squares.

    GF(p^2) is GF(p)[t]/(t^2 - r) with r a quadratic non-residue mod p; elements are (a0, a1).
    """
    p = _prime_or_prime_square(q)
    if p == q:
        elems = [(a, 0) for a in range(p)]
        r = 0
    else:
        elems = [(a, b) for a in range(p) for b in range(p)]
        r = next(c for c in range(2, p) if pow(c, (p - 1) // 2, p) == p - 1)

    def sub(x: tuple[int, int], y: tuple[int, int]) -> tuple[int, int]:
        return ((x[0] - y[0]) % p, (x[1] - y[1]) % p)

    def mul(x: tuple[int, int], y: tuple[int, int]) -> tuple[int, int]:
        return ((x[0] * y[0] + r * x[1] * y[1]) % p, (x[0] * y[1] + x[1] * y[0]) % p)

    squares = {mul(e, e) for e in elems if e != (0, 0)}
    return elems, sub, squares


def _jacobsthal(q: int) -> Tensor:
    """Q[a, b] = chi(a - b), chi the quadratic character of GF(q)."""
    elems, sub, squares = _field(q)
    Q = torch.zeros(q, q, dtype=torch.float64)
    for i, a in enumerate(elems):
        for j, b in enumerate(elems):
            d = sub(a, b)
            if d != (0, 0):
                Q[i, j] = 1.0 if d in squares else -1.0
    return Q


def _paley1(q: int) -> Tensor:
    """Paley construction I (q ≡ 3 mod 4): a ±1 Hadamard matrix of order q + 1."""
    Q = _jacobsthal(q)  # antisymmetric for q ≡ 3 mod 4
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1.0
    S[1:, 0] = -1.0
    S[1:, 1:] = Q
    return S + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> Tensor:
    """Paley construction II (q ≡ 1 mod 4): a ±1 Hadamard matrix of order 2(q + 1)."""
    Q = _jacobsthal(q)  # symmetric for q ≡ 1 mod 4
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # symmetric conference matrix
    C[0, 1:] = 1.0
    C[1:, 0] = 1.0
    C[1:, 1:] = Q
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)


def _base_kind(m: int) -> str | None:
    """Which construction builds the ±1 matrix of order m (checked in this order), or None."""
    if m in (1, 2):
        return "sylvester"
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    q = m // 2 - 1
    if _prime_or_prime_square(q) is not None and q % 4 == 1:
        return "paley2"
    return None


@lru_cache(maxsize=64)
def _base_pm1(m: int) -> Tensor:
    """Unnormalised ±1 Hadamard matrix of order m (cached; callers must not modify it)."""
    kind = _base_kind(m)
    if kind == "sylvester":
        return torch.tensor([[1.0]], dtype=torch.float64) if m == 1 else _sylvester(2)
    if kind == "paley1":
        return _paley1(m - 1)
    if kind == "paley2":
        return _paley2(m // 2 - 1)
    raise MqtoolError(f"no Hadamard construction for base order {m}")


def _sylvester(n: int) -> Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


# ------------------------------------------------------------------------------- public matrices


def hadamard_decomposition(n: int) -> tuple[int, int] | None:
    """``(m, k)`` with ``n = m * 2**k`` and m the smallest constructible base, or None if none exists."""
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1  # exponent of the largest power of two dividing n
    for j in range(k, -1, -1):
        m = n >> j
        if _base_kind(m) is not None:
            return m, j  # m is odd (1) or a multiple of 4 here, never 2
    return None


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build order n."""
    return hadamard_decomposition(n) is not None


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Normalised Hadamard matrix ``H_m ⊗ H_{2^k}`` of order n (``H @ H.T = I``).

    Raises :class:`MqtoolError` for orders with no construction here (e.g. odd n > 1); use
    :func:`orthogonal_transform_matrix` for a block-diagonal fallback.
    """
    dec = hadamard_decomposition(n)
    if dec is None:
        raise MqtoolError(
            f"no Hadamard matrix of order {n} is available (supported: n = m * 2^k with m = 1 or a Paley "
            "order such as 12, 20, 28, 36, 44, 52, 60); orthogonal_transform_matrix() falls back to blocks"
        )
    m, k = dec
    H = torch.kron(_base_pm1(m), _sylvester(2**k)) if m > 1 else _sylvester(2**k)
    return (H / math.sqrt(n)).to(dtype)


def _signs(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1


def random_hadamard_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """QuaRot's randomised Hadamard ``H @ diag(s)``, s i.i.d. ±1 from ``seed`` (CPU generator).

    Flipping column signs keeps it orthogonal, and ``x @ H diag(s) = apply_hadamard(x) * s``.
    """
    return (hadamard_matrix(n) * _signs(n, seed)).to(dtype)


@dataclass(frozen=True)
class TransformInfo:
    """What :func:`orthogonal_transform_matrix` built: ``n_blocks`` diagonal blocks of ``block_size``."""

    kind: str
    n: int
    block_size: int
    n_blocks: int
    seed: int | None

    @property
    def is_full(self) -> bool:
        """True when the transform mixes all n channels (one block)."""
        return self.n_blocks == 1


_KINDS = ("hadamard", "random_hadamard", "random_orthogonal")


def orthogonal_transform_matrix(
    n: int, kind: str = "hadamard", seed: int | None = None, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, TransformInfo]:
    """An orthogonal ``[n, n]`` rotation and a description of it.

    * ``"hadamard"``: :func:`hadamard_matrix` when order n exists, else a block-diagonal matrix of
      Hadamard blocks of the largest constructible order dividing n (``info.block_size``; 1, i.e.
      the identity, when n is odd and has no constructible divisor > 1).
    * ``"random_hadamard"``: the same with random column signs from ``seed`` (default 0).
    * ``"random_orthogonal"``: Haar-random orthogonal matrix (QR of a Gaussian) from ``seed``.
    """
    if n < 1:
        raise MqtoolError(f"transform size must be positive, got {n}")
    if kind not in _KINDS:
        raise MqtoolError(f"unknown transform kind {kind!r}; use one of {_KINDS}")
    if kind == "random_orthogonal":
        seed = 0 if seed is None else seed
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(n, n, generator=g, dtype=torch.float64)
        Qm, R = torch.linalg.qr(A)
        Qm = Qm * torch.sign(torch.diagonal(R))  # makes the distribution Haar, and deterministic
        return Qm.to(dtype), TransformInfo(kind, n, n, 1, seed)

    b = next(d for d in range(n, 0, -1) if n % d == 0 and has_hadamard(d))
    Hb = hadamard_matrix(b)
    M = torch.block_diag(*([Hb] * (n // b))) if b < n else Hb
    if kind == "random_hadamard":
        seed = 0 if seed is None else seed
        M = M * _signs(n, seed)
    else:
        seed = None
    return M.to(dtype), TransformInfo(kind, n, b, n // b, seed)


# ------------------------------------------------------------------------------ fast application


def _fwht(x: Tensor) -> Tensor:
    """Unnormalised Walsh-Hadamard butterfly along the last dim: ``x @ Sylvester(2^k)``."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        # Pair element i with i + h inside each block of 2h: (a, b) -> (a + b, a - b).
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def apply_hadamard(x: Tensor, H: Tensor | None = None) -> Tensor:
    """``x @ H`` along the last dim, returned in x's dtype.

    With ``H=None`` this is ``x @ hadamard_matrix(n)`` computed fast: x is viewed as
    ``[..., m, 2^k]``, the butterfly handles ``H_{2^k}`` and an ``m × m`` matmul handles ``H_m``
    (Kronecker structure). Computation is in float32 (float64 for float64 input).
    """
    if H is not None:
        if H.shape != (x.shape[-1], x.shape[-1]):
            raise MqtoolError(f"transform shape {tuple(H.shape)} does not match last dim {x.shape[-1]}")
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.to(cd) @ H.to(device=x.device, dtype=cd)).to(x.dtype)
    n = x.shape[-1]
    dec = hadamard_decomposition(n)
    if dec is None:
        raise MqtoolError(f"no Hadamard matrix of order {n}; pass an explicit H")
    m, k = dec
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = _fwht(x.to(cd).reshape(*x.shape[:-1], m, 2**k))
    if m > 1:
        # (x @ (A ⊗ B)) viewed [m, 2^k] is A^T X B; B came from the butterfly above.
        A = _base_pm1(m).to(device=x.device, dtype=cd)
        y = torch.einsum("...ab,ac->...cb", y, A)
    return (y.reshape(x.shape) / math.sqrt(n)).to(x.dtype)
