"""Tests for Q-Mamba state-cache quantization (DSQ + baselines) and ESR's one-step quantization."""

from __future__ import annotations

import pytest
import torch

from mqtool.errors import MqtoolError
from mqtool.quant.states import (
    CHANNEL_SCALES,
    METHODS,
    StateQuantizer,
    dequantize_state_int,
    qmax_for,
    quantize_one_step,
    quantize_state,
    quantize_state_int,
    state_scales,
)

QBITS = (2, 3, 4, 5, 6, 7, 8)


def synthetic_states(seed: int = 0, batch: int = 4, heads: int = 8, p: int = 64, n: int = 16) -> torch.Tensor:
    """State-like h[b, H, P, N]: magnitudes roughly an outer product of channel and state factors
    (h accumulates x_i * B_j), log-normal spread, plus a few heavy rows and one heavy column per head."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, heads, p, n, generator=g)
    row = torch.exp(0.5 * torch.randn(batch, heads, p, 1, generator=g))
    col = torch.exp(0.5 * torch.randn(batch, heads, 1, n, generator=g))
    row.scatter_(-2, torch.randint(0, p, (batch, heads, 2, 1), generator=g), 20.0)
    col.scatter_(-1, torch.randint(0, n, (batch, heads, 1, 1), generator=g), 20.0)
    return base * row * col


def rel_err(h: torch.Tensor, bits: int, method: str, channel_scale: str = "abs.mean.sqrt") -> float:
    return ((quantize_state(h, bits, method, channel_scale) - h).norm() / h.norm()).item()


@pytest.mark.parametrize("bits", QBITS)
@pytest.mark.parametrize("method", METHODS)
def test_integer_codes_in_range_and_full(bits: int, method: str) -> None:
    h = synthetic_states(seed=bits)
    q, sc, ss = quantize_state_int(h, bits, method)
    qmax = qmax_for(bits)
    assert q.dtype == torch.int8
    assert sc.shape == (*h.shape[:-1], 1) and ss.shape == (*h.shape[:-2], 1, h.shape[-1])
    assert int(q.abs().max()) == qmax  # min-max scales use the whole range ...
    assert int(q.min()) >= -qmax  # ... symmetric, never -qmax-1


@pytest.mark.parametrize("method", METHODS)
def test_missing_factor_is_ones(method: str) -> None:
    sc, ss = state_scales(synthetic_states(), 4, method)
    if method in ("per-tensor", "per-channel"):
        assert torch.equal(ss, torch.ones_like(ss))
    if method == "per-state":
        assert torch.equal(sc, torch.ones_like(sc))
    if method == "per-tensor":  # one value per (sample, head)
        assert torch.equal(sc, sc[..., :1, :].expand_as(sc))


@pytest.mark.parametrize("bits", QBITS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_equals_int_roundtrip_exactly(bits: int, method: str, dtype: torch.dtype) -> None:
    h = synthetic_states(seed=1).to(dtype)
    for cs in CHANNEL_SCALES if method == "dsq" else ("abs.mean.sqrt",):
        fake = quantize_state(h, bits, method, cs)
        assert fake.dtype == dtype
        assert torch.equal(fake, dequantize_state_int(*quantize_state_int(h, bits, method, cs), dtype=dtype))
        # The straight-through forward must not change a single value either.
        ste = quantize_state(h.clone().requires_grad_(), bits, method, cs, ste=True)
        assert torch.equal(fake, ste.detach())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("channel_scale", CHANNEL_SCALES)
def test_zero_state_and_zero_rows_columns_give_exact_zeros(method: str, channel_scale: str) -> None:
    zero = torch.zeros(2, 3, 8, 4)
    out = quantize_state(zero, 4, method, channel_scale)
    assert torch.equal(out, zero)
    h = synthetic_states(batch=1, heads=2, p=8, n=4)
    h[..., 2, :] = 0.0  # an all-zero channel
    h[..., :, 1] = 0.0  # an all-zero state column
    h[:, 1] = 0.0  # an all-zero head
    out = quantize_state(h, 4, method, channel_scale)
    assert torch.isfinite(out).all()
    assert (out[h == 0] == 0).all()


def test_dsq_beats_baselines_at_4_bits() -> None:
    h = synthetic_states()
    errs = {m: rel_err(h, 4, m) for m in METHODS}
    msg = ", ".join(f"{m}={e:.4f}" for m, e in errs.items())
    assert errs["dsq"] < errs["per-channel"], f"4-bit relative error: {msg}"
    assert errs["dsq"] < errs["per-tensor"], f"4-bit relative error: {msg}"
    assert errs["dsq"] < errs["per-state"], f"4-bit relative error: {msg}"


@pytest.mark.parametrize("method", METHODS)
def test_error_shrinks_with_bits(method: str) -> None:
    h = synthetic_states()
    errs = [rel_err(h, b, method) for b in (2, 4, 6, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.05, f"{method}: {errs}"


@pytest.mark.parametrize("channel_scale", CHANNEL_SCALES)
def test_channel_scale_variants_finite(channel_scale: str) -> None:
    h = synthetic_states(seed=2)
    for bits in (4, 8):
        out = quantize_state(h, bits, "dsq", channel_scale)
        assert torch.isfinite(out).all()
        err = rel_err(h, bits, "dsq", channel_scale)
        assert err < rel_err(h, bits, "per-tensor"), f"{channel_scale} @ {bits} bits: {err:.4f}"


def test_mamba1_state_shape() -> None:
    h = synthetic_states(batch=3, heads=1, p=48, n=16)[:, 0]  # h[batch, d_inner, N]
    for method in METHODS:
        out = quantize_state(h, 4, method)
        assert out.shape == h.shape and torch.isfinite(out).all()
    # Scales are per sample: scaling one sample leaves the others untouched.
    h2 = h.clone()
    h2[0] *= 100
    assert torch.equal(quantize_state(h2, 4, "dsq")[1:], quantize_state(h, 4, "dsq")[1:])


def test_16_bits_is_identity() -> None:
    h = synthetic_states()
    for method in METHODS:
        assert torch.equal(quantize_state(h, 16, method), h)
        assert torch.equal(StateQuantizer(16, method)(h), h)


def test_ste_gradient_is_identity() -> None:
    h = synthetic_states(batch=2, heads=2).requires_grad_()
    w = torch.randn_like(h)
    for method in METHODS:
        (g,) = torch.autograd.grad((quantize_state(h, 4, method, ste=True) * w).sum(), h)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=0)
    # Without STE the round has zero gradient: only the scale path is left.
    (g,) = torch.autograd.grad((quantize_state(h, 4, "dsq") * w).sum(), h)
    assert not torch.allclose(g, w)


def test_state_quantizer_module_and_dict_roundtrip() -> None:
    sq = StateQuantizer(bits=4, method="dsq", channel_scale="abs.max.sqrt")
    d = sq.to_dict()
    assert d == {"bits": 4, "method": "dsq", "channel_scale": "abs.max.sqrt"}
    back = StateQuantizer.from_dict(d)
    assert back.to_dict() == d
    h = synthetic_states()
    assert torch.equal(back(h), quantize_state(h, 4, "dsq", "abs.max.sqrt"))
    assert "bits=4" in repr(sq) and "dsq" in repr(sq) and "abs.max.sqrt" in repr(sq)
    assert StateQuantizer.from_dict({"bits": 8, "method": "per-channel"}).channel_scale == "abs.mean.sqrt"
    for bad in ({"bits": 4}, {"bits": 4, "method": "dsq", "scale": 1}, {"bits": 5.0, "method": "dsq"}, [4]):
        with pytest.raises(MqtoolError):
            StateQuantizer.from_dict(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 4, "method": "minmax"},
        {"bits": 1, "method": "dsq"},
        {"bits": 9, "method": "dsq"},
        {"bits": True, "method": "dsq"},
        {"bits": 4.0, "method": "dsq"},
        {"bits": 4, "method": "dsq", "channel_scale": "abs.median"},
    ],
)
def test_bad_arguments_raise_mqtool_error(kwargs: dict) -> None:
    h = synthetic_states(batch=1, heads=1)
    with pytest.raises(MqtoolError):
        quantize_state(h, **kwargs)
    with pytest.raises(MqtoolError):
        StateQuantizer(**kwargs)


def test_bad_inputs_raise_mqtool_error() -> None:
    with pytest.raises(MqtoolError):
        quantize_state(torch.ones(5), 4, "dsq")
    with pytest.raises(MqtoolError):
        quantize_state(torch.ones(3, 4, dtype=torch.int32), 4, "dsq")
    with pytest.raises(MqtoolError, match="16-bit"):
        quantize_state_int(torch.ones(3, 4), 16, "dsq")


def _ssm_inputs(shape_h: tuple[int, ...], shape_da: tuple[int, ...], seed: int = 0):
    """Exact states of h_t = dA_t h_{t-1} + dBx_t (the 'parallel scan' output) plus their inputs."""
    g = torch.Generator().manual_seed(seed)
    dA = torch.rand(shape_da, generator=g) * 0.5 + 0.45  # decays in (0.45, 0.95)
    dBx = torch.randn(shape_h, generator=g) * torch.exp(torch.randn(*shape_h[:-1], 1, generator=g))
    h0 = torch.randn(shape_h[:1] + shape_h[2:], generator=g)
    dA_b = dA.reshape(*dA.shape, *([1] * (len(shape_h) - dA.dim())))
    h, states = h0, []
    for t in range(shape_h[1]):
        h = dA_b[:, t] * h + dBx[:, t]
        states.append(h)
    return torch.stack(states, 1), dA, dBx, h0


@pytest.mark.parametrize(
    "shape_h,shape_da",
    [((2, 7, 3, 8, 16), (2, 7, 3)), ((2, 6, 24, 16), (2, 6, 24, 16))],  # Mamba-2 heads, Mamba-1 full dA
)
@pytest.mark.parametrize("with_h0", [False, True])
def test_quantize_one_step_matches_sequential_loop(shape_h, shape_da, with_h0: bool) -> None:
    h_all, dA, dBx, h0 = _ssm_inputs(shape_h, shape_da)
    h0 = h0 if with_h0 else None
    sq = StateQuantizer(4, "dsq")
    out = quantize_one_step(h_all, dA, dBx, sq, h0=h0)
    dA_b = dA.reshape(*dA.shape, *([1] * (h_all.dim() - dA.dim())))
    prev = torch.zeros_like(h_all[:, 0]) if h0 is None else h0
    for t in range(h_all.shape[1]):
        ref = dA_b[:, t] * quantize_state(prev, 4, "dsq") + dBx[:, t]
        torch.testing.assert_close(out[:, t], ref, rtol=1e-5, atol=1e-5)
        prev = h_all[:, t]  # the exact state, not the quantized one: only one step is quantized
    # At 16 bits nothing is quantized and the step reproduces the exact scan.
    if h0 is not None:
        torch.testing.assert_close(quantize_one_step(h_all, dA, dBx, StateQuantizer(16), h0=h0), h_all)


def test_quantize_one_step_gradients_flow() -> None:
    h_all, dA, dBx, h0 = _ssm_inputs((2, 5, 3, 8, 16), (2, 5, 3))
    h_all.requires_grad_()
    dA.requires_grad_()
    dBx.requires_grad_()
    out = quantize_one_step(h_all, dA, dBx, StateQuantizer(4, "dsq"), h0=h0)
    out.square().sum().backward()
    for name, t in (("dA", dA), ("dBx", dBx), ("h_all", h_all)):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
    # STE: the gradient reaching h_{t-1} is dA_t * dL/dh_q[t] (the last state feeds no step).
    expected = dA[:, 1:, :, None, None] * 2 * out[:, 1:].detach()
    torch.testing.assert_close(h_all.grad[:, :-1], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(h_all.grad[:, -1], torch.zeros_like(h_all.grad[:, -1]))


def test_quantize_one_step_bad_shapes() -> None:
    h_all, dA, dBx, h0 = _ssm_inputs((2, 5, 3, 8, 16), (2, 5, 3))
    sq = StateQuantizer(4)
    with pytest.raises(MqtoolError):
        quantize_one_step(h_all, dA, dBx[:, :-1], sq)
    with pytest.raises(MqtoolError):
        quantize_one_step(h_all, dA[:, :, :2], dBx, sq)
    with pytest.raises(MqtoolError):
        quantize_one_step(h_all, dA, dBx, sq, h0=h0[:1])
    with pytest.raises(MqtoolError):
        quantize_one_step(h_all[:, 0, 0], dA[:, 0], dBx[:, 0, 0], sq)
