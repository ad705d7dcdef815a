"""Generation: a parallel prefill that writes its final states straight into the cache's stored
form, then one decode step per token, the whole step captured as one CUDA graph on CUDA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from mqtool.runtime.cache import LayerCache, MixedStateFormat, StateCache, StateFormat, state_format_of
from mqtool.runtime.step import model_step
from mqtool.runtime.swap import fuse_activation_quantizers

__all__ = ["Runtime"]


class _StateSink:
    """Stands where the simulated model's prefill copies its last state (`cache[1].copy_(h)`):
    stores it in the layer's stored form (quantizing once, as the simulated quantizer would)."""

    def __init__(self, lc: LayerCache) -> None:
        self.lc = lc

    def copy_(self, h: Tensor) -> None:
        self.lc.write(h.float())


class _PrefillCache:
    def __init__(self, cache: StateCache) -> None:
        self.layers = [(lc.conv, _StateSink(lc)) for lc in cache.layers]

    def __getitem__(self, i: int):
        return self.layers[i]


@contextlib.contextmanager
def _raw_final_state(model: nn.Module) -> Iterator[None]:
    """The prefill hands the sink the unquantized last state (the sink quantizes it itself)."""
    saved = [m.state_quantizer for m in model.mixers]
    try:
        for m in model.mixers:
            m.state_quantizer = nn.Identity()
        yield
    finally:
        for m, q in zip(model.mixers, saved, strict=True):
            m.state_quantizer = q


class Runtime:
    """A loaded model (any stage: FP, simulated, integer) run for generation with a
    :class:`StateCache` of `state_format` (default: what the model's state quantizer implies, else
    a float state in ``state_dtype``, default the model's dtype).

    It quacks like the model where evaluation needs it (`allocate_cache`, `step`, `parameters`,
    recurrent `__call__`), so `mqtool.evaluate.perplexity` scores the runtime unchanged.

    On CUDA it swaps the model's dynamic per-token activation quantizers for their one-launch
    kernel (`runtime.swap`: the same numbers), in place."""

    def __init__(self, model: nn.Module, state_dtype: torch.dtype | None = None,
                 state_format: StateFormat | MixedStateFormat | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.fmt = state_format or state_format_of(model, state_dtype)
        self.fused_quantizers = fuse_activation_quantizers(model)

    @property
    def device(self) -> torch.device:
        return self.model.backbone.embedding.weight.device

    def parameters(self):
        return self.model.parameters()

    def allocate_cache(self, batch: int) -> StateCache:
        return StateCache.allocate(self.model, batch, self.fmt)

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, cache: StateCache) -> Tensor:
        """Parallel forward over the prompt; fills `cache`; returns the last position's logits."""
        with _raw_final_state(self.model):
            return self.model(input_ids, mode="parallel", cache=_PrefillCache(cache))[:, -1]

    def step(self, input_ids: Tensor, cache: StateCache) -> Tensor:
        return model_step(self.model, input_ids, cache)

    @torch.inference_mode()
    def __call__(self, input_ids: Tensor, mode: str = "recurrent") -> Tensor:
        """Logits of every position, token by token through the decode step (`mode` must be recurrent)."""
        if mode != "recurrent":
            raise ValueError("the runtime scores token by token: mode must be 'recurrent'")
        cache = self.allocate_cache(input_ids.shape[0])
        return torch.stack([self.step(input_ids[:, t], cache) for t in range(input_ids.shape[1])], dim=1)

    def capture(self, cache: StateCache, tokens: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """One CUDA graph of a greedy step: reads `tokens`, writes the next ones into it. The
        warm-up steps run on `cache` itself (no second cache: that would add to peak memory), so
        capture before the prefill, which overwrites every tensor of the cache."""
        vocab = self.config.vocab_size
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                tokens.copy_(self.step(tokens, cache)[:, :vocab].argmax(-1))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            tokens.copy_(self.step(tokens, cache)[:, :vocab].argmax(-1))
        return graph, tokens

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, max_new_tokens: int, cuda_graph: bool = True,
                 eos_token_id: int | None = None) -> Tensor:
        """Greedy decoding: ``[b, l]`` -> ``[b, l + new]``, new = ``max_new_tokens`` or fewer when every
        sequence has just produced ``eos_token_id`` (never a padding row of the vocabulary)."""
        vocab = self.config.vocab_size
        cache = self.allocate_cache(input_ids.shape[0])
        if cuda_graph and self.device.type == "cuda":
            tokens = torch.zeros(input_ids.shape[0], dtype=torch.long, device=self.device)
            graph, tokens = self.capture(cache, tokens)
        out = [input_ids]
        next_ids = self.prefill(input_ids, cache)[:, :vocab].argmax(-1)
        for _ in range(max_new_tokens):
            out.append(next_ids[:, None])
            if eos_token_id is not None and bool((next_ids == eos_token_id).all()):
                break
            if cuda_graph and self.device.type == "cuda":
                tokens.copy_(next_ids)
                graph.replay()
                next_ids = tokens.clone()
            else:
                next_ids = self.step(next_ids, cache)[:, :vocab].argmax(-1)
        return torch.cat(out, dim=1)
