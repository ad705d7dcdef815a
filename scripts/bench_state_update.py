"""The Mamba-2 decode-step state update alone, on the GPU: mamba-ssm's `selective_state_update`
(bf16 and fp32 state) against mqtool's `kernels.state_update` (fp32, int8, packed int4), on a
model's shapes. Prints one line per (batch, kernel): time (triton.testing.do_bench, CUDA-graph
free, warm), the bytes the state moves and the bandwidth that makes.

    python3 scripts/bench_state_update.py [--heads 80 --headdim 64 --dstate 128 --groups 1] [--batch 1,64]
"""

from __future__ import annotations

import argparse

import torch
import triton

from mqtool.kernels import state_update
from mqtool.kernels.state_update import state_update_triton
from mqtool.packing import pack_int4
from mqtool.quant.states import quantize_state_int


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=80)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dstate", type=int, default=128)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--channel-scale", default="abs.max")
    ap.add_argument("--mamba1", type=int, default=0, metavar="D_INNER",
                    help="time the Mamba-1 step instead: d_inner rows of --dstate states (mamba-2.8b: 5120 x 16)")
    a = ap.parse_args()
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    if a.mamba1:
        for b in (int(v) for v in a.batch.split(",")):
            bench_mamba1(b, a.mamba1, a.dstate, a.channel_scale, selective_state_update)
        return

    for b in (int(v) for v in a.batch.split(",")):
        bench_batch(b, a.heads, a.headdim, a.dstate, a.groups, a.channel_scale, selective_state_update)


def bench_batch(b: int, h: int, p: int, n: int, g: int, channel_scale: str, selective_state_update) -> None:
    dev = "cuda"
    torch.manual_seed(0)
    h0 = torch.randn(b, h, p, n, device=dev)
    x = torch.randn(b, h, p, device=dev, dtype=torch.bfloat16)
    dt = torch.randn(b, h, device=dev, dtype=torch.bfloat16)
    dt_bias = torch.randn(h, device=dev) - 3
    A = -torch.rand(h, device=dev) * 4
    B = torch.randn(b, g, n, device=dev, dtype=torch.bfloat16)
    C = torch.randn(b, g, n, device=dev, dtype=torch.bfloat16)
    D = torch.randn(h, device=dev)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        st = h0.to(dtype)
        A_e, dtb = A[:, None, None].expand(h, p, n), dt_bias[:, None].expand(h, p)
        D_e, dt_e = D[:, None].expand(h, p), dt.unsqueeze(-1).expand(b, h, p)
        ms = triton.testing.do_bench(lambda st=st, A_e=A_e, dtb=dtb, D_e=D_e, dt_e=dt_e: selective_state_update(
            st, x, dt_e, A_e, B, C, D_e, z=None, dt_bias=dtb, dt_softplus=True))
        rows.append((f"mamba-ssm ssu {str(dtype)[6:]}", ms, 2 * st.numel() * st.element_size()))
    st32 = h0.clone()
    ms = triton.testing.do_bench(lambda: state_update(st32, x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True))
    rows.append(("mqtool fp32", ms, 2 * st32.numel() * 4))
    for bits in (8, 4):
        q, sc, ss = quantize_state_int(h0, bits, "dsq", channel_scale)
        codes = pack_int4(q) if bits == 4 else q
        ms = triton.testing.do_bench(lambda codes=codes, sc=sc, ss=ss, bits=bits: state_update(
            codes, x, dt, A, B, C, D, sc, ss, bits, channel_scale, dt_bias=dt_bias, dt_softplus=True))
        moved = 2 * (codes.numel() + 4 * (sc.numel() + ss.numel()))
        rows.append((f"mqtool H{bits} {'packed' if bits == 4 else 'int8'}", ms, moved))
        knobs = [(True, True, bp, nw) for bp, nw in ((4, 4), (8, 4), (16, 4), (8, 2))]
        knobs += [(False, True, 16, 4), (False, False, 16, 4)]
        for split, exact, bp, nw in knobs:   # the kernel's knobs: launches, rows per block, warps, division
            ms = triton.testing.do_bench(lambda codes=codes, sc=sc, ss=ss, bits=bits, bp=bp, nw=nw, ex=exact, sp=split:
                                         state_update_triton(codes, x, dt, A, B, C, D, sc, ss, bits,
                                                             channel_scale, dt_bias=dt_bias, dt_softplus=True,
                                                             block_p=bp, num_warps=nw, exact_div=ex, split=sp))
            name = f"{'split' if split else 'whole'} rows{bp} w{nw}{'' if exact else ' rcp'}"
            rows.append((f"  H{bits} {name}", ms, moved))
    base = rows[0][1]
    for name, ms, moved in rows:
        print(f"batch {b:4d}  {name:22s} {ms * 1e3:9.1f} us  state bytes r+w {moved / 1e6:9.1f} MB  "
              f"{moved / ms / 1e6:7.0f} GB/s  x{base / ms:5.2f} vs ssu bf16", flush=True)


def bench_mamba1(b: int, d: int, n: int, channel_scale: str, selective_state_update) -> None:
    from mqtool.kernels import mamba1_state_update

    dev = "cuda"
    torch.manual_seed(0)
    h0 = torch.randn(b, d, n, device=dev)
    u = torch.randn(b, d, device=dev, dtype=torch.bfloat16)
    dt = torch.randn(b, d, device=dev, dtype=torch.bfloat16)
    dt_bias = torch.randn(d, device=dev) - 3
    A = -torch.rand(d, n, device=dev) * 4
    B = torch.randn(b, n, device=dev, dtype=torch.bfloat16)
    C = torch.randn(b, n, device=dev, dtype=torch.bfloat16)
    D = torch.randn(d, device=dev)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        st = h0.to(dtype)
        ms = triton.testing.do_bench(lambda st=st: selective_state_update(st, u, dt, A, B, C, D, z=None,
                                                                          dt_bias=dt_bias, dt_softplus=True))
        rows.append((f"mamba-ssm ssu {str(dtype)[6:]}", ms, 2 * st.numel() * st.element_size()))
    for bits in (8, 4):
        q, sc, ss = quantize_state_int(h0, bits, "dsq", channel_scale)
        codes = pack_int4(q) if bits == 4 else q
        ms = triton.testing.do_bench(lambda codes=codes, sc=sc, ss=ss, bits=bits: mamba1_state_update(
            codes, u, dt, A, B, C, D, sc, ss, bits, channel_scale, dt_bias=dt_bias, dt_softplus=True))
        rows.append((f"mqtool H{bits} {'packed' if bits == 4 else 'int8'}", ms,
                     2 * (codes.numel() + 4 * (sc.numel() + ss.numel()))))
    for name, ms, moved in rows:
        print(f"mamba1 d_inner {d} batch {b:4d}  {name:22s} {ms * 1e3:9.1f} us  state bytes r+w {moved / 1e6:9.1f} MB  "
              f"{moved / ms / 1e6:7.0f} GB/s  x{rows[0][1] / ms:5.2f} vs ssu bf16", flush=True)


if __name__ == "__main__":
    main()
