"""state_update: the Mamba-2 step on a DSQ-quantized state, Triton kernel (interpreted on CPU)
against its PyTorch reference, and the reference against mqtool's model step and state quantizer.

``exp`` and the reductions (``h · C``, the mean over the state dim) are not bit-identical between
Triton and PyTorch, so y and the scales agree to fp32 rounding and a code may differ by one where
``h / step`` lies within an ulp of a half-integer; the tests count such codes and allow a few.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # set before mqtool.kernels is imported (see test_kernels_act_quant)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mqtool.kernels import INTERPRET, state_update, state_update_ref  # noqa: E402
from mqtool.kernels._common import interpreter_problem  # noqa: E402
from mqtool.kernels.state_update import CHANNEL_STATS, METHODS, _dsq_ref, state_update_triton  # noqa: E402
from mqtool.models.scan import mamba2_step  # noqa: E402
from mqtool.quant.states import StateQuantizer, dequantize_state_int, quantize_state, quantize_state_int  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("mqtool.kernels was imported before TRITON_INTERPRET was set", allow_module_level=True)
if interpreter_problem():
    pytest.skip(interpreter_problem(), allow_module_level=True)


def _inputs(b, nh, p, n, g, seed=0, dtype=torch.float32, d_kind="head"):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    h0 = r(b, nh, p, n) * torch.logspace(-2, 1, p)[:, None]        # channels of varied magnitude
    x = r(b, nh, p).to(dtype)
    dt = torch.rand(b, nh, generator=gen) * 0.9 + 0.05
    A = -torch.rand(nh, generator=gen) * 4 - 0.1
    B_in, C_in = r(b, g, n).to(dtype), r(b, g, n).to(dtype)
    D = {"none": None, "head": r(nh), "channel": r(nh, p)}[d_kind]
    out = [h0, x, dt, A, B_in, C_in, D]
    return [None if t is None else t.to(DEVICE) for t in out]


def _quantized_state(h0, bits, channel_stat="abs.mean.sqrt", method="dsq"):
    return quantize_state_int(h0, bits, method, channel_stat)


def _run_both(h0, x, dt, A, B_in, C_in, D, bits, channel_stat="abs.mean.sqrt", method="dsq"):
    q, sc, ss = _quantized_state(h0, bits, channel_stat, method)
    kern = [q.clone(), sc.clone(), ss.clone()]
    ref = [q.clone(), sc.clone(), ss.clone()]
    y = state_update_triton(kern[0], x, dt, A, B_in, C_in, D, kern[1], kern[2], bits, channel_stat, method)
    yr = state_update_ref(ref[0], x, dt, A, B_in, C_in, D, ref[1], ref[2], bits, channel_stat, method)
    return y, yr, kern, ref


def _compare(y, yr, kern, ref, max_code_mismatch_frac=2e-3, sc_rtol=4e-7):
    """y and scales to fp32 rounding; codes exact except rare off-by-one near-ties. Returns the
    number of differing codes."""
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5 * yr.abs().max().item())
    torch.testing.assert_close(kern[1], ref[1], rtol=sc_rtol, atol=0)   # scale_channel: <= a few ulps
    torch.testing.assert_close(kern[2], ref[2], rtol=4e-6, atol=0)   # scale_state: a max of ratios
    diff = (kern[0].int() - ref[0].int()).abs()
    n_bad = int((diff != 0).sum())
    assert int(diff.max()) <= 1, f"a code differs by {int(diff.max())}"
    assert n_bad <= max(2, max_code_mismatch_frac * diff.numel()), f"{n_bad} of {diff.numel()} codes differ"
    return n_bad


# ------------------------------------------------------------------------------ the reference


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("channel_stat", CHANNEL_STATS)
def test_reference_is_mamba2_step_then_dsq(bits, channel_stat):
    h0, x, dt, A, B_in, C_in, D = (t.cpu() for t in _inputs(2, 4, 16, 32, 2, d_kind="channel"))
    q, sc, ss = _quantized_state(h0, bits, channel_stat)
    y_m, h_m = mamba2_step(dequantize_state_int(q, sc, ss), x, dt, A, B_in, C_in, D)
    state = [q.clone(), sc.clone(), ss.clone()]
    y = state_update_ref(state[0], x, dt, A, B_in, C_in, D, state[1], state[2], bits, channel_stat)
    torch.testing.assert_close(y, y_m, rtol=1e-5, atol=1e-5)
    # the re-quantization is DSQ bit for bit, given the same h
    h = dequantize_state_int(q, sc, ss) * torch.exp(dt * A)[..., None, None] \
        + (dt[..., None] * x)[..., None] * B_in.repeat_interleave(2, dim=1)[:, :, None, :]
    want = quantize_state_int(h, bits, "dsq", channel_stat)
    for got, exp in zip(_dsq_ref(h, bits, channel_stat), want, strict=True):
        assert torch.equal(got, exp)
    step = (state[1] * state[2]).max().item()  # the new quantization step: error <= step / 2
    torch.testing.assert_close(dequantize_state_int(*state), h_m, rtol=0, atol=0.5 * step * (1 + 1e-5))


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("method", METHODS)
def test_reference_quantizer_is_quant_states(method, bits):
    """Every method's scales and codes are mqtool.quant.states' own, bit for bit."""
    h = _inputs(2, 3, 16, 32, 1, seed=11)[0].cpu()
    h[0, 1] = 0.0                                       # an all-zero state takes the EPS floor
    for got, want in zip(_dsq_ref(h, bits, "abs.mean.sqrt", method), quantize_state_int(h, bits, method),
                         strict=True):
        assert got.shape == want.shape and torch.equal(got, want)


def test_reference_fp32_state_is_mamba2_step():
    h0, x, dt, A, B_in, C_in, D = (t.cpu() for t in _inputs(2, 4, 8, 16, 1))
    y_m, h_m = mamba2_step(h0, x, dt, A, B_in, C_in, D)
    state = h0.clone()
    y = state_update_ref(state, x, dt, A, B_in, C_in, D)
    torch.testing.assert_close(y, y_m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, h_m, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ kernel vs reference

# (B, H, P, N, G): P=16, N=32 with 1 and 2 groups, more groups, and a tile that is not a power of 2
SHAPES = [(2, 4, 16, 32, 1), (2, 4, 16, 32, 2), (1, 4, 16, 32, 4), (3, 3, 12, 20, 1)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("b,nh,p,n,g", SHAPES)
def test_quantized_step_matches_reference(b, nh, p, n, g, bits):
    y, yr, kern, ref = _run_both(*_inputs(b, nh, p, n, g, seed=b * 7 + g), bits=bits)
    _compare(y, yr, kern, ref)


@pytest.mark.parametrize("channel_stat", CHANNEL_STATS)
@pytest.mark.parametrize("d_kind", ["none", "head", "channel"])
def test_channel_statistics_and_D(channel_stat, d_kind):
    y, yr, kern, ref = _run_both(*_inputs(2, 4, 16, 32, 2, seed=5, d_kind=d_kind), bits=8, channel_stat=channel_stat)
    _compare(y, yr, kern, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    y, yr, kern, ref = _run_both(*_inputs(2, 4, 16, 32, 2, seed=6, dtype=dtype), bits=8)
    _compare(y, yr, kern, ref)


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("method", METHODS[1:])
def test_single_scale_methods_match_reference(method, bits):
    y, yr, kern, ref = _run_both(*_inputs(2, 4, 16, 32, 2, seed=8), bits=bits, method=method)
    _compare(y, yr, kern, ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quant_state_is_the_dequantized_codes(method, bits):
    """fake_quant keeps Q(h_t) in fp32: the kernel's equals the reference's and quant.states' own
    fake quantization of the new state (up to the rare off-by-one code of a near-tie)."""
    h0, x, dt, A, B_in, C_in, D = _inputs(2, 4, 16, 32, 2, seed=12)
    h0 = quantize_state(h0, bits, method)               # a cache only ever holds quantized states
    s_k, s_r = h0.clone(), h0.clone()
    y = state_update_triton(s_k, x, dt, A, B_in, C_in, D, bits=bits, method=method, fake_quant=True)
    yr = state_update_ref(s_r, x, dt, A, B_in, C_in, D, bits=bits, method=method, fake_quant=True)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5 * yr.abs().max().item())
    _, h = mamba2_step(h0.cpu(), x.cpu(), dt.cpu(), A.cpu(), B_in.cpu(), C_in.cpu(), None if D is None else D.cpu())
    want = quantize_state(h, bits, method)
    torch.testing.assert_close(s_r.cpu(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    step = (want - h).abs().max().item() * 2 + 1e-12    # one code step is at most twice the worst error
    off = (s_k - s_r).abs()
    assert off.max().item() <= step * 1.001
    assert int((off > 1e-6 * want.abs().max().item()).sum()) <= max(2, 2e-3 * off.numel())
    assert not torch.equal(s_r.cpu(), h), "the state was not quantized"


def test_model_step_uses_the_fused_kernel_and_agrees(monkeypatch):
    """A Mamba-2 model with a state quantizer runs its recurrent step through the kernel
    (fake-quantized fp32 cache) and gives the unfused step-then-quantize logits."""
    from mqtool.models import MambaConfig, MambaLMHeadModel

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=96, ssm_cfg={"layer": "Mamba2", "d_state": 32, "headdim": 16})
    model = MambaLMHeadModel(cfg).to(DEVICE).eval()
    for m in model.mixers:
        m.state_quantizer = StateQuantizer(4, "dsq")
    tokens = torch.randint(0, 96, (3, 12), device=DEVICE)
    calls = []
    real = StateQuantizer.mamba2_step

    def counting(self, *args):
        out = real(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(StateQuantizer, "mamba2_step", counting)
    with torch.inference_mode():
        monkeypatch.setenv("MQTOOL_FUSED_STATE", "1")   # on CPU too (interpreted); on CUDA it is the default
        fused = model(tokens, mode="recurrent")
        assert calls and all(calls), "the fused kernel was not used"
        monkeypatch.setenv("MQTOOL_FUSED_STATE", "0")
        calls.clear()
        unfused = model(tokens, mode="recurrent")
        assert calls and not any(calls)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4 * unfused.abs().max().item())


@pytest.mark.parametrize("b,nh,p,n,g", SHAPES[1:])
def test_fp32_state_matches_reference(b, nh, p, n, g):
    h0, x, dt, A, B_in, C_in, D = _inputs(b, nh, p, n, g, seed=9)
    s_k, s_r = h0.clone(), h0.clone()
    y = state_update_triton(s_k, x, dt, A, B_in, C_in, D)
    yr = state_update_ref(s_r, x, dt, A, B_in, C_in, D)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_k, s_r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_sequence_of_steps_from_an_empty_cache(bits):
    """Generation from a zero state: at each step both start from the reference's state, so the
    states are the realistic ones of a running recurrence (decayed, partly filled)."""
    b, nh, p, n, g = 2, 4, 16, 32, 2
    ref = [torch.zeros(b, nh, p, n, dtype=torch.int8, device=DEVICE),
           torch.ones(b, nh, p, 1, device=DEVICE), torch.ones(b, nh, 1, n, device=DEVICE)]
    for t in range(4):
        _, x, dt, A, B_in, C_in, D = _inputs(b, nh, p, n, g, seed=100 + t)
        kern = [s.clone() for s in ref]
        y = state_update(kern[0], x, dt, A, B_in, C_in, D, kern[1], kern[2], bits)
        yr = state_update_ref(ref[0], x, dt, A, B_in, C_in, D, ref[1], ref[2], bits)
        _compare(y, yr, kern, ref)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("b,nh,p,n,g", SHAPES)
def test_packed_state_matches_the_int8_reference(b, nh, p, n, g, method, bits):
    """Packed int4 codes (two a byte along N) give the kernel the same step as int8 codes: y,
    scales and the unpacked codes agree with the reference, whose packed result is the int8
    result packed."""
    from mqtool.packing import pack_int4, unpack_int4

    h0, x, dt, A, B_in, C_in, D = _inputs(b, nh, p, n, g, seed=b * 3 + n)
    q, sc, ss = _quantized_state(h0, bits, method=method)
    packed = [pack_int4(q), sc.clone(), ss.clone()]
    ref8 = [q.clone(), sc.clone(), ss.clone()]
    ref_packed = [pack_int4(q), sc.clone(), ss.clone()]
    y = state_update_triton(packed[0], x, dt, A, B_in, C_in, D, packed[1], packed[2], bits, method=method)
    yr = state_update_ref(ref8[0], x, dt, A, B_in, C_in, D, ref8[1], ref8[2], bits, method=method)
    yp = state_update_ref(ref_packed[0], x, dt, A, B_in, C_in, D, ref_packed[1], ref_packed[2], bits, method=method)
    assert packed[0].dtype == torch.uint8 and packed[0].shape[-1] == n // 2
    assert torch.equal(yp, yr) and torch.equal(ref_packed[0], pack_int4(ref8[0]))
    _compare(y, yr, [unpack_int4(packed[0]), packed[1], packed[2]], ref8)


@pytest.mark.parametrize("storage", ["float", "int8", "packed"])
def test_fused_step_size_is_softplus_of_dt_plus_bias(storage):
    """dt_bias + softplus + dt_limit inside the kernel equal the reference given the final step size."""
    from mqtool.packing import pack_int4

    b, nh, p, n, g = 2, 4, 16, 32, 2
    h0, x, _, A, B_in, C_in, D = _inputs(b, nh, p, n, g, seed=21)
    gen = torch.Generator().manual_seed(3)
    dt_raw = (torch.randn(b, nh, generator=gen) * 3).to(DEVICE)
    dt_raw[0, 0] = 25.0                                         # beyond softplus' threshold: dt itself
    bias = (torch.randn(nh, generator=gen) - 2).to(DEVICE)
    limit = (0.01, 2.0)
    delta = torch.nn.functional.softplus(dt_raw + bias).clamp(*limit)
    if storage == "float":
        s_k, s_r, args = h0.clone(), h0.clone(), {}
    else:
        q, sc, ss = _quantized_state(h0, 4)
        q = pack_int4(q) if storage == "packed" else q
        s_k, s_r = q.clone(), q.clone()
        args_k, args_r = (sc.clone(), ss.clone()), (sc.clone(), ss.clone())
    if storage == "float":
        y = state_update_triton(s_k, x, dt_raw, A, B_in, C_in, D, dt_bias=bias, dt_softplus=True, dt_limit=limit)
        yr = state_update_ref(s_r, x, delta, A, B_in, C_in, D, **args)
        torch.testing.assert_close(s_k, s_r, rtol=1e-5, atol=1e-5)
    else:
        y = state_update_triton(s_k, x, dt_raw, A, B_in, C_in, D, *args_k, 4, dt_bias=bias, dt_softplus=True,
                                dt_limit=limit)
        yr = state_update_ref(s_r, x, delta, A, B_in, C_in, D, *args_r, 4)
        torch.testing.assert_close(args_k[0], args_r[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5 * yr.abs().max().item())
    # and the reference fuses it the same way
    s_f = s_r.clone() if storage == "float" else None
    if s_f is not None:
        s_f.copy_(h0)
        yf = state_update_ref(s_f, x, dt_raw, A, B_in, C_in, D, dt_bias=bias, dt_softplus=True, dt_limit=limit)
        s_r.copy_(h0)
        yr = state_update_ref(s_r, x, delta, A, B_in, C_in, D)
        torch.testing.assert_close(yf, yr, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("storage", ["int8", "packed", "fake", "float"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("b,nh,p,n,g", [(2, 4, 16, 32, 2), (3, 3, 12, 20, 1)])
def test_row_blocks_give_the_one_block_result(b, nh, p, n, g, method, storage):
    """The kernel takes the state in blocks of rows (one program a head walking them twice, or one
    program a block in three launches): blocks of 4 rows (and a partial last block where P = 12 is
    taken by 8) give the whole-tile reference's step."""
    from mqtool.packing import pack_int4, unpack_int4

    bits = 4
    h0, x, dt, A, B_in, C_in, D = _inputs(b, nh, p, n, g, seed=p + n)
    for block_p in (4, 8):
        if storage == "float" or storage == "fake":
            s0 = quantize_state(h0, bits, method) if storage == "fake" else h0
            s_k, s_r = s0.clone(), s0.clone()
            fake = storage == "fake"
            y = state_update_triton(s_k, x, dt, A, B_in, C_in, D, bits=bits, method=method, fake_quant=fake,
                                    block_p=block_p)
            yr = state_update_ref(s_r, x, dt, A, B_in, C_in, D, bits=bits, method=method, fake_quant=fake)
            torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5 * yr.abs().max().item())
            tol = 1e-6 * s_r.abs().max().item()
            assert int(((s_k - s_r).abs() > tol).sum()) <= max(2, 2e-3 * s_r.numel())
            continue
        q, sc, ss = _quantized_state(h0, bits, method=method)
        wrap = pack_int4 if storage == "packed" else torch.clone
        ref = [q.clone(), sc.clone(), ss.clone()]
        yr = state_update_ref(ref[0], x, dt, A, B_in, C_in, D, ref[1], ref[2], bits, method=method)
        for split in (False, True):  # one program a head walking its rows, or one a row block
            kern = [wrap(q), sc.clone(), ss.clone()]
            y = state_update_triton(kern[0], x, dt, A, B_in, C_in, D, kern[1], kern[2], bits, method=method,
                                    block_p=block_p, split=split)
            codes = unpack_int4(kern[0]) if storage == "packed" else kern[0]
            _compare(y, yr, [codes, kern[1], kern[2]], ref)


