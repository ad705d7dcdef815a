"""The Hugging Face `transformers` layout, both ways: `MambaForCausalLM`, `Mamba2ForCausalLM` and
`FalconMambaForCausalLM` checkpoints to mqtool's (mamba-ssm) config and tensor names, and back.

The layouts differ in the config's keys (hidden_size vs d_model, ...) and in one tensor name,
`backbone.embeddings.weight` (HF) vs `backbone.embedding.weight` (mamba-ssm); every other tensor is
named alike. An HF config's `vocab_size` is the embedding's row count (already padded), so it maps
to `vocab_size` with `pad_vocab_size_multiple` 1. What the HF classes compute that mamba-ssm's
config cannot say is carried in `ssm_cfg`: FalconMamba's weightless RMS norms on dt, B and C
(`bcdt_rms_eps`). transformers always uses RMS norms for the blocks and Mamba-2's gated norm
(its `rms_norm` key is read by no code), so those map to rms_norm / rmsnorm = True.

Mamba-2's gated norm is per group of d_inner / n_groups channels, as in mamba-ssm and transformers 5;
transformers 4.x's CPU path (`torch_forward`) normalises over all d_inner channels at once (its CUDA
path groups), so with n_groups > 1 only transformers >= 5 on CPU computes what mqtool does.

A checkpoint loaded from HF layout keeps its original config.json in the manifest
(`Manifest.hf_config`), so keys mqtool does not model (token ids, dtype, ...) go out as they came.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from mqtool.errors import MqtoolError
from mqtool.models.config import MambaConfig, read_json

HF = "hf"
STATE_SPACES = "state-spaces"
LAYOUTS = (STATE_SPACES, HF)

# model_type -> the class transformers builds for it
ARCHITECTURES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM",
                 "falcon_mamba": "FalconMambaForCausalLM"}
_MODEL_TYPE = {arch: mt for mt, arch in ARCHITECTURES.items()}

# the one tensor whose name differs (a prefix: backbone.embeddings.weight)
_HF_EMBEDDING, _SS_EMBEDDING = "backbone.embeddings.", "backbone.embedding."

# HF keys mapped one to one into ssm_cfg (Mamba-1 and FalconMamba / Mamba-2), with transformers' defaults
_MAMBA1_SSM = {"state_size": ("d_state", 16), "conv_kernel": ("d_conv", 4), "expand": ("expand", 2),
               "time_step_rank": ("dt_rank", "auto"), "use_conv_bias": ("conv_bias", True),
               "use_bias": ("bias", False), "time_step_min": ("dt_min", 0.001), "time_step_max": ("dt_max", 0.1),
               "time_step_floor": ("dt_init_floor", 1e-4)}
_MAMBA2_SSM = {"state_size": ("d_state", 128), "conv_kernel": ("d_conv", 4), "expand": ("expand", 2),
               "head_dim": ("headdim", 64), "n_groups": ("ngroups", 8), "use_conv_bias": ("conv_bias", True),
               "use_bias": ("bias", False), "time_step_min": ("dt_min", 0.001), "time_step_max": ("dt_max", 0.1),
               "time_step_floor": ("dt_init_floor", 1e-4), "chunk_size": ("chunk_size", 256)}


def hf_model_type(d: dict[str, Any]) -> str | None:
    """The HF model type of a config.json's dict (mamba, mamba2, falcon_mamba), or None when it is a
    mamba-ssm config. An HF config of another model is refused."""
    if not isinstance(d, dict) or "d_model" in d:
        return None
    mt = d.get("model_type")
    archs = [a for a in d.get("architectures") or [] if isinstance(a, str)]
    if mt is None:
        mt = next((_MODEL_TYPE[a] for a in archs if a in _MODEL_TYPE), None)
    if mt is None:
        return None
    if mt not in ARCHITECTURES:
        raise MqtoolError(f"config.json is not a Mamba config but a Hugging Face {mt!r} model; mqtool reads "
                          f"{', '.join(ARCHITECTURES.values())}")
    return mt


def _json_float(x: Any) -> float:
    """A number from an HF config.json: transformers 5 writes infinity as {"__float__": "Infinity"}
    (4 as the bare `Infinity` that Python's json reads, and that both read back: what we write)."""
    return float(x["__float__"]) if isinstance(x, dict) else float(x)


def config_from_hf(d: dict[str, Any]) -> MambaConfig:
    """mqtool's config for an HF config.json dict (model_type mamba, mamba2 or falcon_mamba)."""
    mt = hf_model_type(d)
    if mt is None:
        raise MqtoolError("config.json is not a Hugging Face Mamba config (needs model_type or architectures)")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise MqtoolError(f"hidden_act {act!r} is not supported (Mamba uses silu)")
    try:
        hidden, n_layer, vocab = int(d["hidden_size"]), int(d["num_hidden_layers"]), int(d["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise MqtoolError(f"config.json ({mt}) lacks a valid {e}: needs hidden_size, num_hidden_layers, "
                          "vocab_size") from None
    table = _MAMBA2_SSM if mt == "mamba2" else _MAMBA1_SSM
    ssm: dict[str, Any] = {ours: d.get(theirs, default) for theirs, (ours, default) in table.items()}
    if mt == "mamba2":
        ssm["layer"] = "Mamba2"
        limit = d.get("time_step_limit", (0.0, math.inf))
        try:
            ssm["dt_limit"] = [_json_float(limit[0]), _json_float(limit[1])]
        except (TypeError, ValueError, IndexError, KeyError):
            raise MqtoolError(f"config.json (mamba2): time_step_limit must be two numbers, got {limit!r}") from None
        heads = d.get("num_heads")
        if heads is not None and int(heads) * int(ssm["headdim"]) != int(ssm["expand"] * hidden):
            raise MqtoolError(f"config.json (mamba2): num_heads * head_dim ({heads} * {ssm['headdim']}) must "
                              f"equal expand * hidden_size ({ssm['expand']} * {hidden})")
    if mt == "falcon_mamba":
        ssm["bcdt_rms_eps"] = float(d.get("mixer_rms_eps", 1e-6))
    tie_default = mt != "mamba2"  # MambaConfig / FalconMambaConfig tie by default, Mamba2Config does not
    return MambaConfig(d_model=hidden, n_layer=n_layer, vocab_size=vocab, ssm_cfg=ssm,
                       rms_norm=True, residual_in_fp32=bool(d.get("residual_in_fp32", True)),
                       pad_vocab_size_multiple=1, tie_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
                       norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)))


