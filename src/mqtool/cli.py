"""The `mqtool` command line: arguments, progress and exit codes. No algorithms live here."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mqtool import __version__
from mqtool.errors import MqtoolError

app = typer.Typer(
    name="mqtool",
    help="Post-training quantization for Mamba-1 and Mamba-2 language models.\n\n"
    "Every stage reads a checkpoint directory and writes a new one, so stages chain in a shell "
    "pipeline. MODEL is a checkpoint directory, a Hugging Face repo id, or `demo` (the small "
    "embedded Mamba-2).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

ASSETS = Path(__file__).parent / "assets"
DEMO_MODEL = ASSETS / "demo-mamba2"
DEMO_TEXT = ASSETS / "demo-eval.txt"


class Mode(str, Enum):
    auto = "auto"
    parallel = "parallel"
    recurrent = "recurrent"


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


def _model_spec(spec: str) -> str:
    return str(DEMO_MODEL) if spec == "demo" else spec


def _task_spec(task: str) -> str:
    return str(DEMO_TEXT) if task == "demo" else task


def _device(device: str):
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MqtoolError("--device cuda asked for, but no CUDA device is available")
    return device


def _dtype(dtype: DType):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype.value]


@contextmanager
def _progress(enabled: bool = True):
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True, disable=not enabled) as p:
        yield p


def _load(spec: str, dtype: DType, device: str):
    import torch

    from mqtool.checkpoint import load_model

    if dtype == DType.float32:  # float32 means float32: no TF32 in matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    return load_model(_model_spec(spec), dtype=_dtype(dtype), device=_device(device))


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint directory, hub repo id, or `demo`.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: wikitext2, c4, techdocs-test, demo, "
                                       "or paths of local text files.")] = "wikitext2",
    seqlen: Annotated[int, typer.Option(min=2, help="Tokens per window.")] = 2048,
    mode: Annotated[Mode, typer.Option(help="parallel (chunked scan), recurrent (token by token through "
                                       "the state cache), or auto: recurrent when states are quantized.")] = Mode.auto,
    max_windows: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N windows "
                                                    "(a slice, for quick checks).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass.")] = 8,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")] = False,
) -> None:
    """Perplexity, GPTQ-style: non-overlapping windows, mean NLL over every predicted token."""
    from mqtool.data import eval_tokens, eval_windows, load_tokenizer
    from mqtool.evaluate.perplexity import perplexity

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if not task_list:
        raise MqtoolError("--tasks is empty")
    net, ckpt = _load(model, dtype, device)
    tok = load_tokenizer(ckpt.path, data_dir)
    run_mode = mode.value
    if run_mode == "auto":
        run_mode = "recurrent" if ckpt.manifest.online.get("state_quantizer") else "parallel"
    results = {}
    for task in task_list:
        ids = eval_tokens(_task_spec(task), tok, seqlen, data_dir)
        windows = eval_windows(ids, seqlen, max_windows=max_windows)
        if windows.shape[0] == 0:
            raise MqtoolError(f"{task}: fewer than {seqlen} tokens; lower --seqlen")
        with _progress(not json_out) as p:
            bar = p.add_task(f"{task} ({run_mode})", total=windows.shape[0])
            res = perplexity(net, windows, mode=run_mode, batch_size=batch_size,
                             on_batch=lambda k, bar=bar: p.advance(bar, k))
        results[task] = res.to_dict()
    if json_out:
        print(json.dumps({"model": model, "results": results}, indent=2))
        return
    table = Table(title=f"{model}  (seqlen {seqlen}, {dtype.value})")
    for col in ("task", "ppl", "windows", "tokens", "mode", "seconds"):
        table.add_column(col, justify="left" if col in ("task", "mode") else "right")
    for task, r in results.items():
        table.add_row(task, f"{r['ppl']:.3f}", str(r["windows"]), str(r["tokens"]), r["mode"], f"{r['seconds']:.1f}")
    out.print(table)


@app.command()
def calibrate(
    model: Annotated[str, typer.Argument(help="Checkpoint directory, hub repo id, or `demo`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Calibration directory to write.")],
    data: Annotated[str, typer.Option(help="wikitext2, c4, techdocs, demo, or a local text file.")] = "wikitext2",
    split: Annotated[str | None, typer.Option(help="Dataset split (default: the calibration split).")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Random windows.")] = 128,
    seqlen: Annotated[int, typer.Option(min=2)] = 2048,
    seed: int = 0,
    state_samples: Annotated[int, typer.Option(min=0, help="Windows run in recurrent mode for state "
                                               "statistics (0 = none).")] = 8,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    max_chars: Annotated[int, typer.Option(help="Read at most this many characters of the dataset.")] = 20_000_000,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    force: Annotated[bool, typer.Option(help="Overwrite OUTPUT if it exists.")] = False,
) -> None:
    """Activation, covariance and state statistics at every attachment point."""
    from mqtool.calibrate import calibrate as run_calibration
    from mqtool.checkpoint import check_output_dir
    from mqtool.data import calibration_windows, default_split, load_text, load_tokenizer

    check_output_dir(output, force, (_model_spec(model),))
    net, ckpt = _load(model, dtype, device)
    tok = load_tokenizer(ckpt.path, data_dir)
    source = _task_spec(data)
    if split is None and not Path(source).exists():
        split = default_split(source, "calibration")
    ids = tok.encode(load_text(source, split, data_dir, max_chars=max_chars))
    windows = calibration_windows(ids, samples, seqlen, seed)
    meta = {"model": model, "model_hash": ckpt.input_hash, "data": data, "split": split, "seed": seed}
    with _progress() as p:
        acts = p.add_task("activations", total=samples)
        states = p.add_task("states (recurrent)", total=min(state_samples, samples) and seqlen)
        calib = run_calibration(net, windows, meta, batch_size, state_samples,
                                on_batch=lambda what, k: p.advance(acts if what == "activations" else states,
                                                                   k if what == "activations" else k))
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent if output.parent.exists() else None))
    calib.save(tmp)
    if output.exists():
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(output)
    err.print(f"wrote {output} ({len(calib.stats)} statistics, {calib.meta['seconds']:.1f}s)")


@app.command()
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


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Checkpoint directory, hub repo id, or `demo`.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "The",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
) -> None:
    """Greedy generation with the recurrent state cache (works on quantized checkpoints)."""
    import torch

    from mqtool.data import load_tokenizer
    from mqtool.models import generate as greedy

    net, ckpt = _load(model, dtype, device)
    tok = load_tokenizer(ckpt.path, data_dir)
    ids = torch.tensor([tok.encode(prompt)], device=next(net.parameters()).device)
    if ids.numel() == 0:
        raise MqtoolError("--prompt is empty after tokenization")
    start = time.perf_counter()
    result = greedy(net, ids, max_new_tokens, eos_token_id=tok.eos_id)
    secs = time.perf_counter() - start
    out.print(tok.decode(result[0].tolist()), markup=False, highlight=False)
    err.print(f"{result.shape[1] - ids.shape[1]} tokens in {secs:.2f}s")


@app.command()
def info(model: Annotated[str, typer.Argument(help="Checkpoint directory, hub repo id, or `demo`.")]) -> None:
    """Show a checkpoint's config and manifest (stages applied, quantization, online transforms)."""
    from mqtool.checkpoint import load_checkpoint

    ckpt = load_checkpoint(_model_spec(model))
    n = sum(v.numel() for v in ckpt.state_dict.values())
    print(json.dumps({"path": str(ckpt.path), "layer": ckpt.config.layer, "parameters": n,
                      "config": ckpt.config.to_dict(), "manifest": ckpt.manifest.to_dict()}, indent=2))


def _version(value: bool) -> None:
    if value:
        print(f"mqtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False) -> None:
    pass


def main() -> None:
    """Console entry point: user errors print one line and exit 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except MqtoolError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and aborts carry their own exit codes
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise
