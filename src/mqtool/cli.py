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
DEMO_CALIB = ASSETS / "demo-calib.txt"


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
    kernels: Annotated[bool, typer.Option("--kernels", help="Run the exported linears on the integer kernels "
                                          "(an `mqtool export` checkpoint with 8-bit activations).")] = False,
) -> None:
    """Perplexity, GPTQ-style: non-overlapping windows, mean NLL over every predicted token."""
    from mqtool.data import eval_tokens, eval_windows, load_tokenizer
    from mqtool.evaluate.perplexity import perplexity

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if not task_list:
        raise MqtoolError("--tasks is empty")
    net, ckpt = (_load_integer if kernels else _load)(model, dtype, device)
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


class Backend(str, Enum):
    builtin = "builtin"
    lm_eval = "lm-eval"


@app.command()
def zeroshot(
    model: Annotated[str, typer.Argument(help="Checkpoint directory, hub repo id, or `demo`.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: piqa, arc_easy, arc_challenge, openbookqa, hellaswag, "
                                       "winogrande, lambada_openai.")]
    = "piqa,arc_easy,arc_challenge,openbookqa,hellaswag,winogrande,lambada_openai",
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N examples of each task.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per forward pass.")] = 16,
    mode: Annotated[Mode, typer.Option(help="parallel, recurrent, or auto: recurrent when states are quantized.")]
    = Mode.auto,
    backend: Annotated[Backend, typer.Option(help="builtin (mqtool's scorer) or lm-eval (lm-eval's task definitions "
                                             "through the adapter; pip install mqtool[eval]).")] = Backend.builtin,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
) -> None:
    """Zero-shot accuracy as lm-eval scores it (acc, acc_norm; LAMBADA acc and perplexity), from the
    task files in <data root>/zeroshot."""
    from mqtool.data import load_tokenizer
    from mqtool.evaluate import zeroshot as zs

    names = zs.parse_tasks(tasks)
    zs.zeroshot_dir(data_dir)  # fail before loading the model
    net, ckpt = _load(model, dtype, device)
    tok = load_tokenizer(ckpt.path, data_dir)
    run_mode = mode.value
    if run_mode == "auto":
        run_mode = "recurrent" if ckpt.manifest.online.get("state_quantizer") else "parallel"
    if backend == Backend.lm_eval:
        from mqtool.evaluate.lm_eval_adapter import evaluate_tasks

        results = evaluate_tasks(net, tok, names, data_dir, limit, batch_size, run_mode)
    else:
        results = {}
        for name in names:
            task = zs.load_task(name, data_dir, limit)
            with _progress() as p:
                bar = p.add_task(f"{name} ({run_mode})", total=task.n_requests)
                results[name] = zs.evaluate(net, tok, task, batch_size, run_mode,
                                            on_batch=lambda k, bar=bar: p.advance(bar, k))
    first = f", first {limit} examples" if limit else ""
    table = Table(title=f"{model}: zero-shot ({dtype.value}, {run_mode}, {backend.value}{first})")
    for col in ("task", "metric", "value", "±", "n"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, r in results.items():
        for metric, value in r.metrics.items():
            se = r.stderr.get(metric)
            shown = f"{value:.2f}" if metric == "perplexity" else f"{value:.4f}"
            table.add_row(name, metric, shown, "" if se is None else f"{se:.4f}", str(r.n))
    out.print(table)
    if json_path:
        json_path.write_text(json.dumps({"model": model, "backend": backend.value, "mode": run_mode,
                                         "dtype": dtype.value, "limit": limit,
                                         "results": {k: r.to_dict() for k, r in results.items()}}, indent=2) + "\n")


def _load_integer(spec: str, dtype: DType, device: str):
    """As `_load`, with the exported linears on the integer kernels (mqtool.runtime)."""
    import torch

    from mqtool.runtime import load_integer_model

    if dtype == DType.float32:  # as _load: no TF32 in the float parts
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return load_integer_model(_model_spec(spec), dtype=_dtype(dtype), device=_device(device))


@app.command()
def bench(
    model: Annotated[str, typer.Argument(help="Checkpoint directory, hub repo id, or `demo`.")],
    batch: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 1,
    prompt_len: Annotated[int, typer.Option(min=1, help="Prefill tokens per sequence.")] = 512,
    gen_len: Annotated[int, typer.Option(min=1, help="Decode steps (one token per sequence each).")] = 128,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    kernels: Annotated[bool, typer.Option("--kernels/--no-kernels", help="Integer kernels (exported "
                                          "checkpoints) or the simulated model.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")] = False,
) -> None:
    """Time prefill and decode on random tokens (no data needed); report memory and weight bytes."""
    from mqtool.runtime import benchmark

    net, _ = (_load_integer if kernels else _load)(model, dtype, device)
    res = {"model": model, **benchmark(net, batch=batch, prompt_len=prompt_len, gen_len=gen_len)}
    if json_out:
        print(json.dumps(res, indent=2))
        return
    backend = res["kernel_backend"] or "simulated"
    table = Table(title=f"{model}  ({res['layer']}, {res['dtype']}, {res['device']}, {backend})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    mib = 2**20
    for label, value in (
        (f"prefill {batch} x {prompt_len}", f"{res['prefill_seconds'] * 1000:.1f} ms, "
                                            f"{res['prefill_tokens_per_s']:,.0f} tok/s"),
        (f"decode {gen_len} steps", f"{res['decode_ms_per_step']:.2f} ms/step, "
                                    f"{res['decode_tokens_per_s']:,.0f} tok/s"),
        ("weights", f"{res['weight_bytes'] / mib:.2f} MiB"),
        ("state cache", f"{res['state_cache_bytes'] / mib:.3f} MiB"),
        (f"peak memory ({res['peak_memory_kind']})", f"{res['peak_memory_bytes'] / mib:.2f} MiB"),
    ):
        table.add_row(label, value)
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
                                on_batch=lambda what, k: p.advance(acts if what == "activations" else states, k))
    calib.save_atomic(output)
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


# ------------------------------------------------------------------------------------ stages

CalibOpt = Annotated[Path | None, typer.Option("--calib", help="Calibration directory from `mqtool calibrate` "
                                               "run on this stage's input.")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write.")]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite OUTPUT if it exists.")]


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _check_stage_allowed(manifest, stage: str) -> None:
    if manifest.exported:
        raise MqtoolError(f"this checkpoint is exported (packed integers); `{stage}` needs a simulated one")
    done = manifest.stage_names()
    if stage in ("rotate", "smooth") and ("quantize" in done or manifest.online.get("act_quant")
                                          or manifest.online.get("ssm_act_quant")):
        raise MqtoolError(f"`{stage}` after `quantize` is meaningless (weights are already quantized); "
                          "rotate and smooth before quantizing")


