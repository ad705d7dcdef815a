import pytest
import torch

from mqtool.errors import MqtoolError
from mqtool.quant.gptq import accumulate_hessian, gptq_quantize
from mqtool.quant.quantizers import dequantize_weight, quantize_weight


def _layer(k: int = 128, out: int = 64, n: int = 2048, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Strongly correlated inputs (rank 32 plus noise) with uneven channel scales, like real activations.
    low_rank = torch.randn(n, 32, generator=g) @ torch.randn(32, k, generator=g)
    x = low_rank + 0.1 * torch.randn(n, k, generator=g)
    x = x * torch.logspace(-0.5, 0.5, k)
    w = torch.randn(out, k, generator=g)
    return w, x


def _hessian(x: torch.Tensor, chunks: int = 4):
    H, n = None, 0
    for part in x.chunk(chunks):
        H, n = accumulate_hessian(H, part, n)
    return H, n


def test_accumulate_hessian_streams():
    _, x = _layer(k=32, n=300)
    H, n = _hessian(x.reshape(3, 100, 32), chunks=3)
    assert n == 300
    torch.testing.assert_close(H, 2 / 300 * x.T @ x, rtol=1e-5, atol=1e-5)


def _err(w, wq, x):
    return (x @ w.T - x @ wq.T).norm().item()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(bits, group_size, act_order):
    w, x = _layer()
    H, _ = _hessian(x)
    q, scale = gptq_quantize(w, H, bits, group_size=group_size, block_size=48, act_order=act_order)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.abs().max()) <= qmax
    assert scale.dtype == torch.float32
    assert scale.shape == ((64, 1) if group_size is None else (64, 128 // group_size))
    e_gptq = _err(w, dequantize_weight(q, scale, group_size), x)
    e_rtn = _err(w, dequantize_weight(*quantize_weight(w, bits, group_size), group_size), x)
    assert e_gptq < 0.8 * e_rtn, f"GPTQ {e_gptq:.4f} vs RTN {e_rtn:.4f}"


def test_dead_columns_and_inputs_untouched():
    w, x = _layer(k=64, out=16, n=512)
    x[:, [3, 10]] = 0
    H, _ = _hessian(x)
    H0, w0 = H.clone(), w.clone()
    q, scale = gptq_quantize(w, H, 4, group_size=16)
    assert (q[:, [3, 10]] == 0).all()
    assert torch.equal(H, H0) and torch.equal(w, w0)
    assert torch.isfinite(scale).all()


def test_bad_shapes():
    w = torch.randn(8, 16)
    with pytest.raises(MqtoolError):
        gptq_quantize(w, torch.eye(8), 8)
    with pytest.raises(MqtoolError):
        gptq_quantize(w, torch.eye(16), 8, group_size=5)
    with pytest.raises(MqtoolError):
        accumulate_hessian(torch.zeros(4, 4), torch.randn(3, 5), 0)
