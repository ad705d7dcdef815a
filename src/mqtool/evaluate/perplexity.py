"""Perplexity the way GPTQ / QuaRot / Quamba compute it: non-overlapping windows of `seqlen`
tokens, the mean negative log-likelihood over every predicted token, exponentiated."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mqtool.models import MambaLMHeadModel


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    mode: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def window_nll(logits: torch.Tensor, windows: torch.Tensor, vocab_chunk: int = 1024) -> torch.Tensor:
    """Summed next-token NLL per window [b], in float32, a slice of positions at a time so the
    float32 copy of a 50k-vocabulary logits tensor is never made whole."""
    b, l, _ = logits.shape
    total = torch.zeros(b, dtype=torch.float64, device=logits.device)
    for s in range(0, l - 1, vocab_chunk):
        e = min(s + vocab_chunk, l - 1)
        lg = logits[:, s:e].float()
        nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), windows[:, s + 1:e + 1].reshape(-1), reduction="none")
        total += nll.view(b, -1).sum(-1).double()
    return total


def _recurrent_nll_graphed(model: MambaLMHeadModel, batch: torch.Tensor) -> torch.Tensor:
    """Recurrent-mode summed NLL per window on CUDA, one CUDA graph replay per token: a step is
    hundreds of small kernels, so launching them one by one would dominate. The cache and the
    token buffer are static tensors the graph reads and updates in place."""
    b, l = batch.shape
    cache = model.allocate_cache(b)
    tokens = batch[:, 0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (allocations, autotuning) off the capture
        for _ in range(2):
            model.step(tokens, model.allocate_cache(b))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.step(tokens, cache)
    for layer_cache in cache.layers:  # the capture ran one step on the real cache: reset it
        for t in layer_cache:
            t.zero_()
    total = torch.zeros(b, dtype=torch.float64, device=batch.device)
    for t in range(l - 1):
        tokens.copy_(batch[:, t])
        graph.replay()
        total += F.cross_entropy(logits.float(), batch[:, t + 1], reduction="none").double()
    return total


@torch.inference_mode()
def perplexity(model: MambaLMHeadModel, windows: torch.Tensor, mode: str = "parallel", batch_size: int = 8,
               on_batch: Callable[[int], None] | None = None, use_cuda_graph: bool = True) -> PerplexityResult:
    """windows [n, seqlen] -> perplexity over every predicted token (seqlen - 1 per window).
    `on_batch(k)` is called after each batch with the number of windows done (progress bars)."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    nll_sum, count = 0.0, 0
    for s in range(0, windows.shape[0], batch_size):
        batch = windows[s:s + batch_size].to(device)
        if mode == "recurrent" and device.type == "cuda" and use_cuda_graph:
            nll_sum += float(_recurrent_nll_graphed(model, batch).sum())
        else:
            nll_sum += float(window_nll(model(batch, mode=mode), batch).sum())
        count += batch.numel() - batch.shape[0]
        if on_batch is not None:
            on_batch(batch.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    nll = nll_sum / max(count, 1)
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=windows.shape[0],
                            seqlen=windows.shape[1], mode=mode, seconds=time.perf_counter() - start)
