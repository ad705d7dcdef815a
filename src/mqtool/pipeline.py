"""Stages and recipes: the registry that maps a stage name and its parameters to a stage function,
and runs a recipe (an ordered list of stages) on a model in memory.

A recipe file (YAML or TOML) reads like llm-compressor's:

    name: w4a8-klt
    description: MambaQuant W4A8
    calibration: {data: wikitext2, samples: 128, seqlen: 2048}
    stages:
      - rotate: {method: klt}
      - smooth: {method: smooth-fused, alpha: 0.5}
      - quantize: {weights: {bits: 4, method: gptq}, activations: {bits: 8, mode: per_token}}
      # optional in quantize: ssm_activations: {bits: 8, mode: per_token, targets: [ssm_x, ssm_B, ssm_C]}

Stages that need statistics get a calibration of the model *as it is at that point* (recomputed
after every transform that changes activations), from the recipe's calibration data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import torch
import yaml

from mqtool.calibrate import Calibration, calibrate
from mqtool.errors import MqtoolError
from mqtool.models import MambaLMHeadModel
from mqtool.quant.reconstruct import apply_reconstruct
from mqtool.quant.rotate import apply_rotate
from mqtool.quant.smooth import apply_smooth
from mqtool.quant.state_stage import apply_quantize_states
from mqtool.quant.weights import apply_quantize

RECIPES_DIR = Path(__file__).parent / "recipes"


def _needs_calib_quantize(p: dict) -> bool:
    def get(key: str, setting: str):  # a malformed setting is apply_quantize's to refuse
        v = p.get(key)
        return v.get(setting) if isinstance(v, dict) else None

    return (get("weights", "method") == "gptq" or get("activations", "mode") == "per_tensor"
            or get("ssm_activations", "mode") == "per_tensor")


@dataclass(frozen=True)
class StageDef:
    fn: Callable[..., dict]
    params: tuple[str, ...]
    needs_calib: Callable[[dict], bool]
    needs_windows: bool = False
    help: str = ""
    # whether its calibration needs recurrent-mode state statistics (slow: a step loop), not only activations
    needs_states: Callable[[dict], bool] = lambda p: False
    # takes a calibration when there is one (given, or a recipe's to make), works without: quantize-states auto
    uses_calib: Callable[[dict], bool] = lambda p: False


STAGES: dict[str, StageDef] = {
    "rotate": StageDef(apply_rotate, ("method", "online_targets", "seed"), lambda p: p.get("method") == "klt",
                       help="fold norms, rotate the residual stream offline (hadamard | klt), online Hadamard"),
    "smooth": StageDef(apply_smooth, ("method", "alpha", "targets"), lambda p: True,
                       help="SmoothQuant or MambaQuant's smooth-fused scales, folded into weights",
                       needs_states=lambda p: isinstance(p.get("targets"), (list, tuple)) and "matmul" in p["targets"]),
    "quantize": StageDef(apply_quantize, ("weights", "activations", "targets", "ignore", "ssm_activations"),
                         _needs_calib_quantize, help="fake-quantize linear weights (rtn | gptq) and attach activation "
                         "quantizers (linear inputs; SSM inputs x, B, C with ssm_activations)"),
    "quantize-states": StageDef(apply_quantize_states, ("bits", "method", "channel_scale", "bits_budget"),
                                lambda p: p.get("bits_budget") is not None,
                                uses_calib=lambda p: p.get("method", "dsq") == "auto",
                                help="quantize the recurrent state cache (auto | dsq | per-channel | per-state | "
                                "per-tensor)"),
    "reconstruct": StageDef(apply_reconstruct,
                            ("epochs", "lr", "train", "batch_size", "seed", "holdout", "restore_worse"),
                            lambda p: False, needs_windows=True, help="Q-Mamba's ESR block-wise reconstruction"),
}

STATE_SAMPLES = 8  # windows run in recurrent mode when a stage needs state statistics
CALIB_KEYS = ("data", "split", "samples", "seqlen", "seed", "max_chars")
CALIB_DEFAULTS: dict[str, Any] = {"data": "wikitext2", "split": None, "samples": 128, "seqlen": 2048, "seed": 0,
                                  "max_chars": 20_000_000}


@dataclass
class Recipe:
    name: str
    stages: list[tuple[str, dict[str, Any]]]
    calibration: dict[str, Any] = field(default_factory=lambda: dict(CALIB_DEFAULTS))
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "calibration": self.calibration,
                "stages": [{name: params} for name, params in self.stages]}


def validate_stage(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    if name not in STAGES:
        raise MqtoolError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    params = dict(params or {})
    unknown = sorted(set(params) - set(STAGES[name].params))
    if unknown:
        raise MqtoolError(f"stage {name}: unknown parameters {unknown}; known: {', '.join(STAGES[name].params)}")
    return params


def parse_recipe(d: Any, name: str = "") -> Recipe:
    if not isinstance(d, dict):
        raise MqtoolError(f"recipe {name}: expected a mapping with 'stages'")
    unknown = sorted(set(d) - {"name", "description", "calibration", "stages"})
    if unknown:
        raise MqtoolError(f"recipe {name}: unknown keys {unknown} (known: name, description, calibration, stages)")
    stages_in = d.get("stages")
    if not isinstance(stages_in, list) or not stages_in:
        raise MqtoolError(f"recipe {name}: 'stages' must be a non-empty list")
    stages = []
    for i, entry in enumerate(stages_in):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise MqtoolError(f"recipe {name}: stage {i + 1} must be a mapping with one key, e.g. '- rotate: {{...}}'")
        (stage, params), = entry.items()
        stages.append((stage, validate_stage(stage, params)))
    calib = d.get("calibration") or {}
    if not isinstance(calib, dict):
        raise MqtoolError(f"recipe {name}: 'calibration' must be a mapping, got {calib!r}")
    unknown = sorted(set(calib) - set(CALIB_KEYS))
    if unknown:
        raise MqtoolError(f"recipe {name}: unknown calibration keys {unknown}; known: {', '.join(CALIB_KEYS)}")
    calib = {**CALIB_DEFAULTS, **calib}
    for key, least in (("samples", 1), ("seqlen", 2), ("max_chars", 1)):
        if isinstance(calib[key], bool) or not isinstance(calib[key], int) or calib[key] < least:
            raise MqtoolError(f"recipe {name}: calibration {key} must be an integer from {least}, got {calib[key]!r}")
    if isinstance(calib["seed"], bool) or not isinstance(calib["seed"], int) or calib["seed"] < 0:
        raise MqtoolError(f"recipe {name}: calibration seed must be a non-negative integer, got {calib['seed']!r}")
    if not isinstance(calib["data"], str) or not (calib["split"] is None or isinstance(calib["split"], str)):
        raise MqtoolError(f"recipe {name}: calibration data and split must be strings")
    for key in ("name", "description"):
        if key in d and not isinstance(d[key], str):
            raise MqtoolError(f"recipe {name}: {key} must be a string, got {d[key]!r}")
    return Recipe(d.get("name", name), stages, calib, d.get("description", ""))


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; recipes mean a number (YAML 1.2 and TOML agree)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_recipe(spec: str | Path) -> Recipe:
    """A shipped recipe by name (`mqtool recipes` lists them) or a user's YAML/TOML file."""
    path = Path(spec)
    if not path.exists():
        path = RECIPES_DIR / f"{spec}.yaml"
        if not path.exists():
            raise MqtoolError(f"unknown recipe {spec!r}: not a file, and not one of: {', '.join(available_recipes())}")
    try:
        text = path.read_text()
        d = tomllib.loads(text) if path.suffix == ".toml" else yaml.load(text, Loader=_RecipeLoader)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MqtoolError(f"{path}: cannot parse recipe ({' '.join(str(e).split())})") from None
    return parse_recipe(d, path.stem)