def _stage_command(model: str, output: Path, stage: str, params: dict, calib_dir: Path | None, force: bool,
                   dtype: DType, device: str, windows=None, extra: dict | None = None) -> None:
    from mqtool.calibrate import Calibration
    from mqtool.checkpoint import check_output_dir, model_state_dict, record_stage, save_checkpoint
    from mqtool.pipeline import run_stage

    src = _model_spec(model)
    check_output_dir(output, force, (src,))
    net, ckpt = _load(model, dtype, device)
    _check_stage_allowed(ckpt.manifest, stage)
    calib = None
    if calib_dir is not None:
        calib = Calibration.load(calib_dir)
        want = calib.meta.get("model_hash")
        if want and want != ckpt.input_hash:
            raise MqtoolError(f"{calib_dir} was computed on another checkpoint (hash {want}, this one "
                              f"{ckpt.input_hash}): run `mqtool calibrate {model}` first")
    online = dict(ckpt.manifest.online)
    start = time.perf_counter()
    record = run_stage(net, online, stage, params, calib=calib, windows=windows, **(extra or {}))
    manifest = record_stage(ckpt.manifest, stage, {**params, "record": record}, ckpt.input_hash)
    manifest.online = online
    save_checkpoint(output, net.config, model_state_dict(net), manifest, ckpt.tokenizer_path, force=force)
    err.print(f"{stage}: wrote {output} in {time.perf_counter() - start:.1f}s")


