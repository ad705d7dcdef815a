"""Dynamic per-token activation quantization: ``x [M, K]`` -> ``(q int8 [M, K], scale fp32 [M, 1])``.

The format (restated from ``mqtool.quant.quantizers``; kernels don't import the algorithms):
symmetric, no zero point, ``qmax = 2**(bits-1) - 1``; per row, in float32,

    scale = max(absmax(x_row) / qmax, 1e-8)          # true division
    q     = clamp(round_half_even(x / scale), -qmax, qmax)

The kernel reproduces this bit for bit: the input is upcast exactly to fp32, divisions are IEEE
(``div_rn``) and rounding is half-to-even (``_common.rint``).

Kernel: one program per row. When the row fits one ``BLOCK_K`` tile it is loaded once and kept in
registers (``ONE_PASS``); otherwise a first pass over the row finds the absmax and a second reloads
(from L2) and quantizes. Memory-bound: it reads ``M*K`` inputs and writes ``M*K`` bytes.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, INTERPRET, SCALE_MIN, qmax_for, true_div, use_triton

__all__ = ["act_fake_quant", "act_fake_quant_ref", "act_quant", "act_quant_ref", "act_quant_triton"]


def act_quant_ref(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference: ``x [..., K]`` -> ``(q int8 [..., K], scale fp32 [..., 1])``."""
    qmax = qmax_for(bits)
    xf = x.float()
    scale = true_div(xf.abs().amax(dim=-1, keepdim=True), qmax).clamp_min(SCALE_MIN)
    q = torch.round(xf / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import quant_codes

    @triton.heuristics({"ONE_PASS": lambda args: args["K"] <= args["BLOCK_K"]})
    @triton.jit
    def _act_quant_kernel(
        x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
        QMAX: tl.constexpr, SCALE_FLOOR: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
        FAKE: tl.constexpr = False,
    ):
        # FAKE: q_ptr is of x's dtype and receives the dequantized value (q * scale), not the code
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xm
        q_row = q_ptr + row * stride_qm
        offs = tl.arange(0, BLOCK_K)
        if ONE_PASS:
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(x), axis=0)
            scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), SCALE_FLOOR)
            q = quant_codes(tl.math.div_rn(x, scale), QMAX)
            if FAKE:
                tl.store(q_row + offs, (q * scale).to(q_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(q_row + offs, q.to(tl.int8), mask=mask)
        else:
            run = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = (k0 + offs) < K
                x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
                run = tl.maximum(run, tl.abs(x))
            amax = tl.max(run, axis=0)
            scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), SCALE_FLOOR)
            for k0 in range(0, K, BLOCK_K):
                mask = (k0 + offs) < K
                x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
                q = quant_codes(tl.math.div_rn(x, scale), QMAX)
                if FAKE:
                    tl.store(q_row + k0 + offs, (q * scale).to(q_ptr.dtype.element_ty), mask=mask)
                else:
                    tl.store(q_row + k0 + offs, q.to(tl.int8), mask=mask)
        tl.store(s_ptr + row, scale)

    # Writes fresh outputs only (no in-place state), so it can be autotuned freely.
    _act_quant_tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_K": bk}, num_warps=w)
            for bk, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8), (8192, 16))
        ],
        key=["K", "QMAX", "FAKE"],
    )(_act_quant_kernel)


def act_quant_triton(
    x: torch.Tensor, bits: int = 8, block_k: int | None = None, num_warps: int = 4, fake: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel.

    Shapes: ``x [..., K]`` fp32 / bf16 / fp16 (viewed as ``[M, K]``, last dim contiguous) ->
    ``q int8 [..., K]``, ``scale fp32 [..., 1]``.

    ``block_k=None`` autotunes on a GPU; under the interpreter (where autotuning cannot run) it
    defaults to a small tile. Pass ``block_k`` (a power of two >= 16) to pin the tile, e.g. to
    make a test cross tile boundaries. ``fake=True`` returns ``q * scale`` in x's dtype in
    place of the codes (:func:`act_fake_quant`).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {x.dtype}"
    assert x.dim() >= 1 and x.shape[-1] > 0, f"x must be [..., K] with K > 0, got {tuple(x.shape)}"
    qmax = qmax_for(bits)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty((M, K), dtype=x.dtype if fake else torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M > 0:
        args = (x2, q, scale, K, x2.stride(0), q.stride(0))
        if block_k is None and not INTERPRET:
            _act_quant_tuned[(M,)](*args, QMAX=qmax, SCALE_FLOOR=SCALE_MIN, FAKE=fake)
        else:
            bk = block_k if block_k is not None else min(max(triton.next_power_of_2(K), 16), 256)
            assert bk >= 16 and bk & (bk - 1) == 0, f"block_k must be a power of two >= 16, got {bk}"
            _act_quant_kernel[(M,)](*args, QMAX=qmax, SCALE_FLOOR=SCALE_MIN, BLOCK_K=bk, FAKE=fake,
                                    num_warps=num_warps)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def act_quant(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization ``x [..., K]`` -> ``(q int8 [..., K], scale fp32 [..., 1])``.

    The Triton kernel on CUDA (or on CPU under ``TRITON_INTERPRET=1``), else the reference;
    both give identical codes and scales.
    """
    if use_triton(x):
        return act_quant_triton(x, bits)
    return act_quant_ref(x, bits)


def act_fake_quant_ref(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """PyTorch reference of :func:`act_fake_quant`."""
    q, scale = act_quant_ref(x, bits)
    return (q.float() * scale).to(x.dtype)


def act_fake_quant(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token fake quantization ``x [..., K]`` -> ``q * scale`` in x's dtype, in one launch:
    what a simulated W8A8 linear feeds its matmul (``quant.quantizers.fake_quantize_per_token``),
    bit for bit."""
    if use_triton(x):
        return act_quant_triton(x, bits, fake=True)[0]
    return act_fake_quant_ref(x, bits)
