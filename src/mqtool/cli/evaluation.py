"""Commands that measure a checkpoint: perplexity, zero-shot accuracy, speed, recipe comparisons, the demo."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mqtool.cli._common import (
    DEMO_CALIB,
    DataDirOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    JsonOpt,
    JsonOutOpt,
    _dtype,
    _json,
    _load,
    _load_integer,
    _progress,
    _run_mode,
    _split,
    _task_spec,
    _tokenizer,
    err,
    out,
)
from mqtool.cli.stages import _run_recipe
from mqtool.errors import MqtoolError


class Mode(str, Enum):
    auto = "auto"
    parallel = "parallel"
    recurrent = "recurrent"


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
    json_out: JsonOpt = False,
    kernels: Annotated[bool, typer.Option("--kernels", help="Run the exported linears on the integer kernels "
                                          "(an `mqtool export` checkpoint with 8-bit activations).")] = False,
    runtime: Annotated[bool, typer.Option("--runtime", help="Score token by token through the decode runtime "
                                          "(its state cache in stored form: codes + scales when the states "
                                          "are quantized); implies --mode recurrent.")] = False,
    state_dtype: Annotated[StateDType | None, typer.Option(help="With --runtime: the dtype of an unquantized "
                                                          "state cache (default: the model's dtype).")] = None,
) -> None:
    """Perplexity, GPTQ-style: non-overlapping windows, mean NLL over every predicted token."""
    from mqtool.data import eval_tokens, eval_windows
    from mqtool.evaluate.perplexity import perplexity

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if not task_list:
        raise MqtoolError("--tasks is empty")
    net, ckpt = (_load_integer if kernels else _load)(model, dtype, device)
    tok = _tokenizer(ckpt, data_dir)
    run_mode = _run_mode(mode.value, ckpt.manifest.online, recurrent=runtime)
    if runtime:
        from mqtool.runtime import Runtime

        if run_mode != "recurrent":
            raise MqtoolError("--runtime scores token by token: use --mode recurrent (or auto)")
        net = Runtime(net, state_dtype=None if state_dtype is None else _dtype(DType(state_dtype.value)))
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
        if not math.isfinite(res.ppl):  # finite weights (checked on load) that overflow in this dtype
            err.print(f"warning: {task}: perplexity is {res.ppl} (the activations overflow in {dtype.value}?)")
    if json_out:
        print(_json({"model": model, "results": results}))
        return
    table = Table(title=f"{model}  (seqlen {seqlen}, {dtype.value})")
    for col in ("task", "ppl", "windows", "tokens", "mode", "seconds"):
        table.add_column(col, justify="left" if col in ("task", "mode") else "right")
    for task, r in results.items():
        table.add_row(task, f"{r['ppl']:.3f}", str(r["windows"]), str(r["tokens"]), r["mode"], f"{r['seconds']:.1f}")
    out.print(table)


class Backend(str, Enum):
    lm_eval = "lm-eval"  # the only scorer: lm-eval's tasks and metrics


def zeroshot(
    model: Annotated[str, typer.Argument(help="Checkpoint directory, hub repo id, or `demo`.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: piqa, arc_easy, arc_challenge, openbookqa, hellaswag, "
                                       "winogrande, lambada_openai.")]
    = "piqa,arc_easy,arc_challenge,openbookqa,hellaswag,winogrande,lambada_openai",
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N examples of each task.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per forward pass.")] = 16,
    mode: Annotated[Mode, typer.Option(help="parallel, recurrent, or auto: recurrent when states are quantized.")]
    = Mode.auto,
    backend: Annotated[Backend, typer.Option(help="lm-eval (its task definitions and metrics; "
                                             "pip install mqtool[eval]).")] = Backend.lm_eval,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
    json_path: JsonOutOpt = None,
) -> None:
    """Zero-shot accuracy scored by lm-eval (lm_eval.simple_evaluate; acc, acc_norm; LAMBADA acc and
    perplexity), from the task files in <data root>/zeroshot where they are, else from the hub."""
    from mqtool.checkpoint import check_output_file, prepare_output_file
    from mqtool.evaluate import zeroshot as zs

    names = zs.parse_tasks(tasks)
    from mqtool.evaluate.lm_eval_adapter import MqtoolLM  # fails in one line without lm-eval

    if json_path is not None:
        json_path = check_output_file(json_path, "--json-out")
    net, ckpt = _load(model, dtype, device)
    tok = _tokenizer(ckpt, data_dir)
    run_mode = _run_mode(mode.value, ckpt.manifest.online)
    lm = MqtoolLM(net, tok, batch_size=batch_size, mode=run_mode)
    results = zs.evaluate_tasks(lm, names, data_dir, limit)
    import lm_eval

    first = f", first {limit} examples" if limit else ""
    table = Table(title=f"{model}: zero-shot ({dtype.value}, {run_mode}, lm-eval {lm_eval.__version__}{first})")
    for col in ("task", "metric", "value", "±", "n", "seconds"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, r in results.items():
        for metric, value in r.metrics.items():
            se = r.stderr.get(metric)
            shown = f"{value:.2f}" if metric == "perplexity" else f"{value:.4f}"
            table.add_row(name, metric, shown, "" if se is None else f"{se:.4f}", str(r.n), f"{r.seconds:.1f}")
    report = {"model": model, "lm_eval": lm_eval.__version__, "mode": run_mode, "dtype": dtype.value,
              "limit": limit, "results": {k: r.to_dict() for k, r in results.items()}}
    if json_path:
        prepare_output_file(json_path).write_text(_json(report) + "\n")
    if json_out:  # JSON is stdout's only content; the table is not printed
        print(_json(report))
    else:
        out.print(table)


class StateDType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MqtoolError(f"{name} takes comma-separated positive integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise MqtoolError(f"{name} takes comma-separated positive integers, got {text!r}")
    return vals


def bench(
    models: Annotated[list[str], typer.Argument(help="Checkpoint directories (or hub ids, `demo`), timed in turn.")],
    batch: Annotated[str, typer.Option(help="Batch sizes to sweep, comma-separated (e.g. 1,8,64,128).")] = "1",
    prompt_len: Annotated[str, typer.Option(help="Prompt lengths to sweep, comma-separated.")] = "512",
    gen_len: Annotated[int, typer.Option(min=1, help="Decode steps (one token per sequence each).")] = 128,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    kernels: Annotated[bool, typer.Option("--kernels/--no-kernels", help="Integer kernels (exported "
                                          "checkpoints) or the simulated model.")] = False,
    state_dtype: Annotated[StateDType | None, typer.Option(help="dtype of an unquantized state cache "
                                                          "(default: the model's, as mamba-ssm keeps it).")] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Also time mamba-ssm's "
                                           "generate(cg=True) on the same shape and dtype (CUDA, when "
                                           "mamba-ssm is installed) and report ratios to it.")] = True,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of the sweep here (needs matplotlib).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Time prefill and decode through the generation runtime on random tokens (no data needed),
    over a sweep of batch sizes and prompt lengths, beside mamba-ssm's generate; report tokens/s,
    weight, state-cache (real bytes: codes and scales) and peak memory, and the ratio to the baseline."""
    import torch

    from mqtool.runtime import benchmark, mamba_ssm_baseline, plot_sweep

    batches, prompts = _ints(batch, "--batch"), _ints(prompt_len, "--prompt-len")
    if plot is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise MqtoolError("--plot needs matplotlib (pip install matplotlib)")
        if not plot.parent.is_dir():
            raise MqtoolError(f"--plot: directory {plot.parent} does not exist")
    sdt = None if state_dtype is None else _dtype(DType(state_dtype.value))
    rows: list[dict] = []
    base_rows: dict[tuple[str, int, int], dict] = {}

    def run_baseline(cfg, dev) -> None:
        for p_len in prompts:
            for b in batches:
                res = mamba_ssm_baseline(cfg, _dtype(dtype), dev, b, p_len, gen_len)
                if res is not None:
                    base_rows[(cfg.layer, b, p_len)] = {"model": "mamba-ssm", **res}
                    err.print(f"mamba-ssm {cfg.layer}: batch {b}, prompt {p_len}: prefill "
                              f"{res['prefill_seconds'] * 1000:.1f} ms, decode {res['decode_ms_per_step']:.2f} "
                              f"ms/step, peak {res['peak_memory_bytes'] / 2**30:.2f} GiB")

    families: set[str] = set()
    for spec in models:
        net, ckpt = (_load_integer if kernels else _load)(spec, dtype, device)
        for p_len in prompts:
            for b in batches:
                rows.append({"model": spec, **benchmark(net, batch=b, prompt_len=p_len, gen_len=gen_len,
                                                        state_dtype=sdt)})
                err.print(f"{spec} [{rows[-1]['state_format']}]: batch {b}, prompt {p_len}: prefill "
                          f"{rows[-1]['prefill_seconds'] * 1000:.1f} ms, decode {rows[-1]['decode_ms_per_step']:.2f} "
                          f"ms/step, peak {rows[-1]['peak_memory_bytes'] / 2**30:.2f} GiB")
        dev, cfg = net.backbone.embedding.weight.device, net.config
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if baseline and cfg.layer not in families:  # the baseline's shape: the first model of each family
            families.add(cfg.layer)
            run_baseline(cfg, dev)
    for r in rows:
        base = base_rows.get((r["layer"], r["batch"], r["prompt_len"]))
        if base is not None:
            r["decode_speedup_vs_mamba_ssm"] = base["decode_ms_per_step"] / r["decode_ms_per_step"]
            r["prefill_speedup_vs_mamba_ssm"] = base["prefill_seconds"] / r["prefill_seconds"]
            r["peak_memory_ratio_vs_mamba_ssm"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
    all_rows = list(base_rows.values()) + rows
    if plot is not None:
        plot_sweep(all_rows, str(plot))
    if json_out:
        print(_json({"rows": all_rows}))
        return
    gib = 2**30
    table = Table(title=f"bench ({dtype.value}, {all_rows[0]['device']}, {gen_len} decode steps)")
    for col in ("model", "state", "batch", "prompt", "prefill ms", "decode ms/step", "decode tok/s",
                "weights GiB", "state cache GiB", "peak GiB", "decode x", "peak x"):
        table.add_column(col, justify="left" if col in ("model", "state") else "right")
    for r in all_rows:
        table.add_row(str(r["model"]), r["state_format"], str(r["batch"]), str(r["prompt_len"]),
                      f"{r['prefill_seconds'] * 1000:.1f}", f"{r['decode_ms_per_step']:.2f}",
                      f"{r['decode_tokens_per_s']:,.0f}", f"{r['weight_bytes'] / gib:.3f}",
                      f"{r['state_cache_bytes'] / gib:.3f}", f"{r['peak_memory_bytes'] / gib:.3f}",
                      f"{r['decode_speedup_vs_mamba_ssm']:.2f}" if "decode_speedup_vs_mamba_ssm" in r else "",
                      f"{r['peak_memory_ratio_vs_mamba_ssm']:.2f}" if "peak_memory_ratio_vs_mamba_ssm" in r else "")
    out.print(table)
    if not base_rows and baseline:
        err.print("no baseline: mamba-ssm is not installed or the device is not CUDA")


def compare(
    model: Annotated[str, typer.Argument(help="Checkpoint (full precision), hub repo id, or `demo`.")],
    recipes_: Annotated[str, typer.Option("--recipes", help="Comma-separated recipe names or files.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated perplexity tasks.")] = "wikitext2,c4",
    seqlen: Annotated[int, typer.Option(min=2, help="Evaluation window.")] = 2048,
    max_windows: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N windows.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    samples: Annotated[int | None, typer.Option(min=1, help="Override every recipe's calibration samples.")] = None,
    calib_seqlen: Annotated[int | None, typer.Option(min=2, help="Override every recipe's calibration seqlen.")]
    = None,
    calib_data: Annotated[str | None, typer.Option(help="Override every recipe's calibration data.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Also write the table as markdown here.")] = None,
    json_out: JsonOpt = False,
    json_path: JsonOutOpt = None,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
) -> None:
    """Run each recipe on MODEL and tabulate perplexity, full precision first (the papers' Table 1 shape).
    Recipes with a state quantizer are evaluated in recurrent mode, the rest in parallel mode."""
    from mqtool.checkpoint import check_output_file
    from mqtool.data import eval_tokens, eval_windows
    from mqtool.evaluate.perplexity import perplexity
    from mqtool.pipeline import load_recipe

    names = _split(recipes_) or []
    recs = [load_recipe(n) for n in names]  # fail on a bad name before any work
    markdown = None if markdown is None else check_output_file(markdown, "--markdown")
    json_path = None if json_path is None else check_output_file(json_path, "--json-out")
    task_list = _split(tasks) or []
    net, ckpt = _load(model, dtype, device)
    tok = _tokenizer(ckpt, data_dir)
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
        stage_seconds = [{"stage": r["stage"], "seconds": r["seconds"]} for r in records]
        evaluate(rec.name, net, mode, {"seconds": secs, "stage_seconds": stage_seconds, **_esr_summary(records)})
    _print_compare(model, rows, task_list, seqlen, max_windows, markdown, json_path, json_out)


def _esr_summary(records: list[dict]) -> dict:
    """The per-block ESR losses of a recipe's reconstruct stage (for the JSON), printed in one line:
    whether training lowered its own objective is the first thing to check when ESR disappoints."""
    for r in records:
        if r["stage"] == "reconstruct":
            blocks = [{k: b[k] for k in ("block", "loss_before", "loss_after", "kept")} for b in r["record"]["blocks"]]
            lower = sum(b["loss_after"] < b["loss_before"] for b in blocks)
            ratios = (f"{b['loss_after'] / b['loss_before']:.3g}" if b["loss_before"] else "-" for b in blocks)
            err.print(f"ESR (lr {r['record']['lr']:g}): training loss fell in {lower} of {len(blocks)} blocks; "
                      + " ".join(ratios) + " (after/before)")
            return {"esr_blocks": blocks}
    return {}


def _print_compare(model, rows, task_list, seqlen, max_windows, markdown, json_path, json_out=False) -> None:
    from mqtool.checkpoint import prepare_output_file

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
    if markdown:
        prepare_output_file(markdown).write_text("\n".join(md) + "\n")
    report = {"model": model, "seqlen": seqlen, "max_windows": max_windows, "rows": rows}
    if json_path:
        prepare_output_file(json_path).write_text(_json(report) + "\n")
    if json_out:  # JSON is stdout's only content; the table is not printed
        print(_json(report))
    else:
        out.print(table)


def demo(
    recipes_: Annotated[str, typer.Option("--recipes", help="Recipes to run on the demo model.")]
    = "w8a8-rtn,w4a8-rtn,w4a8-quarot,w4a8-klt,w16a16h4-perchannel,w16a16h4-dsq",
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """The main job on the embedded demo Mamba-2, offline: quantize it with several recipes
    (calibrated on a small embedded text) and compare perplexity on held-out text, FP first."""
    compare("demo", recipes_, tasks="demo", seqlen=256, max_windows=None, batch_size=16, samples=16,
            calib_seqlen=256, calib_data=str(DEMO_CALIB), markdown=None, json_out=json_out, json_path=None,
            dtype=DType.float32, device=device, data_dir=None)
