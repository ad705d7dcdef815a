"""Export for vLLM: a quantized Mamba-2 checkpoint in the compressed-tensors format, and back.

vLLM's `Mamba2ForCausalLM` reads a Hugging Face `mamba2` config.json whose `quantization_config`
(quant_method "compressed-tensors") says how each linear is stored. Its Mamba-2 mixer passes that
config to `in_proj` and `out_proj` only (conv1d and the SSM get none), and it applies nothing else
mqtool can attach at run time: no online Hadamard, no SSM-input quantizers (x, B, C, Δ), no state
quantizer, no S-SiLU or smoothing buffers. So a checkpoint exports only when what it computes is
(a) weights on mqtool's grid at in_proj / out_proj, and (b) optionally, dynamic per-token int8
activations at their inputs; everything else must have been fused offline (rotations are) or it is
refused with the reason. mqtool could describe an online Hadamard in compressed-tensors'
`transform_config`, but vLLM's support for it on Mamba-2 is unverified here, so it is refused too.

Formats, as compressed-tensors names them (one config group per distinct scheme):
  * W8A8, weights per output channel x activations dynamic per token: "int-quantized" — `weight`
    int8 ``[out, in]`` and `weight_scale` ``[out, 1]`` (vLLM's CompressedTensorsW8A8Int8);
  * weight-only W4 / W8 (per channel or per group): "pack-quantized" — `weight_packed` int32,
    `weight_scale` ``[out, 1]`` or ``[out, in / group_size]``, `weight_shape` (CompressedTensorsWNA16).
The tensors are made by compressed-tensors' own compressors from mqtool's dequantized weight
``q * scale`` and its scale (they round back to exactly q: the weight is on the grid), and
`quantization_config` is written by its ModelCompressor, so both follow that package's conventions.

compressed-tensors is an optional extra (``pip install "mqtool[serve]"``), imported only here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mqtool import hf_layout
from mqtool.errors import MqtoolError
from mqtool.models.config import MambaConfig
from mqtool.quant.weights import weight_codes

FORMAT = "compressed-tensors"
# what vLLM's MambaMixer2 builds with a quant_config (conv1d is a linear there too, but unquantized)
SERVED_LINEARS = ("in_proj", "out_proj")
# online transforms vLLM has no counterpart for, and the recipe stage that makes each
_UNSERVABLE_ONLINE = {
    "hadamard": "an online Hadamard (rotate's online_targets)",
    "ssm_act_quant": "SSM-input quantizers (quantize's ssm_activations)",
    "state_quantizer": "a state quantizer (quantize-states)",
    "s_silu": "S-SiLU (smooth)",
    "ssm_smooth": "SSM smoothing buffers (smooth)",
    "smooth_scale": "online smoothing scales (smooth)",
}
_PIP_HINT = 'the compressed-tensors format (vLLM) needs the compressed-tensors package: pip install "mqtool[serve]"'


def _require() -> Any:
    """The compressed-tensors module, or a one-line hint how to get it."""
    try:
        import compressed_tensors
    except ImportError:
        raise MqtoolError(_PIP_HINT) from None
    return compressed_tensors


def _kind(name: str) -> str:
    """`backbone.layers.3.mixer.in_proj.weight` -> `in_proj`."""
    return name.split(".")[-2]


def refusal(config: MambaConfig, specs: dict[str, dict[str, Any]], online: dict[str, Any]) -> str | None:
    """Why vLLM could not serve this quantized checkpoint as it computes, or None when it can."""
    if config.layer != "Mamba2":
        return ("vLLM does not quantize Mamba-1's linears (its MambaMixer builds in_proj, x_proj, dt_proj and "
                "out_proj without a quantization config); serve the full-precision model or use --format mqtool")
    for key in online:
        if key != "act_quant":
            what = _UNSERVABLE_ONLINE.get(key, f"the online transform {key!r}")
            return (f"the checkpoint needs {what} at run time, which vLLM does not apply; "
                    "use a recipe with rotations fused offline only (e.g. w8a8-serve)")
    others = sorted(n for n in specs if _kind(n) not in SERVED_LINEARS)
    if others:
        return f"vLLM quantizes only in_proj and out_proj of Mamba-2, but {others[0]} is quantized"
    act = online.get("act_quant")
    if act is not None:
        if act.get("mode", "per_token") != "per_token" or act.get("bits", 8) != 8:
            return (f"activations are {act.get('bits', 8)}-bit {act.get('mode')}; only dynamic per-token int8 "
                    "activations are exported")
        targets = set(act.get("targets", []))
        bare = sorted(t for t in targets if t in SERVED_LINEARS and not any(_kind(n) == t for n in specs))
        if bare:
            return f"activations at {bare[0]} are quantized but its weights are not; vLLM quantizes both or neither"
    for name, spec in specs.items():
        bits, gs = spec["bits"], spec.get("group_size")
        if bits not in (4, 8):
            return f"{name} has {bits}-bit weights; vLLM's compressed-tensors integer kernels take 4 or 8 bits"
        if act is not None and _kind(name) in act.get("targets", []):
            if bits != 8:
                return (f"{name}: W{bits}A8 is not exported (vLLM's int W8A8 path needs 8-bit weights); "
                        "use 8-bit weights, or weight-only 4 bits (W4A16)")
            if gs is not None:
                return f"{name}: W8A8 needs weights per output channel (vLLM's int8 W8A8), not groups of {gs}"
    return None


def module_schemes(specs: dict[str, dict[str, Any]], online: dict[str, Any]) -> dict[str, Any]:
    """Module name (`backbone.layers.0.mixer.in_proj`) -> its compressed-tensors QuantizationScheme
    (with its format), for every quantized weight in `specs` (checked with `refusal` first)."""
    _require()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    act_targets = set((online.get("act_quant") or {}).get("targets", []))
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        gs = spec.get("group_size")
        weights = QuantizationArgs(num_bits=spec["bits"], type="int", symmetric=True,
                                   strategy="group" if gs else "channel", group_size=gs)
        acts = None
        if _kind(name) in act_targets:
            acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        module = name[: -len(".weight")]
        out[module] = QuantizationScheme(targets=[module], weights=weights, input_activations=acts,
                                         format="int-quantized" if acts is not None else "pack-quantized")
    return out


def quantization_config(schemes: dict[str, Any], linears: list[str]) -> Any:
    """compressed-tensors' QuantizationConfig for the per-module `schemes`: one group per distinct
    scheme, targets ["Linear"] when one scheme covers every quantized module, else their names as
    anchored regexes; every other linear of the model (`linears`, lm_head included) is ignored."""
    _require()
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups: dict[str, list[str]] = {}
    by_key: dict[str, Any] = {}
    for module, scheme in schemes.items():
        key = json.dumps(scheme.model_dump(exclude={"targets"}), sort_keys=True, default=str)
        groups.setdefault(key, []).append(module)
        by_key[key] = scheme
    config_groups = {}
    for i, (key, modules) in enumerate(groups.items()):
        targets = ["Linear"] if len(groups) == 1 else [f"re:^{re.escape(m)}$" for m in modules]
        config_groups[f"group_{i}"] = QuantizationScheme(**{**by_key[key].model_dump(), "targets": targets})
    formats = {s.format for s in schemes.values()}
    ignore = sorted(set(linears) - set(schemes))
    return QuantizationConfig(config_groups=config_groups, ignore=ignore, quantization_status="compressed",
                              format=formats.pop() if len(formats) == 1 else "mixed-precision")


def compress_state(state: dict[str, Tensor], specs: dict[str, dict[str, Any]],
                   schemes: dict[str, Any]) -> dict[str, Tensor]:
    """`state` with every quantized weight replaced by what compressed-tensors' compressor for its
    scheme makes of it (its dequantized weight and mqtool's scale), under the module's name."""
    _require()
    from compressed_tensors.compressors import BaseCompressor

    out = dict(state)
    for module, scheme in schemes.items():
        name = f"{module}.weight"
        w = out.pop(name)
        if w.dtype != torch.float32:
            raise MqtoolError(f"{name} is stored in {str(w.dtype).removeprefix('torch.')}, which cannot hold its "
                              "quantized values exactly: quantize the model again with this mqtool")
        try:
            _, scale = weight_codes(w, specs[name])
        except MqtoolError as e:
            raise MqtoolError(f"{name}: {e}; it was changed after quantization, or the checkpoint is damaged") \
                from None
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        local = compressor.compress({"weight": w, "weight_scale": scale.float().contiguous()}, scheme)
        out.update({f"{module}.{k}": v.contiguous() for k, v in local.items()})
    return out


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == "Linear" or target == module


def read_compressed(state: dict[str, Tensor], qconfig: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Inverse of the export, with compressed-tensors' decompressors: the state dict with dequantized
    float32 weights, and mqtool's online transforms for the activations the config quantizes."""
    _require()
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    try:
        config = QuantizationConfig.model_validate({k: v for k, v in qconfig.items() if k != "version"})
    except ValueError as e:
        raise MqtoolError(f"config.json: quantization_config is not valid compressed-tensors "
                          f"({str(e).splitlines()[0]})") from None
    out = dict(state)
    modules = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".weight_scale")})
    act_kinds: set[str] = set()
    for module in modules:
        if any(_matches(module, t) for t in config.ignore or []):
            continue
        scheme = next((s for s in config.config_groups.values() if any(_matches(module, t) for t in s.targets)),
                      None)
        if scheme is None:
            raise MqtoolError(f"config.json: quantization_config has no group for {module}")
        fmt = scheme.format or config.format
        compressor = BaseCompressor.get_value_from_registry(fmt)
        local = {k[len(module) + 1:]: out.pop(k) for k in list(out) if k.startswith(f"{module}.")
                 and k[len(module) + 1:] in compressor.compression_param_names(scheme)}
        weights = compressor.decompress(local, scheme)
        out[f"{module}.weight"] = weights["weight"].float()
        if scheme.input_activations is not None:
            a = scheme.input_activations
            if not (a.num_bits == 8 and a.type == "int" and a.strategy == "token" and a.dynamic):
                raise MqtoolError(f"{module}: mqtool reads only dynamic per-token int8 activations back")
            act_kinds.add(module.split(".")[-1])
    online = {}
    if act_kinds:
        online["act_quant"] = {"targets": [t for t in SERVED_LINEARS if t in act_kinds], "bits": 8,
                               "mode": "per_token"}
    return out, online