@pytest.mark.parametrize("method", METHODS)
def test_reciprocal_division_agrees_to_rounding(method):
    """exact_div=False (reciprocals, one division a row and a column) gives the reference's step up
    to the rare off-by-one code of a near-tie."""
    from mqtool.packing import pack_int4, unpack_int4

    h0, x, dt, A, B_in, C_in, D = _inputs(2, 4, 16, 32, 2, seed=31)
    q, sc, ss = _quantized_state(h0, 4, method=method)
    kern, ref = [pack_int4(q), sc.clone(), ss.clone()], [q.clone(), sc.clone(), ss.clone()]
    y = state_update_triton(kern[0], x, dt, A, B_in, C_in, D, kern[1], kern[2], 4, method=method, exact_div=False,
                            block_p=8)
    yr = state_update_ref(ref[0], x, dt, A, B_in, C_in, D, ref[1], ref[2], 4, method=method)
    _compare(y, yr, [unpack_int4(kern[0]), kern[1], kern[2]], ref, sc_rtol=2e-6)


def test_bad_arguments_are_refused():
    h0, x, dt, A, B_in, C_in, D = _inputs(1, 4, 16, 32, 1)
    q, sc, ss = _quantized_state(h0, 8)
    with pytest.raises(AssertionError):
        state_update_triton(q, x, dt, A, B_in, C_in, D)                       # int8 state without scales
    with pytest.raises(AssertionError):
        state_update_triton(q, x, dt, A, B_in, C_in, D, ss.transpose(-1, -2), sc.transpose(-1, -2))
    with pytest.raises(AssertionError):
        state_update_triton(h0, x, dt, A, B_in[:, :, :16], C_in[:, :, :16], D)
    with pytest.raises(AssertionError):
        state_update_triton(h0.transpose(-1, -2).contiguous().transpose(-1, -2), x, dt, A, B_in, C_in, D)


