"""The language model around the mixers, as mamba-ssm's `MambaLMHeadModel` lays it out:
`backbone.embedding`, `backbone.layers.{i}.{norm,mixer}`, `backbone.norm_f`, `lm_head` (tied to the
embedding unless `tie_embeddings` is false). Pre-norm blocks with the residual carried in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mqtool.models.config import MambaConfig
from mqtool.models.layers import Linear, make_norm
from mqtool.models.mamba1 import Mamba
from mqtool.models.mamba2 import Mamba2

MODES = ("parallel", "recurrent", "sequential")


class Block(nn.Module):
    """residual += hidden; hidden = mixer(norm(residual)) (mamba-ssm's Block, fused_add_norm or not)."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = make_norm(config.d_model, config.rms_norm, config.norm_epsilon)
        mixer_cls = Mamba2 if config.layer == "Mamba2" else Mamba
        kwargs = dict(config.ssm)
        if config.layer == "Mamba2":
            kwargs["norm_eps"] = config.norm_epsilon
        self.mixer = mixer_cls(config.d_model, **kwargs)

    def _residual(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        residual = hidden if residual is None else residual + hidden
        return residual.float() if self.residual_in_fp32 else residual

    def forward(self, hidden, residual=None, mode="parallel", cache=None, return_states=False):
        residual = self._residual(hidden, residual)
        normed = self.norm(residual.to(self.norm.weight.dtype))
        out = self.mixer(normed, mode=mode, cache=cache, return_states=return_states)
        if return_states:
            return out[0], residual, out[1]
        return out, residual

    def step(self, hidden, residual, cache):
        residual = self._residual(hidden, residual)
        return self.mixer.step(self.norm(residual.to(self.norm.weight.dtype)), cache), residual


class Backbone(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config.d_model, config.rms_norm, config.norm_epsilon)


class InferenceCache:
    """Per-layer (conv_state, ssm_state) for recurrent mode; the place state quantizers act on."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layers = layers

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[i]


class MambaLMHeadModel(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = Linear(config.d_model, config.padded_vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def _init_weights(self) -> None:
        """mamba-ssm's init, closely enough for random-init test models."""
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        for layer in self.backbone.layers:
            for proj in (layer.mixer.in_proj, layer.mixer.out_proj):
                nn.init.kaiming_uniform_(proj.weight, a=5**0.5)
            with torch.no_grad():  # rescale the residual branch's last projection by 1/sqrt(n_layer)
                layer.mixer.out_proj.weight /= self.config.n_layer**0.5

    @property
    def mixers(self) -> list[nn.Module]:
        return [layer.mixer for layer in self.backbone.layers]

    def _head(self, hidden, residual):
        residual = hidden + residual
        normed = self.backbone.norm_f(residual.to(self.backbone.norm_f.weight.dtype))
        return self.lm_head(normed)

    def forward(self, input_ids: torch.Tensor, mode: str = "parallel",
                cache: InferenceCache | None = None) -> torch.Tensor:
        """input_ids [b, l] -> logits [b, l, padded_vocab] (fp32 where the model is fp32).

        parallel: chunked/kernel scan; sequential: the per-token reference loop inside each
        mixer; recurrent: token by token through `step` with a state cache (state quantizers act
        at every step). With `cache` in parallel mode, it is filled for generation (prefill)."""
        if mode == "recurrent":
            return self._forward_recurrent(input_ids, cache)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        hidden, residual = self.backbone.embedding(input_ids), None
        for i, layer in enumerate(self.backbone.layers):
            hidden, residual = layer(hidden, residual, mode=mode, cache=None if cache is None else cache[i])
        return self._head(hidden, residual)

    def _forward_recurrent(self, input_ids: torch.Tensor, cache: InferenceCache | None) -> torch.Tensor:
        if cache is None:
            cache = self.allocate_cache(input_ids.shape[0])
        return torch.stack([self.step(input_ids[:, t], cache) for t in range(input_ids.shape[1])], dim=1)

    def allocate_cache(self, batch: int, device=None, dtype=None) -> InferenceCache:
        p = self.backbone.embedding.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        return InferenceCache([m.allocate_cache(batch, device, dtype) for m in self.mixers])

    def step(self, input_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One token per sequence: input_ids [b] -> logits [b, vocab]; updates cache in place."""
        hidden, residual = self.backbone.embedding(input_ids), None
        for i, layer in enumerate(self.backbone.layers):
            hidden, residual = layer.step(hidden, residual, cache[i])
        return self._head(hidden, residual)

    def block_io(self, input_ids: torch.Tensor, fn: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
        """Runs the model in parallel mode, calling fn(layer_index, hidden_in, residual_in) before
        each block: what block-wise methods (reconstruction, GPTQ) need as each block's input."""
        hidden, residual = self.backbone.embedding(input_ids), None
        for i, layer in enumerate(self.backbone.layers):
            fn(i, hidden, residual)
            hidden, residual = layer(hidden, residual)


@torch.inference_mode()
def generate(model: MambaLMHeadModel, input_ids: torch.Tensor, max_new_tokens: int,
             eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding with the recurrent state cache: a parallel prefill, then one step per token.
    input_ids [b, l] -> [b, l + new]. Works on quantized models (the same attachment points)."""
    cache = model.allocate_cache(input_ids.shape[0])
    logits = model(input_ids, mode="parallel", cache=cache)[:, -1]
    out = [input_ids]
    vocab = model.config.vocab_size  # never emit a padding row of the vocabulary
    for _ in range(max_new_tokens):
        next_ids = logits[:, :vocab].argmax(-1)
        out.append(next_ids[:, None])
        if eos_token_id is not None and bool((next_ids == eos_token_id).all()):
            break
        logits = model.step(next_ids, cache)
    return torch.cat(out, dim=1)
