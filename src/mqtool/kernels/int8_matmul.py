"""Integer GEMMs of the quantized linears: W8A8 (int8 weights) and W4A8 (packed int4 weights).

Formats (restated from ``mqtool.quant.quantizers`` / ``mqtool.quant.export``):

* activations: int8 codes ``q_x [M, K]`` with per-token scales ``scale_x fp32 [M, 1]``
  (see ``act_quant``);
* W8A8 weights: int8 codes ``q_w [N, K]``;
* W4A8 weights: uint8 ``w_packed [N, K/2]``, two two's-complement nibbles a byte, the even
  column in the low nibble (``w[n, 2j] = lo(w_packed[n, j])``, ``w[n, 2j+1] = hi(...)``);
* weight scales fp32: ``[N, 1]`` per output channel, or ``[N, K/group_size]`` per group of
  ``group_size`` consecutive input columns.

Math. Per channel (one group spanning K), with ``acc`` the exact int32 product::

    acc[m, n] = sum_k q_x[m, k] * q_w[n, k]                      (int32)
    y[m, n]   = (float(acc[m, n]) * scale_x[m]) * scale_w[n]  (+ bias[n])

Per group, each group's partial sum is accumulated in int32 and scaled when it is complete::

    acc_g[m, n] = sum_{k in group g} q_x[m, k] * q_w[n, k]       (int32)
    y[m, n]     = (sum_g float(acc_g[m, n]) * scale_w[n, g]) * scale_x[m]  (+ bias[n])

summing the groups in order, in fp32. The int32 part is exact (|acc| <= K * 127 * 127, so K up
to ~133k); the scaled output agrees with the reference to fp32 rounding (on a GPU the compiler
may contract the group sum's multiply-add into an FMA). The output is cast to ``out_dtype``
(fp32 / bf16 / fp16) last. With ``scale_x`` and ``scale_w`` both None the functions return the
raw int32 ``acc`` over all of K (for tests and for callers that scale elsewhere).

Kernel: a classic tiled GEMM (``tl.dot`` int8 x int8 -> int32), program ids swizzled in groups of
``GROUP_M`` row tiles for L2 reuse of the weight tiles, one pipelined loop over K tiles. For
groups, ``BLOCK_K`` divides ``group_size`` and the int32 accumulator is flushed into the fp32
one every ``group_size / BLOCK_K`` tiles (no branch when they are equal). Triton's int8
``tl.dot`` needs K >= 32 on NVIDIA GPUs, so ``BLOCK_K >= 32`` and the kernel takes group sizes
that are multiples of 32 (others run the reference). int4 tiles are loaded packed
``[BLOCK_N, BLOCK_K/2]``, sign-extended with shifts and interleaved with ``join`` + ``reshape``.
"""

from __future__ import annotations

import math

import torch

from mqtool.packing import unpack_int4

from ._common import HAS_TRITON, INTERPRET, use_triton

__all__ = [
    "int8_matmul",
    "int8_matmul_ref",
    "qmm_triton",
    "unpack_int4_ref",
    "w4a8_matmul",
    "w4a8_matmul_ref",
]

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------ references


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]`` -> int8 codes ``[N, K]`` (:func:`mqtool.packing.unpack_int4`)."""
    return unpack_int4(packed)


def _int_mm_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M, K] @ b [N, K]^T`` of int8 codes as int32, on any device.

    Through float64: every product and partial sum is an integer below 2**53, so it is exact
    (and it runs on CUDA too, where PyTorch has no general int32 matmul).
    """
    return (a.double() @ b.double().T).to(torch.int32)