# ------------------------------------------------------------------------------ GPU, model-sized


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("b,nh,p,n,g", [(1, 80, 64, 128, 1), (16, 80, 64, 128, 1), (4, 48, 64, 128, 8)])
def test_gpu_model_sized(b, nh, p, n, g, bits):
    y, yr, kern, ref = _run_both(*_inputs(b, nh, p, n, g, seed=1), bits=bits)
    _compare(y, yr, kern, ref)
    if bits == 4:  # and the packed form of the same step
        from mqtool.packing import pack_int4, unpack_int4

        h0, x, dt, A, B_in, C_in, D = _inputs(b, nh, p, n, g, seed=1)
        q, sc, ss = _quantized_state(h0, bits)
        packed = [pack_int4(q), sc.clone(), ss.clone()]
        yk = state_update_triton(packed[0], x, dt, A, B_in, C_in, D, packed[1], packed[2], bits)
        _compare(yk, yr, [unpack_int4(packed[0]), packed[1], packed[2]], ref)


# ------------------------------------------------------------------------------ Mamba-1


def _mamba1_inputs(b, d, n, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    h0 = r(b, d, n) * torch.logspace(-2, 1, d)[:, None]
    u = r(b, d)
    dt_raw = r(b, d) * 2
    dt_bias = r(d) - 1
    A = -torch.rand(d, n, generator=gen) * 4 - 0.1
    B_in, C_in = r(b, n), r(b, n)
    D = r(d)
    return [t.to(DEVICE) for t in (h0, u, dt_raw, dt_bias, A, B_in, C_in, D)]


@pytest.mark.parametrize("storage", ["int8", "packed"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("b,d,n,block_p", [(2, 24, 16, 8), (3, 40, 8, 16), (1, 33, 16, 32)])
def test_mamba1_kernel_matches_reference_and_the_model_step(b, d, n, block_p, method, storage):
    """The Mamba-1 form of the split kernel (d_inner rows in blocks, dt per row, A per element,
    dt bias + softplus fused) equals its reference, and the reference is scan.mamba1_step followed by
    quant.states' quantizer."""
    from mqtool.kernels.state_update import mamba1_state_update_ref, mamba1_state_update_triton
    from mqtool.models.scan import mamba1_step
    from mqtool.packing import pack_int4, unpack_int4

    bits = 4
    h0, u, dt_raw, dt_bias, A, B_in, C_in, D = _mamba1_inputs(b, d, n, seed=d + n)
    q, sc, ss = quantize_state_int(h0, bits, method, "abs.max")
    wrap = pack_int4 if storage == "packed" else torch.clone
    kern, ref = [wrap(q), sc.clone(), ss.clone()], [q.clone(), sc.clone(), ss.clone()]
    y = mamba1_state_update_triton(kern[0], u, dt_raw, A, B_in, C_in, D, kern[1], kern[2], bits, "abs.max", method,
                                   dt_bias=dt_bias, dt_softplus=True, block_p=block_p)
    yr = mamba1_state_update_ref(ref[0], u, dt_raw, A, B_in, C_in, D, ref[1], ref[2], bits, "abs.max", method,
                                 dt_bias=dt_bias, dt_softplus=True)
    codes = unpack_int4(kern[0]) if storage == "packed" else kern[0]
    # exp(dt * A) is taken per element here (per head in Mamba-2): a state, so its row scale, may
    # differ by a few ulps more
    _compare(y, yr, [codes, kern[1], kern[2]], ref, sc_rtol=2e-6)
    # the reference is the model's step, then the state quantizer's integer form
    delta = torch.nn.functional.softplus(dt_raw + dt_bias)
    y_m, h_m = mamba1_step(dequantize_state_int(q, sc, ss).cpu(), u.cpu(), delta.cpu(), A.cpu(), B_in.cpu(),
                           C_in.cpu(), D.cpu())
    torch.testing.assert_close(yr.cpu(), y_m, rtol=1e-5, atol=1e-5 * y_m.abs().max().item())
    want = quantize_state_int(h_m, bits, method, "abs.max")
    assert int((ref[0].cpu() != want[0]).sum()) <= max(2, 2e-3 * want[0].numel())


def test_mamba1_kernel_refuses_float_states():
    from mqtool.kernels.state_update import mamba1_state_update_triton

    h0, u, dt_raw, dt_bias, A, B_in, C_in, D = _mamba1_inputs(1, 8, 16)
    q, sc, ss = quantize_state_int(h0, 8, "dsq")
    with pytest.raises(AssertionError):
        mamba1_state_update_triton(h0, u, dt_raw, A, B_in, C_in, D, sc, ss)
    with pytest.raises(AssertionError):
        mamba1_state_update_triton(q, u, dt_raw, A[:, :8], B_in, C_in, D, sc, ss)
