"""Quantized linear layers against bf16 `F.linear` on the real shapes of mamba2-2.7b and
mamba-2.8b (issue 14), on the GPU: one table of times and ratios to bf16, one row a (layer, M).

Candidates (each where it runs here; a missing one prints "-"):
* bf16 `F.linear` (the baseline), and bf16 with the weight dequantized per call (what a simulated
  W8A8 linear costs beyond bf16);
* mqtool's Triton `int8_matmul` (W8A8, codes given) and `act_quant + int8_matmul` (activation
  quantization included), `w4a8_matmul` (packed int4, per channel and group 128);
* `torch._int_mm` (int8 x int8 -> int32, cuBLASLt) plus the scale epilogue in PyTorch;
* `torch._scaled_mm` in FP8 e4m3 (a W8A8 variant with per-row / per-column scales).

    python3 scripts/bench_gemm.py [--m 1,16,2048,8192] [--shapes mamba2-2.7b,mamba-2.8b]

Times: `triton.testing.do_bench` (warm, median, ms). Ratio: time / bf16 time (below 1 = faster).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from mqtool.kernels import act_quant, int8_matmul, w4a8_matmul
from mqtool.packing import pack_int4

#: (layer, N, K): out x in features of each linear of a layer, and the LM head
SHAPES = {
    "mamba2-2.7b": [("in_proj", 10576, 2560), ("out_proj", 2560, 5120), ("lm_head", 50288, 2560)],
    "mamba-2.8b": [("in_proj", 10240, 2560), ("x_proj", 192, 5120), ("dt_proj", 5120, 160),
                   ("out_proj", 2560, 5120), ("lm_head", 50288, 2560)],
}


def _time(fn: Callable[[], object]) -> float | None:
    try:
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn)
    except Exception as e:  # noqa: BLE001 - a candidate that cannot run here is reported, not fatal
        print(f"    ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})")
        return None


def candidates(m: int, n: int, k: int) -> dict[str, Callable[[], object]]:
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    q_w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    s_w = torch.rand(n, 1, device=dev) * 1e-3
    q_w4 = pack_int4(torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8))
    s_w4g = torch.rand(n, k // 128, device=dev) * 1e-3 if k % 128 == 0 else None
    q_x, s_x = act_quant(x)
    out: dict[str, Callable[[], object]] = {
        "bf16": lambda: F.linear(x, w),
        "bf16 deq-w": lambda: F.linear(x, (q_w.to(torch.bfloat16) * s_w.to(torch.bfloat16))),
        "w8a8 codes": lambda: int8_matmul(q_x, s_x, q_w, s_w, out_dtype=torch.bfloat16),
        "w8a8 +actq": lambda: int8_matmul(*act_quant(x), q_w, s_w, out_dtype=torch.bfloat16),
        "w4a8 chan": lambda: w4a8_matmul(q_x, s_x, q_w4, s_w, out_dtype=torch.bfloat16),
    }
    if s_w4g is not None:
        out["w4a8 g128"] = lambda: w4a8_matmul(q_x, s_x, q_w4, s_w4g, group_size=128, out_dtype=torch.bfloat16)
    if m >= 17:  # cuBLASLt's int8 GEMM wants M > 16
        out["_int_mm"] = lambda: (torch._int_mm(q_x, q_w.t()).float() * s_x * s_w.t()).to(torch.bfloat16)
    x8 = x.to(torch.float8_e4m3fn)
    w8 = w.to(torch.float8_e4m3fn)
    one_x, one_w = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
    out["fp8 scaled_mm"] = lambda: torch._scaled_mm(x8, w8.t(), scale_a=one_x, scale_b=one_w,
                                                    out_dtype=torch.bfloat16)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,16,2048,8192")
    ap.add_argument("--shapes", default="mamba2-2.7b,mamba-2.8b")
    a = ap.parse_args()
    ms = [int(v) for v in a.m.split(",")]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for shape in a.shapes.split(","):
        for layer, n, k in SHAPES[shape]:
            for m in ms:
                times = {name: _time(fn) for name, fn in candidates(m, n, k).items()}
                base = times["bf16"]
                cells = "  ".join(f"{name} {t * 1e3:8.1f}us x{t / base:5.2f}" if t else f"{name} -"
                                  for name, t in times.items())
                print(f"{shape:12s} {layer:8s} {n:6d}x{k:<5d} M={m:<5d} {cells}", flush=True)


if __name__ == "__main__":
    main()