def _scaled_ref(
    q_x: torch.Tensor, scale_x: torch.Tensor | None, q_w: torch.Tensor, scale_w: torch.Tensor | None,
    bias: torch.Tensor | None, group_size: int | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    K = q_x.shape[-1]
    x2 = q_x.reshape(-1, K)
    if scale_x is None and scale_w is None:
        return _int_mm_exact(x2, q_w).reshape(*q_x.shape[:-1], q_w.shape[0])
    assert scale_x is not None and scale_w is not None, "give both scales, or neither (raw int32)"
    sx = scale_x.reshape(-1, 1).float()
    sw = scale_w.float()
    if group_size is None:
        y = _int_mm_exact(x2, q_w).float() * sx * sw.reshape(1, -1)
    else:
        y = torch.zeros(x2.shape[0], q_w.shape[0], dtype=torch.float32, device=q_x.device)
        for g in range(K // group_size):  # in order, as the kernel sums them
            cols = slice(g * group_size, (g + 1) * group_size)
            y = y + _int_mm_exact(x2[:, cols], q_w[:, cols]).float() * sw[:, g].reshape(1, -1)
        y = y * sx
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*q_x.shape[:-1], q_w.shape[0])


def int8_matmul_ref(
    q_x: torch.Tensor, scale_x: torch.Tensor | None, q_w: torch.Tensor, scale_w: torch.Tensor | None,
    bias: torch.Tensor | None = None, group_size: int | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """PyTorch reference of :func:`int8_matmul` (the module docstring gives the math)."""
    return _scaled_ref(q_x, scale_x, q_w, scale_w, bias, group_size, out_dtype)


def w4a8_matmul_ref(
    q_x: torch.Tensor, scale_x: torch.Tensor | None, w_packed: torch.Tensor, scale_w: torch.Tensor | None,
    bias: torch.Tensor | None = None, group_size: int | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """PyTorch reference of :func:`w4a8_matmul`: unpack the nibbles, then the int8 reference."""
    return _scaled_ref(q_x, scale_x, unpack_int4_ref(w_packed), scale_w, bias, group_size, out_dtype)


# --------------------------------------------------------------------------------------- kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _qmm_kernel(
        x_ptr, w_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_wn, stride_swn, stride_ym,
        W_INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, APPLY_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # --- swizzled tile ids: GROUP_M row tiles share each weight column tile while it is in L2
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (pid // num_pid_in_group) * GROUP_M
        group_rows = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_rows)
        pid_n = (pid % num_pid_in_group) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        HALF_K: tl.constexpr = BLOCK_K // 2
        if W_INT4:
            offs_kh = tl.arange(0, HALF_K)
            w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_kh[None, :]
        else:
            w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]

        GROUPED: tl.constexpr = GROUP_SIZE > 0  # the launcher passes 0 for raw int32 output
        TILES_PER_GROUP: tl.constexpr = GROUP_SIZE // BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        if GROUPED:
            acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            sw_row = sw_ptr + offs_n.to(tl.int64) * stride_swn

        num_k_tiles = tl.cdiv(K, BLOCK_K)
        for t in range(0, num_k_tiles):
            k0 = t * BLOCK_K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & ((k0 + offs_k)[None, :] < K), other=0)
            if W_INT4:
                packed = tl.load(w_ptrs, mask=mask_n[:, None] & ((k0 // 2 + offs_kh)[None, :] < K // 2), other=0)
                lo = (packed << 4).to(tl.int8, bitcast=True) >> 4  # arithmetic shift sign-extends
                hi = packed.to(tl.int8, bitcast=True) >> 4
                b = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # [n, j, 2] -> column 2j + {0, 1}
                w_ptrs += HALF_K
            else:
                b = tl.load(w_ptrs, mask=mask_n[:, None] & ((k0 + offs_k)[None, :] < K), other=0)
                w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            if TILES_PER_GROUP == 1:  # one tile = one group: its int32 product, scaled at once
                part = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
                s = tl.load(sw_row + t, mask=mask_n, other=0.0)
                acc_f += part.to(tl.float32) * s[None, :]
            else:
                acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
                if GROUPED:
                    if t % TILES_PER_GROUP == TILES_PER_GROUP - 1:  # the group is complete
                        s = tl.load(sw_row + t // TILES_PER_GROUP, mask=mask_n, other=0.0)
                        acc_f += acc.to(tl.float32) * s[None, :]
                        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)

        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        mask_y = mask_m[:, None] & mask_n[None, :]
        if APPLY_SCALES:
            sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)
            if GROUPED:
                y = acc_f * sx[:, None]
            else:
                sw = tl.load(sw_ptr + offs_n.to(tl.int64) * stride_swn, mask=mask_n, other=0.0)
                y = (acc.to(tl.float32) * sx[:, None]) * sw[None, :]
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_y)
        else:
            tl.store(y_ptrs, acc, mask=mask_y)

    def _configs() -> list:
        cfgs = []
        # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): large tiles for prefill (wgmma on
        # sm_90 wants BLOCK_M >= 64), thin ones for decode (M of 1..32 rows)
        for bm, bn, bk, s, w in (
            (128, 256, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4), (64, 256, 128, 4, 8),
            (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 5, 4),
            (32, 128, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 4), (16, 256, 128, 3, 8),
            (32, 64, 256, 3, 4), (16, 64, 128, 5, 2),
        ):
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                      num_stages=s, num_warps=w))
        return cfgs

    def _prune(configs, named_args, **kwargs):
        """Grouped scales need BLOCK_K | group_size: shrink BLOCK_K to gcd(BLOCK_K, group) (a power
        of two >= 32 since group_size is a multiple of 32); skip tiles far taller than M."""
        g = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE", 0))
        M = named_args["M"]
        out, seen = [], set()
        for c in configs:
            kw = dict(c.kwargs)
            if g:
                kw["BLOCK_K"] = math.gcd(kw["BLOCK_K"], g)
            if kw["BLOCK_M"] > max(16, triton.next_power_of_2(M)) * 2:
                continue
            key = (tuple(sorted(kw.items())), c.num_stages, c.num_warps)
            if key not in seen:
                seen.add(key)
                out.append(triton.Config(kw, num_stages=c.num_stages, num_warps=c.num_warps))
        return out or configs

    # Writes a fresh output only, so autotuning (which re-runs the kernel) is safe.
    _qmm_tuned = triton.autotune(
        configs=_configs(),
        key=["M", "N", "K", "W_INT4", "GROUP_SIZE", "APPLY_SCALES", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune},
    )(_qmm_kernel)


