"""int8_matmul / w4a8_matmul: the Triton GEMM (interpreted on CPU) against its PyTorch reference.

The int32 accumulator must be exact; the scaled output agrees to fp32 rounding (bit for bit under
the interpreter in fp32, where no multiply-add is contracted into an FMA).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # set before mqtool.kernels is imported (see test_kernels_act_quant)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mqtool.kernels import (  # noqa: E402
    INTERPRET,
    int8_matmul,
    int8_matmul_ref,
    unpack_int4_ref,
    w4a8_matmul,
    w4a8_matmul_ref,
)
from mqtool.kernels._common import interpreter_problem  # noqa: E402
from mqtool.kernels.int8_matmul import qmm_triton  # noqa: E402
from mqtool.quant.export import pack_int4, unpack_int4  # noqa: E402
from mqtool.quant.quantizers import dequantize_weight, quantize_per_token, quantize_weight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("mqtool.kernels was imported before TRITON_INTERPRET was set", allow_module_level=True)
if interpreter_problem():
    pytest.skip(interpreter_problem(), allow_module_level=True)

# relative tolerance of each output dtype: one ulp (the interpreter truncates fp32 -> bf16)
RTOL = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _operands(M, N, K, bits, group_size, seed=0):
    g = _gen(seed)
    qmax = 2 ** (bits - 1) - 1
    q_x = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    q_w = torch.randint(-qmax, qmax + 1, (N, K), generator=g, dtype=torch.int8)
    n_groups = 1 if group_size is None else K // group_size
    scale_x = torch.rand(M, 1, generator=g) * 0.02 + 1e-3
    scale_w = torch.rand(N, n_groups, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g)
    return [t.to(DEVICE) for t in (q_x, q_w, scale_x, scale_w, bias)]


def _check_scaled(y, yr, out_dtype):
    assert y.dtype == yr.dtype == out_dtype and y.shape == yr.shape
    if INTERPRET and out_dtype == torch.float32:
        assert torch.equal(y, yr), f"max diff {(y - yr).abs().max()}"
    # atol: a few ulps of the largest output, for entries that are small after cancellation
    atol = 8 * RTOL[out_dtype] * yr.float().abs().max().item()
    torch.testing.assert_close(y.float(), yr.float(), rtol=RTOL[out_dtype], atol=atol)


# ------------------------------------------------------------------------------ the references


def test_unpack_matches_export_format():
    q = torch.randint(-8, 8, (5, 34), generator=_gen(1), dtype=torch.int8)
    packed = pack_int4(q)
    assert torch.equal(unpack_int4_ref(packed), q)
    assert torch.equal(unpack_int4_ref(packed), unpack_int4(packed))


@pytest.mark.parametrize("group_size", [None, 16])
def test_reference_matches_dequantized_float_matmul(group_size):
    g = _gen(2)
    x, w, bias = torch.randn(6, 64, generator=g), torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
    q_x, s_x = quantize_per_token(x, 8)
    q_w, s_w = quantize_weight(w, 8, group_size)
    y = int8_matmul_ref(q_x, s_x, q_w, s_w, bias, group_size)
    expect = (q_x.double() * s_x.double()) @ dequantize_weight(q_w, s_w, group_size).double().T + bias.double()
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ kernel vs reference

SHAPES = [(1, 16, 16), (7, 40, 96), (33, 17, 50), (20, 48, 130)]
BLOCKS = [(16, 16, 32), (32, 32, 64)]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_raw_int32_is_exact(M, N, K, block):
    q_x, q_w, *_ = _operands(M, N, K, 8, None)
    y = qmm_triton(q_x, None, q_w, None, block=block)
    assert y.dtype == torch.int32
    assert torch.equal(y, int8_matmul_ref(q_x, None, q_w, None))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("M,N,K", [s for s in SHAPES if s[2] % 2 == 0])
def test_w4_raw_int32_is_exact(M, N, K, block):
    q_x, q_w, *_ = _operands(M, N, K, 4, None)
    packed = pack_int4(q_w)
    y = qmm_triton(q_x, None, packed, None, w_int4=True, block=block)
    assert torch.equal(y, int8_matmul_ref(q_x, None, q_w, None))
    assert torch.equal(y, w4a8_matmul_ref(q_x, None, packed, None))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_per_channel(M, N, K, with_bias, out_dtype):
    q_x, q_w, s_x, s_w, bias = _operands(M, N, K, 8, None)
    bias = bias if with_bias else None
    y = qmm_triton(q_x, s_x, q_w, s_w, bias, out_dtype=out_dtype, block=(16, 16, 32))
    _check_scaled(y, int8_matmul_ref(q_x, s_x, q_w, s_w, bias, out_dtype=out_dtype), out_dtype)


# (M, N, K, group_size, BLOCK_K): BLOCK_K = group (no flush branch) and BLOCK_K < group (flush
# every group_size / BLOCK_K tiles)
GROUPED = [(5, 24, 64, 32, 32), (17, 20, 96, 32, 32), (9, 40, 128, 64, 32), (3, 24, 256, 128, 32)]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,group_size,block_k", GROUPED)
def test_int8_per_group(M, N, K, group_size, block_k, out_dtype):
    q_x, q_w, s_x, s_w, bias = _operands(M, N, K, 8, group_size)
    y = qmm_triton(q_x, s_x, q_w, s_w, bias, group_size, out_dtype, block=(16, 16, block_k))
    _check_scaled(y, int8_matmul_ref(q_x, s_x, q_w, s_w, bias, group_size, out_dtype), out_dtype)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K,group_size,block_k", [(7, 40, 96, None, 32), (33, 17, 50, None, 32), *GROUPED])
def test_w4a8(M, N, K, group_size, block_k, out_dtype):
    q_x, q_w, s_x, s_w, bias = _operands(M, N, K, 4, group_size, seed=3)
    packed = pack_int4(q_w)
    y = qmm_triton(q_x, s_x, packed, s_w, bias, group_size, out_dtype, w_int4=True, block=(16, 16, block_k))
    yr = w4a8_matmul_ref(q_x, s_x, packed, s_w, bias, group_size, out_dtype)
    _check_scaled(y, yr, out_dtype)
    _check_scaled(y, int8_matmul_ref(q_x, s_x, q_w, s_w, bias, group_size, out_dtype), out_dtype)


def test_public_functions_default_tiles_and_leading_dims():
    q_x, q_w, s_x, s_w, bias = _operands(6, 32, 64, 4, 32)
    q_x3, s_x3 = q_x.reshape(2, 3, 64), s_x.reshape(2, 3, 1)
    y = w4a8_matmul(q_x3, s_x3, pack_int4(q_w), s_w, bias, group_size=32)
    assert y.shape == (2, 3, 32)
    _check_scaled(y, int8_matmul_ref(q_x3, s_x3, q_w, s_w, bias, 32), torch.float32)
    y8 = int8_matmul(q_x3, s_x3, q_w, s_w[:, :1].contiguous())
    _check_scaled(y8, int8_matmul_ref(q_x3, s_x3, q_w, s_w[:, :1].contiguous()), torch.float32)


@pytest.mark.parametrize("group_size", [12, 16])
def test_group_size_not_multiple_of_32_takes_the_reference(group_size):
    q_x, q_w, s_x, s_w, bias = _operands(3, 8, 48, 8, group_size)
    y = int8_matmul(q_x, s_x, q_w, s_w, bias, group_size=group_size)
    assert torch.equal(y, int8_matmul_ref(q_x, s_x, q_w, s_w, bias, group_size=group_size))
    with pytest.raises(AssertionError):
        qmm_triton(q_x, s_x, q_w, s_w, bias, group_size=group_size)


def test_bad_shapes_are_refused():
    q_x, q_w, s_x, s_w, _ = _operands(4, 16, 32, 8, None)
    with pytest.raises(AssertionError):
        qmm_triton(q_x, s_x, q_w[:, :16], s_w)
    with pytest.raises(AssertionError):
        qmm_triton(q_x, s_x, q_w, s_w, group_size=16)  # scale_w is per channel, not per group
    with pytest.raises(AssertionError):
        qmm_triton(q_x, s_x, q_w, s_w, group_size=32, block=(16, 16, 64))  # BLOCK_K must divide the group
    with pytest.raises(AssertionError):
        qmm_triton(q_x, None, q_w, None, block=(16, 16, 16))  # int8 tl.dot needs BLOCK_K >= 32 on GPUs


# ------------------------------------------------------------------------------ GPU, autotuned

# Mamba-2 2.7B: in_proj 2560 -> 10576 (N not a multiple of any tile), out_proj 5120 -> 2560
GPU_SHAPES = [(1, 10576, 2560), (16, 2560, 5120), (512, 10576, 2560), (4096, 2560, 5120)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("w4", [False, True])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("M,N,K", GPU_SHAPES)
def test_gpu_autotuned_matches_reference(M, N, K, group_size, w4):
    q_x, q_w, s_x, s_w, bias = _operands(M, N, K, 4 if w4 else 8, group_size)
    w = pack_int4(q_w) if w4 else q_w
    fn = w4a8_matmul if w4 else int8_matmul
    raw = fn(q_x, None, w, None)
    assert torch.equal(raw, int8_matmul_ref(q_x, None, q_w, None))
    for out_dtype in (torch.float32, torch.bfloat16):
        y = fn(q_x, s_x, w, s_w, bias, group_size, out_dtype)
        _check_scaled(y, int8_matmul_ref(q_x, s_x, q_w, s_w, bias, group_size, out_dtype), out_dtype)
