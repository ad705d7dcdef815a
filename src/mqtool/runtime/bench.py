"""Prefill and decode speed and memory of a model through the runtime, beside the baseline a user
would pick instead: mamba-ssm's `MambaLMHeadModel.generate(cg=True)` on the same shape and dtype."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from torch import nn

from mqtool.errors import MqtoolError
from mqtool.runtime.cache import StateFormat
from mqtool.runtime.generate import Runtime
from mqtool.runtime.integer import IntLinear, kernel_backend, model_bytes, tensor_bytes

__all__ = ["benchmark", "mamba_ssm_baseline", "plot_sweep"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def benchmark(model: nn.Module, batch: int = 1, prompt_len: int = 512, gen_len: int = 128, warmup: int = 1,
              seed: int = 0, cuda_graph: bool = True, state_dtype: torch.dtype | None = None,
              state_format: StateFormat | None = None) -> dict[str, Any]:
    """Times a prefill (`batch` x `prompt_len` random tokens, one parallel forward that fills the
    state cache) and `gen_len` greedy decode steps through :class:`Runtime` (one CUDA graph replay
    a step on CUDA), after `warmup` untimed rounds. Memory on CUDA is
    `torch.cuda.max_memory_allocated` over the timed round; on CPU, weights plus the cache."""
    if batch < 1 or prompt_len < 1 or gen_len < 1:
        raise MqtoolError("batch, prompt length and generation length must be positive")
    rt = Runtime(model, state_dtype=state_dtype, state_format=state_format)
    device = rt.device
    on_cuda = device.type == "cuda"
    use_graph = on_cuda and cuda_graph
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)

    def one_round(steps: int):
        cache = rt.allocate_cache(batch)
        tokens = torch.zeros(batch, dtype=torch.long, device=device)
        if use_graph:
            graph, tokens = rt.capture(cache, tokens)
        _sync(device)
        t0 = time.perf_counter()
        logits = rt.prefill(ids, cache)
        _sync(device)
        t1 = time.perf_counter()
        tokens.copy_(logits[:, :vocab].argmax(-1))
        for _ in range(steps):
            if use_graph:
                graph.replay()
            else:
                tokens.copy_(rt.step(tokens, cache)[:, :vocab].argmax(-1))
        _sync(device)
        return t1 - t0, time.perf_counter() - t1, cache

    for _ in range(warmup):
        one_round(min(gen_len, 2))
    if on_cuda:
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prefill_s, decode_s, cache = one_round(gen_len)
    weight_bytes = model_bytes(model)
    cache_bytes = cache.nbytes()
    if on_cuda:
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        peak, peak_kind = weight_bytes + cache_bytes["total"], "weights_plus_state_cache"
    int_lins = [m for m in model.modules() if isinstance(m, IntLinear)]
    return {
        "runner": "mqtool",
        "device": str(device),
        "dtype": str(model.backbone.embedding.weight.dtype).removeprefix("torch."),
        "layer": model.config.layer,
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "state_format": rt.fmt.describe(),
        "kernels": bool(int_lins),
        "kernel_backend": kernel_backend(model),
        "integer_linears": len(int_lins),
        "decode_cuda_graph": use_graph,
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_seconds": decode_s,
        "decode_ms_per_step": 1000 * decode_s / gen_len,
        "decode_tokens_per_s": batch * gen_len / decode_s,
        "weight_bytes": weight_bytes,
        "integer_weight_bytes": tensor_bytes(t for m in int_lins for t in (m.weight_q, m.weight_scale)),
        "state_cache_bytes": cache_bytes["total"],
        "state_bytes": cache_bytes["state"] + cache_bytes["scales"],
        "conv_cache_bytes": cache_bytes["conv"],
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
    }


def _mamba_ssm_model(config, dtype: torch.dtype, device: torch.device):
    from mamba_ssm.models.config_mamba import MambaConfig as RefConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as RefModel

    d = config.to_dict()
    keys = set(RefConfig.__dataclass_fields__)
    return RefModel(RefConfig(**{k: v for k, v in d.items() if k in keys}), device=device, dtype=dtype).eval()


@torch.inference_mode()
def mamba_ssm_baseline(config, dtype: torch.dtype, device: str | torch.device, batch: int, prompt_len: int,
                       gen_len: int, seed: int = 0) -> dict[str, Any] | None:
    """mamba-ssm's own generate (CUDA graphs, its state in the model's dtype) on a random-init
    model of `config`: prefill timed alone (one forward with its inference cache), decode = the
    rest of `generate`'s time. None when mamba-ssm is not importable or not on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        from mamba_ssm.utils.generation import InferenceParams
        ref = _mamba_ssm_model(config, dtype, device)
    except Exception:  # noqa: BLE001 - not installed or not importable: no baseline
        return None
    try:
        return _time_mamba_ssm(ref, InferenceParams, config, dtype, device, batch, prompt_len, gen_len, seed)
    finally:
        # generate's CUDA-graph cache holds the model in a reference cycle: without this its weights
        # stay allocated and count in the next model's peak memory
        ref._decoding_cache = None
        del ref
        gc.collect()
        torch.cuda.empty_cache()


def _time_mamba_ssm(ref, InferenceParams, config, dtype: torch.dtype, device: torch.device, batch: int,
                    prompt_len: int, gen_len: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=g).to(device)
    total_len = prompt_len + gen_len

    def run_generate() -> float:
        _sync(device)
        t0 = time.perf_counter()
        ref.generate(ids, max_length=total_len, cg=True, top_k=1, return_dict_in_generate=False)
        _sync(device)
        return time.perf_counter() - t0

    def run_prefill() -> float:
        params = InferenceParams(max_seqlen=total_len, max_batch_size=batch)
        _sync(device)
        t0 = time.perf_counter()
        ref(ids, inference_params=params, num_last_tokens=1)
        _sync(device)
        return time.perf_counter() - t0

    run_generate()  # captures its graph
    run_prefill()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    total = run_generate()
    peak = torch.cuda.max_memory_allocated(device)
    prefill = min(run_prefill() for _ in range(3))
    decode = max(total - prefill, 1e-9)
    layer_caches = ref.allocate_inference_cache(batch, total_len, dtype=dtype).values()
    state = sum(t.numel() * t.element_size() for pair in layer_caches for t in pair)
    out = {
        "runner": "mamba-ssm generate(cg=True)",
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "layer": config.layer,
        "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "state_format": str(dtype).removeprefix("torch."),
        "prefill_seconds": prefill, "prefill_tokens_per_s": batch * prompt_len / prefill,
        "decode_seconds": decode, "decode_ms_per_step": 1000 * decode / gen_len,
        "decode_tokens_per_s": batch * gen_len / decode,
        "weight_bytes": sum(p.numel() * p.element_size() for p in ref.parameters()),
        "state_cache_bytes": state, "peak_memory_bytes": peak, "peak_memory_kind": "cuda_max_memory_allocated",
    }
    return out


def plot_sweep(rows: list[dict[str, Any]], path: str) -> None:
    """decode ms/step and peak memory against batch size, one line per runner / checkpoint (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r.get('model', r['runner'])} [{r['state_format']}] p{r['prompt_len']}", []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["batch"])
        xs = [r["batch"] for r in rs]
        axes[0].plot(xs, [r["decode_ms_per_step"] for r in rs], marker="o", label=label)
        axes[1].plot(xs, [r["peak_memory_bytes"] / 2**30 for r in rs], marker="o", label=label)
    for ax, title in zip(axes, ("decode ms / step", "peak memory GiB"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