CalibrationSource = Callable[[MambaLMHeadModel], Calibration]
WindowSource = Callable[[], torch.Tensor]


def run_stage(model: MambaLMHeadModel, online: dict, name: str, params: dict[str, Any],
              calib: Calibration | CalibrationSource | None = None, windows: WindowSource | None = None,
              **extra: Any) -> dict:
    """Apply one stage in place. `calib` is a Calibration of the model as it is now, or a function
    that makes one (called only when the stage needs it)."""
    params = validate_stage(name, params)
    stage = STAGES[name]
    c = None
    if stage.needs_calib(params):
        if calib is None:
            raise MqtoolError(f"stage {name} with these parameters needs calibration statistics (--calib)")
        c = calib(model) if callable(calib) else calib
    elif stage.uses_calib(params) and calib is not None:
        c = calib(model) if callable(calib) else calib
    kwargs = dict(params)
    if stage.needs_windows:
        if windows is None:
            raise MqtoolError(f"stage {name} needs calibration windows")
        kwargs["windows"] = windows()
        kwargs.update(extra)
    return stage.fn(model, online, c, **kwargs)


def weight_specs(records: list[dict]) -> dict[str, Any]:
    """Per-tensor weight specs recorded by earlier `quantize` stages (stage records as in a
    manifest: {"stage", "params": {..., "record"}} or {"stage", "record"})."""
    specs: dict[str, Any] = {}
    for r in records:
        if r.get("stage") == "quantize":
            rec = r.get("record") or (r.get("params") or {}).get("record") or {}
            specs.update(rec.get("tensors", {}))
    return specs


def run_recipe(model: MambaLMHeadModel, online: dict, recipe: Recipe, windows: torch.Tensor,
               on_stage: Callable[[str, int, int], None] | None = None, **extra: Any) -> list[dict]:
    """Run every stage in order, recalibrating on `windows` [n, seqlen] before each stage that
    needs statistics. Returns one record per stage (for the manifest)."""
    records = []
    for i, (name, params) in enumerate(recipe.stages):
        if on_stage:
            on_stage(name, i, len(recipe.stages))

        # state samples only for a stage that reads them (a recurrent run costs a step loop)
        states = STATE_SAMPLES if STAGES[name].needs_states(params) or STAGES[name].uses_calib(params) else 0

        def calib_now(m: MambaLMHeadModel, states: int = states) -> Calibration:
            on_gpu = m.backbone.embedding.weight.is_cuda  # big batches: a step loop is launch-bound there
            return calibrate(m, windows, {"recipe": recipe.name}, batch_size=32 if on_gpu else 4,
                             state_samples=states)

        stage_extra = dict(extra) if STAGES[name].needs_windows else {}
        if name == "reconstruct":  # keep weights quantized earlier in the recipe on their grid
            stage_extra.setdefault("weight_specs", weight_specs(records))
        rec = run_stage(model, online, name, params, calib=calib_now, windows=lambda: windows, **stage_extra)
        records.append({"stage": name, "params": params, "record": rec})
    return records
