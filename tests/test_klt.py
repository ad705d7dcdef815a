import pytest
import torch

from mqtool.errors import MqtoolError
from mqtool.quant.hadamard import hadamard_matrix
from mqtool.quant.klt import covariance_from_moments, klt_rotation


def _activations(n: int = 64, samples: int = 20000, seed: int = 0) -> torch.Tensor:
    """Correlated channels with very unequal variances, plus a non-zero mean; seed draws samples."""
    loadings = torch.randn(4, n, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(samples, 4, generator=g, dtype=torch.float64)
    loadings[:, :3] *= 30.0  # outlier channels that move together
    noise = torch.randn(samples, n, generator=g, dtype=torch.float64) * torch.logspace(-1, 0.5, n)
    mean = torch.linspace(-3, 5, n, dtype=torch.float64)
    return latent @ loadings + noise + mean


def _ratio(y: torch.Tensor) -> float:
    v = y.var(dim=0)
    return (v.max() / v.min()).item()


def test_covariance_from_moments():
    x = _activations(n=16, samples=500)
    C = covariance_from_moments(x.T @ x, x.sum(0), x.shape[0])
    torch.testing.assert_close(C, torch.cov(x.T))
    with pytest.raises(MqtoolError):
        covariance_from_moments(x.T @ x, x.sum(0), 1)


def test_klt_equalises_channel_variances():
    x = _activations()
    C = covariance_from_moments(x.T @ x, x.sum(0), x.shape[0])
    H = hadamard_matrix(64)
    HK = klt_rotation(C, H)
    torch.testing.assert_close(HK @ HK.T, torch.eye(64, dtype=torch.float64))

    r_orig, r_had, r_klt = _ratio(x), _ratio(x @ H), _ratio(x @ HK)
    msg = f"max/min channel variance: original {r_orig:.1f}, Hadamard {r_had:.2f}, KLT+Hadamard {r_klt:.4f}"
    assert r_klt < 1.02, msg
    assert r_had > 3.0, msg

    # Held-out samples from the same distribution: equal within sampling noise.
    r_fresh = _ratio(_activations(seed=1) @ HK)
    assert r_fresh < 1.15, f"fresh samples after KLT+Hadamard: {r_fresh:.3f}"


def test_rotated_covariance_is_hadamard_of_spectrum():
    x = _activations(n=12, samples=3000)
    C = torch.cov(x.T)
    H = hadamard_matrix(12)
    HK = klt_rotation(C)  # default Hadamard of order 12 (Paley)
    lam = torch.linalg.eigvalsh(C).flip(0)  # klt_rotation orders eigenvalues descending
    torch.testing.assert_close(HK.T @ C @ HK, H.T @ torch.diag(lam) @ H)
    equal = torch.full((12,), C.trace().item() / 12, dtype=torch.float64)
    torch.testing.assert_close(torch.diagonal(HK.T @ C @ HK), equal)


def test_mean_argument_centres_raw_moment():
    x = _activations(n=20, samples=2000)
    n = x.shape[0]
    second_moment = x.T @ x / n
    mu = x.mean(0)
    centred = second_moment - torch.outer(mu, mu)
    torch.testing.assert_close(klt_rotation(second_moment, mean=mu), klt_rotation(centred))


def test_bad_inputs():
    with pytest.raises(MqtoolError):
        klt_rotation(torch.eye(4), hadamard=torch.eye(8))
    with pytest.raises(MqtoolError):
        klt_rotation(torch.zeros(3, 4))
    with pytest.raises(MqtoolError):
        klt_rotation(torch.eye(4), mean=torch.zeros(5))
