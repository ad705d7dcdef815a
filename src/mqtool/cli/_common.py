"""What the commands share: option types, consoles, and how a MODEL/TASK argument, a device and a dtype
are resolved and a checkpoint loaded."""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mqtool.errors import MqtoolError

err = Console(stderr=True)
out = Console()

ASSETS = Path(__file__).parent.parent / "assets"
DEMO_MODEL = ASSETS / "demo-mamba2"
DEMO_TEXT = ASSETS / "demo-eval.txt"
DEMO_CALIB = ASSETS / "demo-calib.txt"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="MQTOOL_DATA", help="Local data root laid out like shared/data "
                 "(wikitext-2-raw-v1/, c4/, techdocs/ ...). Default: $MQTOOL_DATA, else the hub."),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, or auto (cuda when available).")]
DTypeOpt = Annotated[DType, typer.Option(help="Compute dtype of weights and activations (SSM states stay float32).")]
CalibOpt = Annotated[Path | None, typer.Option("--calib", help="Calibration directory from `mqtool calibrate` "
                                               "run on this stage's input.")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write.")]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite OUTPUT if it exists.")]
# One meaning for --json in every command: a flag, the results as JSON on stdout (and nothing else
# there: the human table is not printed). A JSON *file* is --json-out PATH.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout (instead of the table).")]
JsonOutOpt = Annotated[Path | None, typer.Option("--json-out", help="Also write the results as JSON to this file.")]
JSON_FILE_COMMANDS = ("compare", "zeroshot")  # took `--json PATH` before --json-out existed


# Where a MODEL that is a hub id is downloaded from: `mqtool --revision R --token T COMMAND ...`
# (set by the root callback on every run; the token defaults to $HF_TOKEN, then huggingface-hub's login)
HUB: dict[str, str | None] = {"revision": None, "token": None}


def _model_spec(spec: str) -> str:
    return str(DEMO_MODEL) if spec == "demo" else spec


def _task_spec(task: str) -> str:
    return str(DEMO_TEXT) if task == "demo" else task


def _device(device: str):
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise MqtoolError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise MqtoolError(f"--device {device!r}: mqtool runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MqtoolError("--device cuda asked for, but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MqtoolError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def _dtype(dtype: DType):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype.value]


@contextmanager
def _progress(enabled: bool = True):
    """A transient progress bar on stderr, and nothing at all where stderr is not a terminal: in a
    pipe or a CI log rich cannot redraw a line, and a transient bar would leave a blank one. A
    FORCE_COLOR=1 log (rich then calls it a terminal) is not one either: only a real tty, or
    TTY_COMPATIBLE=1, gets a bar. stdout is never redirected into the bar's console: it stays data."""
    real_tty = sys.stderr.isatty() or os.environ.get("TTY_COMPATIBLE") == "1"
    enabled = enabled and err.is_terminal and real_tty
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True, disable=not enabled,
                  redirect_stdout=False) as p:
        yield p


def _load(spec: str, dtype: DType, device: str):
    import torch

    from mqtool.checkpoint import load_model

    if dtype == DType.float32:  # float32 means float32: no TF32 in matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    return load_model(_model_spec(spec), dtype=_dtype(dtype), device=_device(device), **HUB)


def _load_integer(spec: str, dtype: DType, device: str):
    """As `_load`, with the exported linears on the integer kernels (mqtool.runtime)."""
    import torch

    from mqtool.runtime import load_integer_model

    if dtype == DType.float32:  # as _load: no TF32 in the float parts
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return load_integer_model(_model_spec(spec), dtype=_dtype(dtype), device=_device(device), **HUB)


def _run_mode(mode: str, online: dict, recurrent: bool = False) -> str:
    """The evaluation mode: `auto` is recurrent when the states are quantized (or `recurrent` asks
    for it); parallel on a state-quantized model is refused, as the parallel scan has no state to quantize."""
    if mode == "auto":
        return "recurrent" if online.get("state_quantizer") or recurrent else "parallel"
    if mode == "parallel" and online.get("state_quantizer"):
        raise MqtoolError("this checkpoint quantizes the recurrent state, which the parallel scan would ignore: "
                          "use --mode recurrent (or auto), or evaluate the checkpoint before quantize-states")
    return mode


def _finite(obj):
    """`obj` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json(obj, indent: int | None = 2) -> str:
    """Strict JSON (a non-finite number becomes null, which every JSON reader takes)."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def _tokenizer(ckpt, data_dir: Path | None):
    """The checkpoint's tokenizer (or the GPT-NeoX fallback), refused when it has more tokens than
    the model has embeddings (every id past them would fail deep in the embedding)."""
    from mqtool.data import load_tokenizer

    tok = load_tokenizer(ckpt.path, data_dir)
    n, vocab = tok.vocab_size, ckpt.config.padded_vocab_size
    if n > vocab:
        if ckpt.tokenizer_path is None:
            raise MqtoolError(f"{ckpt.path} has no tokenizer.json, and the fallback GPT-NeoX tokenizer has {n} tokens, "
                              f"more than the model's vocabulary of {vocab}: put the model's tokenizer.json beside it")
        raise MqtoolError(f"{ckpt.tokenizer_path} has {n} tokens, more than the model's vocabulary of {vocab}")
    return tok


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]