@app.command()
def rotate(
    model: Annotated[str, typer.Argument(help="Input checkpoint.")],
    output: OutOpt,
    method: Annotated[str, typer.Option(help="hadamard (QuaRot) or klt (MambaQuant: H_K = K H, needs --calib).")]
    = "klt",
    online: Annotated[str, typer.Option(help="Linears that get an online Hadamard at their input "
                                        "(out_proj; x_proj for Mamba-1); '' for none.")] = "out_proj",
    seed: Annotated[int, typer.Option(help="Seed of the random Hadamard signs.")] = 0,
    calib: CalibOpt = None,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Fold norms and rotate (offline where the rotation fuses into weights, online elsewhere)."""
    _stage_command(model, output, "rotate", {"method": method, "online_targets": _split(online) or [],
                                             "seed": seed}, calib, force, dtype, device)


@app.command()
def smooth(
    model: Annotated[str, typer.Argument(help="Input checkpoint.")],
    output: OutOpt,
    calib: CalibOpt = None,
    method: Annotated[str, typer.Option(help="smoothquant, or smooth-fused (MambaQuant: S-SiLU and "
                                        "norm-absorbed scales before the online Hadamard).")] = "smoothquant",
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Migration strength.")] = 0.5,
    targets: Annotated[str | None, typer.Option(help="Comma-separated linears (default: in_proj, x_proj, "
                                                "dt_proj, out_proj; also lm_head), and `ssm` for the SSM's "
                                                "input (smooth-fused only).")] = None,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Per-channel smoothing scales migrated into weights (the model's function is unchanged)."""
    params: dict = {"method": method, "alpha": alpha}
    if targets:
        params["targets"] = _split(targets)
    _stage_command(model, output, "smooth", params, calib, force, dtype, device)


@app.command("quantize-states")
def quantize_states(
    model: Annotated[str, typer.Argument(help="Input checkpoint.")],
    output: OutOpt,
    bits: Annotated[int, typer.Option(help="State bits: 8, 6, 4 (16 = off).")] = 4,
    method: Annotated[str, typer.Option(help="auto (what measured best at 4 bits on both families: DSQ with the "
                                        "abs.max channel scale), dsq (Q-Mamba), per-channel, per-state, "
                                        "per-tensor.")] = "auto",
    channel_scale: Annotated[str | None, typer.Option(help="DSQ channel scale: abs.mean.sqrt (paper; the default "
                                                      "for --method dsq), abs.mean, abs.max, abs.max.sqrt.")] = None,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Quantize the recurrent state cache (applied at every step; `mqtool eval` then runs recurrent)."""
    _stage_command(model, output, "quantize-states", {"bits": bits, "method": method,
                                                      "channel_scale": channel_scale}, None, force, dtype, device)


def _calib_windows(net, ckpt, data: str, split: str | None, samples: int, seqlen: int, seed: int,
                   data_dir: Path | None, max_chars: int = 20_000_000):
    from mqtool.data import calibration_windows, default_split, load_text, load_tokenizer

    tok = load_tokenizer(ckpt.path, data_dir)
    source = _task_spec(data)
    if split is None and not Path(source).exists():
        split = default_split(source, "calibration")
    return calibration_windows(tok.encode(load_text(source, split, data_dir, max_chars=max_chars)), samples, seqlen,
                               seed)


@app.command()
def reconstruct(
    model: Annotated[str, typer.Argument(help="Input checkpoint with a state quantizer (`quantize-states`).")],
    output: OutOpt,
    calib_data: Annotated[str, typer.Option(help="wikitext2, c4, techdocs, demo, or a text file.")] = "wikitext2",
    samples: Annotated[int, typer.Option(min=1)] = 128,
    seqlen: Annotated[int, typer.Option(min=2)] = 2048,
    epochs: Annotated[int, typer.Option(min=1)] = 3,
    lr: float = 1e-3,
    train: Annotated[str, typer.Option(help="What learns: dt,B,C (SGA default) plus conv, norm.")] = "dt,B,C",
    batch_size: Annotated[int, typer.Option(min=1)] = 1,
    seed: int = 0,
    holdout: Annotated[int | None, typer.Option(min=0, help="Calibration windows kept out of training (default "
                                                "samples // 8): a block whose loss on them does not fall is "
                                                "restored. 0: decide on the training windows.")] = None,
    restore_worse: Annotated[bool, typer.Option(
        "--restore-worse/--keep-worse",
        help="Restore a block that training made worse (--keep-worse: keep every trained block, as the paper does).",
    )] = True,
    state_dir: Annotated[Path | None, typer.Option(help="Where progress is kept so an interrupted run resumes "
                                                   "(default: OUTPUT.esr-state beside OUTPUT).")] = None,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    force: ForceOpt = False,
) -> None:
    """Q-Mamba's ESR: block-wise reconstruction of the Δ, B, C projections against the FP model."""
    import shutil

    from mqtool.checkpoint import check_output_dir
    from mqtool.pipeline import weight_specs

    check_output_dir(output, force, (_model_spec(model),))
    net, ckpt = _load(model, dtype, device)
    windows = _calib_windows(net, ckpt, calib_data, None, samples, seqlen, seed, data_dir)
    del net
    sdir = state_dir or output.parent / f"{output.name}.esr-state"
    with _progress() as p:
        bar = p.add_task("ESR blocks", total=ckpt.config.n_layer)

        def on_block(i, n, rec):
            p.update(bar, completed=i + 1)
            held = (f", held-out {rec['holdout_loss_before']:.4g} -> {rec['holdout_loss_after']:.4g}"
                    if "holdout_loss_before" in rec else "")
            err.print(f"block {i}: loss {rec['loss_before']:.4g} -> {rec['loss_after']:.4g}{held}"
                      + ("" if rec["kept"] else " (worse: restored)"))

        _stage_command(model, output, "reconstruct",
                       {"epochs": epochs, "lr": lr, "train": _split(train), "batch_size": batch_size, "seed": seed,
                        "holdout": holdout, "restore_worse": restore_worse},
                       None, force, dtype, device, windows=lambda: windows,
                       extra={"state_dir": sdir, "on_block": on_block,
                              "weight_specs": weight_specs(ckpt.manifest.stages)})
    shutil.rmtree(sdir, ignore_errors=True)


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Input checkpoint, hub repo id, or `demo`.")],
    output: OutOpt,
    recipe: Annotated[str | None, typer.Option(help="A shipped recipe (`mqtool recipes`) or a YAML/TOML file: "
                                               "runs every stage in memory.")] = None,
    weights: Annotated[int | None, typer.Option(help="Without --recipe: weight bits (8 or 4).")] = None,
    weight_method: Annotated[str, typer.Option(help="rtn or gptq (needs --calib).")] = "rtn",
    group_size: Annotated[int | None, typer.Option(help="Weight group size (default per channel).")] = None,
    acts: Annotated[int | None, typer.Option(help="Without --recipe: activation bits (8), or none.")] = None,
    act_mode: Annotated[str, typer.Option(help="per_token (dynamic) or per_tensor (static, needs --calib).")]
    = "per_token",
    ssm_acts: Annotated[int | None, typer.Option(help="Without --recipe: bits of the quantizers at the SSM's inputs "
                                                 "x, B, C (8 = int8, as MambaQuant), or none.")] = None,
    ssm_act_mode: Annotated[str, typer.Option(help="For --ssm-acts: per_token (dynamic) or per_tensor (static, "
                                              "needs --calib).")] = "per_token",
    ssm_targets: Annotated[str | None, typer.Option(help="For --ssm-acts: comma-separated SSM inputs (default "
                                                    "ssm_x,ssm_B,ssm_C; adding ssm_dt quantizes the step size Δ, "
                                                    "which usually hurts).")] = None,
    calib: CalibOpt = None,
    samples: Annotated[int | None, typer.Option(help="Override the recipe's calibration samples.")] = None,
    seqlen: Annotated[int | None, typer.Option(help="Override the recipe's calibration seqlen.")] = None,
    calib_data: Annotated[str | None, typer.Option(help="Override the recipe's calibration data.")] = None,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run a whole recipe, or quantize linear weights/activations and the SSM's inputs with the given flags."""
    if recipe is None:
        if weights is None and acts is None and ssm_acts is None:
            raise MqtoolError("give --recipe NAME, or --weights BITS, --acts BITS and/or --ssm-acts BITS")
        params: dict = {}
        if weights is not None:
            params["weights"] = {"bits": weights, "method": weight_method, "group_size": group_size}
        if acts is not None:
            params["activations"] = {"bits": acts, "mode": act_mode}
        if ssm_acts is not None:
            params["ssm_activations"] = {"bits": ssm_acts, "mode": ssm_act_mode}
            if ssm_targets is not None:
                params["ssm_activations"]["targets"] = _split(ssm_targets)
        _stage_command(model, output, "quantize", params, calib, force, dtype, device)
        return
    from mqtool.checkpoint import check_output_dir, model_state_dict, record_stage, save_checkpoint
    from mqtool.pipeline import load_recipe

    rec = load_recipe(recipe)
    check_output_dir(output, force, (_model_spec(model),))
    net, ckpt = _load(model, dtype, device)
    _check_stage_allowed(ckpt.manifest, rec.stages[0][0])
    records, seconds = _run_recipe(net, ckpt, rec, samples, seqlen, calib_data, data_dir)
    manifest = ckpt.manifest
    for r in records:
        manifest = record_stage(manifest, r["stage"], {**r["params"], "record": r["record"], "recipe": rec.name},
                                ckpt.input_hash)
    if records:
        manifest.online = records[-1]["online"]
    save_checkpoint(output, net.config, model_state_dict(net), manifest, ckpt.tokenizer_path, force=force)
    err.print(f"recipe {rec.name}: wrote {output} in {seconds:.1f}s")


def _run_recipe(net, ckpt, rec, samples, seqlen, calib_data, data_dir, quiet: bool = False):
    """Runs a recipe in memory; returns (records with the final online dict, seconds)."""
    from mqtool.pipeline import STAGES, run_recipe

    c = dict(rec.calibration)
    for key, val in (("samples", samples), ("seqlen", seqlen), ("data", calib_data)):
        if val is not None:
            c[key] = val
    needs = any(STAGES[n].needs_calib(p) or STAGES[n].needs_windows for n, p in rec.stages)
    windows = None
    if needs:
        windows = _calib_windows(net, ckpt, c["data"], c["split"], c["samples"], c["seqlen"], c["seed"], data_dir,
                                 c["max_chars"])
    online = dict(ckpt.manifest.online)
    start = time.perf_counter()
    with _progress(not quiet) as p:
        bar = p.add_task(f"recipe {rec.name}", total=len(rec.stages))
        records = run_recipe(net, online, rec, windows, on_stage=lambda name, i, n: (
            p.update(bar, completed=i, description=f"{rec.name}: {name}")))
    for r in records:
        r["online"] = online
    return records, time.perf_counter() - start


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="A quantized (simulated) checkpoint.")],
    output: OutOpt,
    force: ForceOpt = False,
) -> None:
    """Pack quantized weights as integer codes + scales (int8; int4 two to a byte), the form the
    integer kernels consume. Loading the export gives exactly the simulated model's weights."""
    from mqtool.checkpoint import check_output_dir, checkpoint_hash, load_checkpoint, record_stage, save_checkpoint
    from mqtool.pipeline import weight_specs
    from mqtool.quant.export import export_state_dict

    src = _model_spec(model)
    check_output_dir(output, force, (src,))
    ckpt = load_checkpoint(src)
    if ckpt.manifest.exported:
        raise MqtoolError(f"{model} is already exported")
    specs = weight_specs(ckpt.manifest.stages)
    if not specs:
        raise MqtoolError(f"{model} has no quantized weights to export: run `mqtool quantize` first")
    state = export_state_dict(ckpt.state_dict, specs)
    manifest = record_stage(ckpt.manifest, "export", {"tensors": len(specs)}, checkpoint_hash(ckpt.path))
    manifest.exported = True
    manifest.quant["weights"] = specs
    save_checkpoint(output, ckpt.config, state, manifest, ckpt.tokenizer_path, force=force)
    before = sum(v.numel() * v.element_size() for v in ckpt.state_dict.values())
    after = sum(v.numel() * v.element_size() for v in state.values())
    err.print(f"export: wrote {output} ({len(specs)} quantized tensors; weights {before / 2**20:.1f} MiB -> "
              f"{after / 2**20:.1f} MiB)")