def qmm_triton(
    q_x: torch.Tensor, scale_x: torch.Tensor | None, w: torch.Tensor, scale_w: torch.Tensor | None,
    bias: torch.Tensor | None = None, group_size: int | None = None, out_dtype: torch.dtype = torch.float32,
    w_int4: bool = False, block: tuple[int, int, int] | None = None, num_warps: int = 4, num_stages: int = 2,
) -> torch.Tensor:
    """Launch the integer GEMM.

    Shapes: ``q_x int8 [..., K]`` (viewed as ``[M, K]``); ``w`` int8 ``[N, K]`` or, with
    ``w_int4``, uint8 ``[N, K/2]``; ``scale_x fp32 [..., 1]`` (M values); ``scale_w fp32 [N, 1]``
    or ``[N, K/group_size]``; ``bias [N]`` (any float dtype) -> ``y [..., N]`` of ``out_dtype``.
    Both scales None -> the raw int32 product ``[..., N]`` (bias and group_size must be None).

    ``block=(BLOCK_M, BLOCK_N, BLOCK_K)`` pins the tile (powers of two, BLOCK_M and BLOCK_N >= 16,
    BLOCK_K >= 32: Triton's int8 ``tl.dot`` needs K >= 32 on NVIDIA GPUs; with groups BLOCK_K must
    divide group_size, so group_size must be a multiple of 32); None autotunes on a GPU and uses
    16 x 16 x 32 tiles under the interpreter.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    assert q_x.dtype == torch.int8, f"q_x must be int8, got {q_x.dtype}"
    K = q_x.shape[-1]
    x2 = q_x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if w_int4:
        assert w.dtype == torch.uint8, f"packed int4 weights must be uint8, got {w.dtype}"
        assert K % 2 == 0 and w.dim() == 2 and w.shape[1] == K // 2, f"w {tuple(w.shape)} is not [N, {K}/2]"
    else:
        assert w.dtype == torch.int8, f"int8 weights must be int8, got {w.dtype}"
        assert w.dim() == 2 and w.shape[1] == K, f"w {tuple(w.shape)} is not [N, {K}]"
    if w.stride(-1) != 1:
        w = w.contiguous()
    N = w.shape[0]
    apply_scales = scale_x is not None or scale_w is not None
    if apply_scales:
        assert scale_x is not None and scale_w is not None, "give both scales, or neither (raw int32)"
        assert out_dtype in _OUT_DTYPES, f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}"
        assert scale_x.numel() == M, f"scale_x has {scale_x.numel()} values for {M} rows"
        sx = scale_x.reshape(M).float().contiguous()
        n_groups = 1 if group_size is None else K // group_size
        if group_size is not None:
            assert group_size > 0 and K % group_size == 0, f"group_size {group_size} must divide K={K}"
            assert group_size % 32 == 0, f"the kernel needs group_size % 32 == 0, got {group_size}"
        assert tuple(scale_w.shape) == (N, n_groups), f"scale_w {tuple(scale_w.shape)} != {(N, n_groups)}"
        sw = scale_w.float().contiguous()
        if bias is not None:
            assert bias.numel() == N, f"bias has {bias.numel()} values for N={N}"
            bias = bias.reshape(N).contiguous()
        y = torch.empty((M, N), dtype=out_dtype, device=q_x.device)
    else:
        assert bias is None and group_size is None, "raw int32 output takes no bias or groups"
        sx = sw = None
        y = torch.empty((M, N), dtype=torch.int32, device=q_x.device)
    gs = group_size if (apply_scales and group_size is not None) else 0
    if M > 0 and N > 0:
        args = (x2, w, sx, sw, bias, y, M, N, K, x2.stride(0), w.stride(0), 0 if sw is None else sw.stride(0),
                y.stride(0))
        flags = {"W_INT4": w_int4, "GROUP_SIZE": gs, "APPLY_SCALES": apply_scales, "HAS_BIAS": bias is not None}
        if block is None and not INTERPRET:
            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
            _qmm_tuned[grid](*args, **flags)
        else:
            bm, bn, bk = block if block is not None else (16, 16, 32)
            for b in (bm, bn, bk):
                assert b >= 16 and b & (b - 1) == 0, f"block sizes must be powers of two >= 16, got {block}"
            assert bk >= 32, f"int8 tl.dot needs BLOCK_K >= 32, got {bk}"
            assert not gs or gs % bk == 0, f"BLOCK_K={bk} must divide group_size={gs}"
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
            _qmm_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4,
                              num_warps=num_warps, num_stages=num_stages)
    return y.reshape(*q_x.shape[:-1], N)


def _dispatchable(q_x: torch.Tensor, group_size: int | None) -> bool:
    return use_triton(q_x) and (group_size is None or group_size % 32 == 0)


def int8_matmul(
    q_x: torch.Tensor, scale_x: torch.Tensor | None, q_w: torch.Tensor, scale_w: torch.Tensor | None,
    bias: torch.Tensor | None = None, group_size: int | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8 linear ``y [..., N] = q_x [..., K] @ q_w [N, K]^T`` dequantized by the per-token and
    per-channel (or per-group) scales, plus bias; raw int32 when both scales are None.

    The Triton kernel on CUDA (or on CPU under ``TRITON_INTERPRET=1``), else the reference;
    group sizes that are not multiples of 32 always take the reference.
    """
    if _dispatchable(q_x, group_size):
        return qmm_triton(q_x, scale_x, q_w, scale_w, bias, group_size, out_dtype)
    return int8_matmul_ref(q_x, scale_x, q_w, scale_w, bias, group_size, out_dtype)


def w4a8_matmul(
    q_x: torch.Tensor, scale_x: torch.Tensor | None, w_packed: torch.Tensor, scale_w: torch.Tensor | None,
    bias: torch.Tensor | None = None, group_size: int | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W4A8 linear: as :func:`int8_matmul` with the weights packed two int4 codes a byte
    (``uint8 [N, K/2]``, the export format)."""
    if _dispatchable(q_x, group_size):
        return qmm_triton(q_x, scale_x, w_packed, scale_w, bias, group_size, out_dtype, w_int4=True)
    return w4a8_matmul_ref(q_x, scale_x, w_packed, scale_w, bias, group_size, out_dtype)
