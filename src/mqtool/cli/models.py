"""Commands around a model that are neither a stage nor a measurement: init (make one), generate (run one),
info (describe one) and recipes (list what `quantize --recipe` accepts)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mqtool.cli._common import (
    HUB,
    DataDirOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    _device,
    _dtype,
    _load,
    _model_spec,
    _tokenizer,
    err,
    out,
)
from mqtool.errors import MqtoolError


def init(
    shape: Annotated[str, typer.Argument(help="A preset (mamba-130m ... mamba-2.8b, mamba2-130m ... mamba2-2.7b, "
                                         "tiny-mamba1, tiny-mamba2) or a config.json path.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write.")],
    seed: int = 0,
    dtype: Annotated[DType, typer.Option(help="Storage dtype.")] = DType.float32,
    device: Annotated[str, typer.Option(help="Where to initialise (cuda is much faster for large shapes).")] = "cpu",
    force: bool = False,
) -> None:
    """Write a random-init checkpoint in the state-spaces layout (for tests and timing)."""
    import torch

    from mqtool.checkpoint import Manifest, build_model, check_output_dir, model_state_dict, save_checkpoint
    from mqtool.models.config import MambaConfig, config_from_name

    check_output_dir(output, force)
    config = MambaConfig.load(shape) if shape.endswith(".json") else config_from_name(shape)
    torch.manual_seed(seed)
    model = build_model(config, dtype=_dtype(dtype), device=_device(device))
    save_checkpoint(output, config, model_state_dict(model), Manifest(source=f"random init {shape} seed {seed}"),
                    force=force)
    n = sum(p.numel() for p in model.parameters())
    err.print(f"wrote {output} ({config.layer}, {n / 1e6:.1f}M parameters)")


def generate(
    model: Annotated[str, typer.Argument(help="Checkpoint directory, hub repo id, or `demo`.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "The",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
) -> None:
    """Greedy generation through the decode runtime: the state cache in its stored form (codes and
    scales for a state-quantized checkpoint), one CUDA graph a step on a GPU."""
    import torch

    from mqtool.runtime import Runtime

    net, ckpt = _load(model, dtype, device)
    tok = _tokenizer(ckpt, data_dir)
    ids = torch.tensor([tok.encode(prompt)], device=next(net.parameters()).device)
    if ids.numel() == 0:
        raise MqtoolError("--prompt is empty after tokenization")
    start = time.perf_counter()
    result = Runtime(net).generate(ids, max_new_tokens, eos_token_id=tok.eos_id)
    secs = time.perf_counter() - start
    out.print(tok.decode(result[0].tolist()), markup=False, highlight=False)
    err.print(f"{result.shape[1] - ids.shape[1]} tokens in {secs:.2f}s")


def info(model: Annotated[str, typer.Argument(help="Checkpoint directory, hub repo id, or `demo`.")]) -> None:
    """Show a checkpoint's config and manifest (stages applied, quantization, online transforms)."""
    from mqtool.checkpoint import load_checkpoint

    ckpt = load_checkpoint(_model_spec(model), **HUB)
    n = sum(v.numel() for v in ckpt.state_dict.values())
    print(json.dumps({"path": str(ckpt.path), "layer": ckpt.config.layer, "parameters": n,
                      "config": ckpt.config.to_dict(), "manifest": ckpt.manifest.to_dict()}, indent=2))


def recipes() -> None:
    """List the shipped recipes."""
    from mqtool.pipeline import available_recipes, load_recipe

    table = Table(title="recipes (mqtool quantize MODEL --recipe NAME)")
    table.add_column("name")
    table.add_column("stages")
    table.add_column("description")
    for name in available_recipes():
        r = load_recipe(name)
        table.add_row(name, " → ".join(s for s, _ in r.stages), r.description)
    out.print(table)
