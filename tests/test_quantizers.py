import pytest
import torch

from mqtool.errors import MqtoolError
from mqtool.quant.quantizers import (
    SCALE_MIN,
    ActQuantizer,
    dequantize_weight,
    fake_quantize_per_tensor,
    fake_quantize_per_token,
    fake_quantize_weight,
    qmax_for,
    quantize_per_tensor,
    quantize_per_token,
    quantize_weight,
    round_ste,
    static_scale_from_absmax,
)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 32])
def test_weight_roundtrip_format(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    q, scale = quantize_weight(w, bits, group_size)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.min()) >= -qmax and int(q.max()) <= qmax
    assert scale.dtype == torch.float32
    assert scale.shape == ((16, 1) if group_size is None else (16, 128 // group_size))
    # Each row/group's absmax hits qmax exactly (scale = absmax / qmax).
    assert (q.abs().reshape(16, scale.shape[1], -1).amax(-1) == qmax).all()
    wq = dequantize_weight(q, scale, group_size)
    s_full = scale.repeat_interleave(128 // scale.shape[1], dim=1)
    assert ((wq - w).abs() <= s_full / 2 + 1e-7).all()
    torch.testing.assert_close(fake_quantize_weight(w, bits, group_size), wq, rtol=0, atol=0)


def test_scale_rule_exact_and_zero_rows():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.54, 0.3, 0.0]])
    q, scale = quantize_weight(w, 8)
    assert scale[0, 0].item() == pytest.approx(SCALE_MIN)
    assert (q[0] == 0).all()
    assert scale[1, 0] == torch.tensor(2.54, dtype=torch.float32) / 127
    assert q[1].tolist() == torch.round(w[1] / scale[1, 0]).to(torch.int8).tolist()
    assert q[1, 1] == -127


def test_fake_quant_keeps_dtype():
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    assert fake_quantize_weight(w, 4, 16).dtype == torch.bfloat16
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    assert fake_quantize_per_token(x).dtype == torch.float16


def test_bad_arguments():
    with pytest.raises(MqtoolError):
        quantize_weight(torch.randn(4, 10), 4, group_size=4)
    with pytest.raises(MqtoolError):
        qmax_for(16)
    with pytest.raises(MqtoolError):
        quantize_weight(torch.randn(4), 8)
    q, s = quantize_weight(torch.randn(4, 8), 8)
    with pytest.raises(MqtoolError):
        dequantize_weight(q, s, group_size=4)
    with pytest.raises(MqtoolError):
        ActQuantizer(mode="per_channel")


def test_per_token():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * torch.logspace(-2, 2, 5).view(1, 5, 1)
    q, scale = quantize_per_token(x)
    assert q.shape == x.shape and q.dtype == torch.int8 and scale.shape == (2, 5, 1)
    assert (q.abs().amax(-1) == 127).all()
    fx = fake_quantize_per_token(x)
    torch.testing.assert_close(fx, q.float() * scale, rtol=0, atol=0)
    assert ((fx - x).abs() <= scale / 2 + 1e-7).all()


def test_per_tensor_static_saturates():
    x = torch.linspace(-4, 4, 81)
    scale = static_scale_from_absmax(torch.tensor(2.0), bits=8)
    assert scale.shape == () and scale.dtype == torch.float32
    q = quantize_per_tensor(x, scale)
    assert int(q.max()) == 127 and int(q.min()) == -127
    fx = fake_quantize_per_tensor(x, scale)
    assert fx.max().item() == pytest.approx(2.0)
    inside = x.abs() <= 2
    assert ((fx - x)[inside].abs() <= scale / 2 + 1e-7).all()
    torch.testing.assert_close(fx, q.float() * scale, rtol=0, atol=0)


def test_ste_gradients_flow():
    x = torch.tensor([0.2, 1.7, -2.6], requires_grad=True)
    round_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]

    w = torch.randn(4, 32, requires_grad=True)
    fake_quantize_weight(w, 4, 8, ste=True).pow(2).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    w2 = w.detach().clone().requires_grad_(True)
    fake_quantize_weight(w2, 4, 8).pow(2).sum().backward()
    # Without STE only each group's absmax element (through the scale) gets a gradient.
    assert ((w2.grad != 0).reshape(4, 4, 8).sum(-1) <= 1).all()
    assert (w.grad != 0).sum() > (w2.grad != 0).sum()

    a = torch.randn(3, 16, requires_grad=True)
    out = fake_quantize_per_tensor(a, 0.01, 8, ste=True)
    out.sum().backward()
    inside = (a.detach() / 0.01).abs() <= 127
    assert (a.grad[inside] == 1).all() and (a.grad[~inside] == 0).all()  # clamp blocks saturated values

    b = torch.randn(3, 16, requires_grad=True)
    fake_quantize_per_token(b, 8, ste=True).pow(2).sum().backward()
    assert b.grad.abs().sum() > 0


def test_act_quantizer_module():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32)
    m = ActQuantizer()
    torch.testing.assert_close(m(x), fake_quantize_per_token(x), rtol=0, atol=0)
    assert "mode=per_token" in repr(m)

    t = ActQuantizer(bits=8, mode="per_tensor")
    with pytest.raises(MqtoolError):
        t(x)
    t.set_scale(static_scale_from_absmax(x.abs().max(), 8))
    torch.testing.assert_close(t(x), fake_quantize_per_tensor(x, t.scale, 8), rtol=0, atol=0)
    assert "scale=" in repr(t) and "scale" in t.state_dict()

    t2 = ActQuantizer(bits=4, mode="per_tensor", scale=0.5)
    assert t2.scale.item() == 0.5
    with pytest.raises(MqtoolError):
        ActQuantizer(mode="per_token", scale=1.0)