@app.command()
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


@app.command()
def compare(
    model: Annotated[str, typer.Argument(help="Checkpoint (full precision), hub repo id, or `demo`.")],
    recipes_: Annotated[str, typer.Option("--recipes", help="Comma-separated recipe names or files.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated perplexity tasks.")] = "wikitext2,c4",
    seqlen: Annotated[int, typer.Option(min=2, help="Evaluation window.")] = 2048,
    max_windows: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N windows.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    samples: Annotated[int | None, typer.Option(help="Override every recipe's calibration samples.")] = None,
    calib_seqlen: Annotated[int | None, typer.Option(help="Override every recipe's calibration seqlen.")] = None,
    calib_data: Annotated[str | None, typer.Option(help="Override every recipe's calibration data.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Also write the table as markdown here.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
) -> None:
    """Run each recipe on MODEL and tabulate perplexity, full precision first (the papers' Table 1 shape).
    Recipes with a state quantizer are evaluated in recurrent mode, the rest in parallel mode."""
    from mqtool.data import eval_tokens, eval_windows, load_tokenizer
    from mqtool.evaluate.perplexity import perplexity
    from mqtool.pipeline import load_recipe

    names = _split(recipes_) or []
    recs = [load_recipe(n) for n in names]  # fail on a bad name before any work
    task_list = _split(tasks) or []
    net, ckpt = _load(model, dtype, device)
    tok = load_tokenizer(ckpt.path, data_dir)
    windows = {t: eval_windows(eval_tokens(_task_spec(t), tok, seqlen, data_dir), seqlen, max_windows=max_windows)
               for t in task_list}
    rows = []

    def evaluate(label: str, m, mode: str, extra: dict) -> None:
        row = {"recipe": label, "mode": mode, **extra}
        for t in task_list:
            with _progress() as p:
                bar = p.add_task(f"{label}: {t}", total=windows[t].shape[0])
                res = perplexity(m, windows[t], mode=mode, batch_size=batch_size,
                                 on_batch=lambda k, bar=bar: p.advance(bar, k))
            row[t] = res.ppl
        rows.append(row)
        err.print(f"{label}: " + ", ".join(f"{t} {row[t]:.3f}" for t in task_list))

    evaluate("fp", net, "parallel", {"seconds": 0.0})
    for rec in recs:
        net, ckpt = _load(model, dtype, device)
        records, secs = _run_recipe(net, ckpt, rec, samples, calib_seqlen, calib_data, data_dir)
        mode = "recurrent" if records and records[-1]["online"].get("state_quantizer") else "parallel"
        evaluate(rec.name, net, mode, {"seconds": secs})
    _print_compare(model, rows, task_list, seqlen, max_windows, markdown, json_path)


def _print_compare(model, rows, task_list, seqlen, max_windows, markdown, json_path) -> None:
    fp = rows[0]
    limit = f", first {max_windows} windows" if max_windows else ""
    table = Table(title=f"{model}: perplexity (seqlen {seqlen}{limit})")
    table.add_column("recipe")
    for t in task_list:
        table.add_column(t, justify="right")
        table.add_column("Δ%", justify="right")
    table.add_column("mode")
    table.add_column("quantize s", justify="right")
    md = ["| recipe | " + " | ".join(f"{t} | Δ% " for t in task_list) + " | mode | quantize s |",
          "|---|" + "---:|---:|" * len(task_list) + "---|---:|"]
    for r in rows:
        cells = []
        for t in task_list:
            cells += [f"{r[t]:.2f}", "" if r is fp else f"{100 * (r[t] / fp[t] - 1):+.2f}"]
        table.add_row(r["recipe"], *cells, r["mode"], f"{r['seconds']:.1f}")
        md.append(f"| {r['recipe']} | " + " | ".join(cells) + f" | {r['mode']} | {r['seconds']:.1f} |")
    out.print(table)
    if markdown:
        markdown.write_text("\n".join(md) + "\n")
    if json_path:
        json_path.write_text(json.dumps({"model": model, "seqlen": seqlen, "max_windows": max_windows,
                                         "rows": rows}, indent=2) + "\n")


@app.command()
def demo(
    recipes_: Annotated[str, typer.Option("--recipes", help="Recipes to run on the demo model.")]
    = "w8a8-rtn,w4a8-rtn,w4a8-quarot,w4a8-klt,w16a16h4-perchannel,w16a16h4-dsq",
    device: DeviceOpt = "cpu",
) -> None:
    """The main job on the embedded demo Mamba-2, offline: quantize it with several recipes
    (calibrated on a small embedded text) and compare perplexity on held-out text, FP first."""
    compare("demo", recipes_, tasks="demo", seqlen=256, max_windows=None, batch_size=16, samples=16,
            calib_seqlen=256, calib_data=str(DEMO_CALIB), markdown=None, json_path=None, dtype=DType.float32,
            device=device, data_dir=None)


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
        print(f"error: {e}", file=sys.stderr)  # one line, never wrapped: scripts grep it
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:
        # usage errors (bad option values, unknown commands) carry their own message and exit code;
        # typer may vendor click, so recognise them by what they offer rather than by class
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise
