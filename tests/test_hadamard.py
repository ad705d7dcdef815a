import math

import pytest
import torch

from mqtool.errors import MqtoolError
from mqtool.quant.hadamard import (
    apply_hadamard,
    hadamard_decomposition,
    hadamard_matrix,
    has_hadamard,
    orthogonal_transform_matrix,
    random_hadamard_matrix,
)

BASES = [12, 20, 28, 36, 40, 44, 52, 60]
MAMBA_SIZES = [64, 128, 256, 512, 768, 1024, 1536, 2048, 2560, 4096, 5120, 48, 96, 160, 1792]


def _assert_orthogonal(H: torch.Tensor) -> None:
    n = H.shape[0]
    # For large n check a spread of rows against all rows: O(64 n^2) instead of O(n^3).
    idx = torch.arange(n) if n <= 1024 else torch.linspace(0, n - 1, 64).long()
    eye = torch.eye(n, dtype=H.dtype)[idx]
    torch.testing.assert_close(H[idx] @ H.T, eye, rtol=0, atol=1e-12)
    assert ((H[idx].abs() - 1 / math.sqrt(n)).abs() < 1e-15).all()


@pytest.mark.parametrize("n", BASES + [1, 2, 4, 24, 68])
def test_small_orders_orthogonal(n):
    _assert_orthogonal(hadamard_matrix(n))


@pytest.mark.parametrize("n", MAMBA_SIZES)
def test_mamba_sizes_orthogonal_and_fast_apply(n):
    H = hadamard_matrix(n)
    assert H.shape == (n, n) and H.dtype == torch.float64
    _assert_orthogonal(H)
    x = torch.randn(3, 2, n, dtype=torch.float64)
    torch.testing.assert_close(apply_hadamard(x), x @ H, rtol=0, atol=1e-12)


def test_decomposition():
    assert hadamard_decomposition(1536) == (12, 7)
    assert hadamard_decomposition(2560) == (20, 7)
    assert hadamard_decomposition(5120) == (20, 8)
    assert hadamard_decomposition(4096) == (1, 12)
    assert hadamard_decomposition(40) == (20, 1)
    assert hadamard_decomposition(92) is None
    assert not has_hadamard(7) and not has_hadamard(92 * 2) and has_hadamard(92 * 8)  # 92 * 8 = 368 * 2


@pytest.mark.parametrize("n", BASES + [1536])
def test_fast_apply_float32_and_explicit(n):
    x = torch.randn(5, n)
    H = hadamard_matrix(n, dtype=torch.float32)
    y = apply_hadamard(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ H, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_hadamard(x, H), x @ H)
    xh = x.to(torch.bfloat16)
    assert apply_hadamard(xh).dtype == torch.bfloat16


def test_random_hadamard():
    n = 768
    R = random_hadamard_matrix(n, seed=3)
    _assert_orthogonal(R)
    torch.testing.assert_close(R, random_hadamard_matrix(n, seed=3), rtol=0, atol=0)
    assert not torch.equal(R, random_hadamard_matrix(n, seed=4))
    s = (R / hadamard_matrix(n))[0]  # the sign vector
    x = torch.randn(4, n, dtype=torch.float64)
    torch.testing.assert_close(x @ R, apply_hadamard(x) * s)


def test_unsupported_and_fallback():
    with pytest.raises(MqtoolError):
        hadamard_matrix(92)
    with pytest.raises(MqtoolError):
        apply_hadamard(torch.randn(2, 7))
    M, info = orthogonal_transform_matrix(92 * 2)
    assert info.block_size == 8 and info.n_blocks == 23 and not info.is_full
    _assert_orthogonal_generic(M)
    M, info = orthogonal_transform_matrix(1536)
    assert info.is_full
    torch.testing.assert_close(M, hadamard_matrix(1536), rtol=0, atol=0)
    M, info = orthogonal_transform_matrix(92, kind="random_hadamard", seed=1)
    assert info.block_size == 4 and info.n_blocks == 23 and info.seed == 1
    _assert_orthogonal_generic(M)
    M, info = orthogonal_transform_matrix(7)
    assert info.block_size == 1
    M, info = orthogonal_transform_matrix(50, kind="random_orthogonal", seed=2)
    _assert_orthogonal_generic(M)
    with pytest.raises(MqtoolError):
        orthogonal_transform_matrix(8, kind="nope")


def _assert_orthogonal_generic(M: torch.Tensor) -> None:
    torch.testing.assert_close(M @ M.T, torch.eye(M.shape[0], dtype=M.dtype), rtol=0, atol=1e-12)
