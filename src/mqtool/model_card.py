"""The model card (README.md) written into every checkpoint directory: where the model came from,
the recipe, every stage with its parameters, what inference must apply, and perplexities where a
stage or command measured them. Made from the manifest alone, so it never disagrees with mqtool.json
(which stays the contract: the card is for people and the hub's model page)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mqtool import __version__
from mqtool.models import MambaConfig

README = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_VALUE = 160  # characters of one parameter's value; a long one (a data description) is cut
_PPL_KEY = re.compile(r"(^|_)(ppl|perplexity)($|_)")


def _value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, separators=(", ", ": "), default=str)
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 1] + "…"


def _params(stage: str, params: dict[str, Any]) -> str:
    """`key=value, …` without the stage's run record (losses, timings: mqtool.json keeps them); of a
    training run (the model's origin, not a transform of it) only the plain numbers and strings."""
    shown = {k: v for k, v in params.items() if k not in ("record", "recipe") and v is not None
             and (stage != "train" or isinstance(v, (int, float, str)))}
    return ", ".join(f"`{k}={_value(v)}`" for k, v in shown.items()) or "(defaults)"


def recorded_perplexities(stages: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """(where, key, value) for every number a stage recorded under a perplexity-like name
    (e.g. the demo model's training run: `eval_ppl_fp32`, the base model's)."""
    found = []
    for i, s in enumerate(stages, 1):
        params = s.get("params", {})
        for where in (params, params.get("record") if isinstance(params.get("record"), dict) else {}):
            for k, v in where.items():
                if _PPL_KEY.search(k) and isinstance(v, (int, float)) and not isinstance(v, bool):
                    found.append((f"stage {i} ({s['stage']})", k, float(v)))
    return found


def render(config: MambaConfig, manifest, perplexity: dict[str, float] | None = None) -> str:
    """The card's markdown. `manifest` is a checkpoint.Manifest; `perplexity` maps a task name to
    the perplexity the writing command measured on this very checkpoint (none: the section lists
    only what the history recorded, or is left out)."""
    source = manifest.source or "unknown"
    recipes = sorted({s["params"]["recipe"] for s in manifest.stages if isinstance(s.get("params"), dict)
                      and isinstance(s["params"].get("recipe"), str)})
    front = ["---", "library_name: mqtool", "tags: [mamba, mqtool" + (", quantized" if _quantized(manifest) else "")
             + "]"]
    repo = source.split("@", 1)[0]  # owner/name@revision: the hub's base_model is the repo
    if _REPO_ID.match(repo) and not repo.endswith(".py") and not Path(repo).exists():  # a hub id
        front.append(f"base_model: {repo}")
    front.append("---")
    lines = [*front, "", f"# {config.layer} model written by mqtool {__version__}", "",
             f"- Base model: `{source}`",
             f"- Shape: {config.layer}, d_model {config.d_model}, n_layer {config.n_layer}, "
             f"vocab {config.vocab_size}",
             f"- Layout: {manifest.layout}" + (" (exported: integer codes + scales)" if manifest.exported else ""),
             "- Recipe: " + (", ".join(f"`{r}`" for r in recipes) if recipes else "none (stages run one by one)"),
             "", "## Stages", ""]
    if manifest.stages:
        for i, s in enumerate(manifest.stages, 1):
            lines.append(f"{i}. **{s['stage']}**: {_params(s['stage'], s.get('params', {}))}")
    else:
        lines.append("None: the weights are as they came.")
    if manifest.online:
        lines += ["", "## Applied at inference", "",
                  "What mqtool applies at run time (mqtool.json `online`): "
                  + ", ".join(f"`{k}`" for k in sorted(manifest.online)) + "."]
    measured = [(f"this checkpoint ({task})", "ppl", v) for task, v in (perplexity or {}).items()]
    measured += recorded_perplexities(manifest.stages)
    if measured:
        lines += ["", "## Measured perplexity", "", "| where | what | perplexity |", "|---|---|---:|"]
        lines += [f"| {where} | {what} | {v:.3f} |" for where, what, v in measured]
    lines += ["", "## Use", "", "```", "mqtool info DIR", "mqtool eval DIR --tasks wikitext2", "```", "",
              "The full record (every stage's parameters, input hash and run record) is in `mqtool.json`.", ""]
    return "\n".join(lines)


def _quantized(manifest) -> bool:
    return manifest.exported or any(s["stage"] in ("quantize", "quantize-states") for s in manifest.stages)