def write_export(out: Path, config: MambaConfig, state: dict[str, Tensor], specs: dict[str, dict[str, Any]],
                 online: dict[str, Any], hf_base: dict[str, Any] | None, tokenizer_path: Path | None,
                 force: bool) -> Path:
    """Write the compressed-tensors checkpoint directory (HF layout, atomically): config.json with
    its quantization_config, model.safetensors, tokenizer.json. Refuses what vLLM cannot serve."""
    from safetensors.torch import save_file

    from mqtool.atomic import write_dir_atomic

    reason = refusal(config, specs, online)
    if reason is not None:
        raise MqtoolError(f"cannot export for vLLM: {reason}")
    _require()
    from compressed_tensors.compressors import ModelCompressor

    schemes = module_schemes(specs, online)
    linears = [k[: -len(".weight")] for k in state if _kind(k) in SERVED_LINEARS and k.endswith(".weight")]
    qconfig = quantization_config(schemes, linears + ["lm_head"])
    tensors = hf_layout.state_to_hf(compress_state(state, specs, schemes))
    # bfloat16: the int8 kernels produce bf16/fp16 (the float tensors stay float32 in the file, exact)
    hf = hf_layout.config_to_hf(config, {k: v for k, v in (hf_base or {}).items() if k != "quantization_config"},
                                torch.bfloat16)

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        if tokenizer_path is not None:
            (tmp / "tokenizer.json").write_bytes(Path(tokenizer_path).read_bytes())
            # without it AutoTokenizer (vLLM's) guesses the class from model_type; with it, tokenizer.json as is
            (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})
                                                       + "\n")

    return write_dir_atomic(Path(out).expanduser(), fill, replace=force)