def config_to_hf(config: MambaConfig, base: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The HF config.json dict for mqtool's config: `base` (the config it was loaded from) with the
    model's keys written over it, so the keys mqtool does not model go out unchanged."""
    base = dict(base or {})
    ssm = config.ssm
    mt = base.get("model_type") or hf_model_type(base)
    falcon = ssm.get("bcdt_rms_eps") is not None
    if mt is None:
        mt = "mamba2" if config.layer == "Mamba2" else ("falcon_mamba" if falcon else "mamba")
    if (mt == "mamba2") != (config.layer == "Mamba2") or (mt == "falcon_mamba") != falcon:
        raise MqtoolError(f"cannot write a {config.layer} model as Hugging Face {mt!r}")
    if not config.rms_norm:
        raise MqtoolError("the Hugging Face Mamba classes use RMS norms; this model has LayerNorms")
    out = {**base, "model_type": mt, "architectures": [ARCHITECTURES[mt]],
           "hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
           "vocab_size": config.padded_vocab_size, "residual_in_fp32": config.residual_in_fp32,
           "tie_word_embeddings": config.tie_embeddings, "layer_norm_epsilon": config.norm_epsilon}
    table = _MAMBA2_SSM if mt == "mamba2" else _MAMBA1_SSM
    out.update({theirs: ssm[ours] for theirs, (ours, _) in table.items()})
    if mt != "mamba2" or "intermediate_size" in base:  # MambaConfig derives it; Mamba2Config has none
        out["intermediate_size"] = config.d_inner
    if mt == "mamba2":
        out["num_heads"] = config.d_inner // ssm["headdim"]
        out["time_step_limit"] = list(ssm["dt_limit"])
        if ssm["D_has_hdim"]:
            raise MqtoolError("the Hugging Face Mamba2 class has one D per head; this model has D per channel")
    else:
        out["time_step_rank"] = math.ceil(config.d_model / 16) if ssm["dt_rank"] == "auto" else int(ssm["dt_rank"])
    if mt == "falcon_mamba":
        out["mixer_rms_eps"] = ssm["bcdt_rms_eps"]
    if dtype is not None:  # transformers 4 reads torch_dtype, 5 reads dtype: keep whichever the file had
        key = "dtype" if "dtype" in base and "torch_dtype" not in base else "torch_dtype"
        out[key] = str(dtype).removeprefix("torch.")
    return out


def state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensor names -> mqtool's (mamba-ssm's)."""
    return {(_SS_EMBEDDING + k[len(_HF_EMBEDDING):] if k.startswith(_HF_EMBEDDING) else k): v
            for k, v in state.items()}


def state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mqtool's tensor names -> HF's."""
    return {(_HF_EMBEDDING + k[len(_SS_EMBEDDING):] if k.startswith(_SS_EMBEDDING) else k): v
            for k, v in state.items()}


def load_config(path: str | Path) -> tuple[MambaConfig, dict[str, Any] | None]:
    """A config.json in either layout: (mqtool's config, the HF dict when the file is HF layout, else None)."""
    path = Path(path)
    d = read_json(path)
    if hf_model_type(d) is None:
        return MambaConfig.load(path, d), None
    return config_from_hf(d), d


def write_config(path: Path, config: MambaConfig, layout: str, hf_base: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None) -> None:
    """config.json in the given layout (HF keys over `hf_base` for "hf")."""
    if layout == HF:
        path.write_text(json.dumps(config_to_hf(config, hf_base, dtype), indent=2) + "\n")
    elif layout == STATE_SPACES:
        config.save(path)
    else:
        raise MqtoolError(f"unknown checkpoint layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
