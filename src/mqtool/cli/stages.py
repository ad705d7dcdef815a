"""The stage commands: each reads a checkpoint (or calibration) and writes a new one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mqtool.cli._common import (
    HUB,
    CalibOpt,
    DataDirOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    ForceOpt,
    OutOpt,
    _load,
    _model_spec,
    _progress,
    _split,
    _task_spec,
    _tokenizer,
    err,
)
from mqtool.errors import MqtoolError


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
    from mqtool.data import calibration_windows, default_split, load_text

    check_output_dir(output, force, (_model_spec(model),))
    net, ckpt = _load(model, dtype, device)
    tok = _tokenizer(ckpt, data_dir)
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
    save_checkpoint(output, net.config, model_state_dict(net, manifest.online), manifest, ckpt.tokenizer_path,
                    force=force)
    err.print(f"{stage}: wrote {output} in {time.perf_counter() - start:.1f}s")


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


def smooth(
    model: Annotated[str, typer.Argument(help="Input checkpoint.")],
    output: OutOpt,
    calib: CalibOpt = None,
    method: Annotated[str, typer.Option(help="smoothquant, or smooth-fused (MambaQuant: S-SiLU and "
                                        "norm-absorbed scales before the online Hadamard).")] = "smoothquant",
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Migration strength.")] = 0.5,
    targets: Annotated[str | None, typer.Option(help="Comma-separated linears (default: in_proj, x_proj, "
                                                "dt_proj, out_proj; also lm_head), `ssm` for the SSM's "
                                                "input and `matmul` for its output matmul C·h (both "
                                                "smooth-fused only; matmul needs state statistics).")] = None,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Per-channel smoothing scales migrated into weights (the model's function is unchanged)."""
    params: dict = {"method": method, "alpha": alpha}
    if targets:
        params["targets"] = _split(targets)
    _stage_command(model, output, "smooth", params, calib, force, dtype, device)


def quantize_states(
    model: Annotated[str, typer.Argument(help="Input checkpoint.")],
    output: OutOpt,
    bits: Annotated[int, typer.Option(help="State bits: 8, 6, 4 (16 = off).")] = 4,
    method: Annotated[str, typer.Option(help="auto (with --calib: per layer, the method with the smallest "
                                        "error on the calibration states; without: DSQ with the abs.max channel "
                                        "scale, what measured best at 4 bits on both families), dsq (Q-Mamba), "
                                        "per-channel, per-state, per-tensor.")] = "auto",
    channel_scale: Annotated[str | None, typer.Option(help="DSQ channel scale: abs.mean.sqrt (paper; the default "
                                                      "for --method dsq), abs.mean, abs.max, abs.max.sqrt.")] = None,
    calib: CalibOpt = None,
    bits_budget: Annotated[float | None, typer.Option(help="With --method auto and --calib: average state bits "
                                                      "over the layers (e.g. 4.5); the layers that gain most "
                                                      "get 6 or 8 bits.")] = None,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Quantize the recurrent state cache (applied at every step; `mqtool eval` then runs recurrent)."""
    params = {"bits": bits, "method": method, "channel_scale": channel_scale}
    if bits_budget is not None:
        params["bits_budget"] = bits_budget
    _stage_command(model, output, "quantize-states", params, calib, force, dtype, device)


def _calib_windows(net, ckpt, data: str, split: str | None, samples: int, seqlen: int, seed: int,
                   data_dir: Path | None, max_chars: int = 20_000_000):
    from mqtool.data import calibration_windows, default_split, load_text

    tok = _tokenizer(ckpt, data_dir)
    source = _task_spec(data)
    if split is None and not Path(source).exists():
        split = default_split(source, "calibration")
    return calibration_windows(tok.encode(load_text(source, split, data_dir, max_chars=max_chars)), samples, seqlen,
                               seed)


def reconstruct(
    model: Annotated[str, typer.Argument(help="Input checkpoint with a state quantizer (`quantize-states`).")],
    output: OutOpt,
    calib_data: Annotated[str, typer.Option(help="wikitext2, c4, techdocs, demo, or a text file.")] = "wikitext2",
    samples: Annotated[int, typer.Option(min=1)] = 128,
    seqlen: Annotated[int, typer.Option(min=2)] = 2048,
    epochs: Annotated[int, typer.Option(min=1)] = 3,
    lr: Annotated[float, typer.Option(help="AdamW learning rate. The paper's 1e-3 made every block of our "
                                      "Mamba-1 model worse with W8A8 (docs/results.md).")] = 3e-5,
    train: Annotated[str, typer.Option(help="What learns: dt,B,C (SGA default) plus conv, norm.")] = "dt,B,C",
    batch_size: Annotated[int, typer.Option(min=1)] = 1,
    seed: int = 0,
    holdout: Annotated[int | None, typer.Option(min=0, help="With --restore-worse: calibration windows kept out "
                                                "of training (default samples // 8); 0: decide on the training "
                                                "windows.")] = None,
    restore_worse: Annotated[bool, typer.Option(
        "--restore-worse/--keep-worse",
        help="Restore a block whose loss on held-out windows did not fall. Default: keep every trained block "
             "(the paper's ESR, which measured better).",
    )] = False,
    state_dir: Annotated[Path | None, typer.Option(help="Where progress is kept so an interrupted run resumes "
                                                   "(default: OUTPUT.esr-state beside OUTPUT).")] = None,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    force: ForceOpt = False,
) -> None:
    """Q-Mamba's ESR: block-wise reconstruction of the Δ, B, C projections against the FP model."""
    from mqtool.checkpoint import check_output_dir, check_state_dir, paths_overlap
    from mqtool.pipeline import weight_specs
    from mqtool.quant.reconstruct import clear_state_dir

    check_output_dir(output, force, (_model_spec(model),))
    sdir = state_dir or output.parent / f"{output.name}.esr-state"
    for other in (_model_spec(model), output):
        if (Path(other).exists() or other == output) and paths_overlap(Path(other), sdir):
            raise MqtoolError(f"--state-dir {sdir} overlaps {other}; give it a directory of its own")
    check_state_dir(sdir)
    net, ckpt = _load(model, dtype, device)
    windows = _calib_windows(net, ckpt, calib_data, None, samples, seqlen, seed, data_dir)
    del net
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
    clear_state_dir(sdir)


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
    samples: Annotated[int | None, typer.Option(min=1, help="Override the recipe's calibration samples.")] = None,
    seqlen: Annotated[int | None, typer.Option(min=2, help="Override the recipe's calibration seqlen.")] = None,
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
    save_checkpoint(output, net.config, model_state_dict(net, manifest.online), manifest, ckpt.tokenizer_path,
                    force=force)
    err.print(f"recipe {rec.name}: wrote {output} in {seconds:.1f}s ({_stage_times(records)})")


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
    marks = [time.perf_counter()]  # stage i runs from marks[i] to marks[i + 1]

    def on_stage(name: str, i: int, n: int) -> None:
        if i > 0:
            marks.append(_synced_clock())
        p.update(bar, completed=i, description=f"{rec.name}: {name}")

    with _progress(not quiet) as p:
        bar = p.add_task(f"recipe {rec.name}", total=len(rec.stages))
        records = run_recipe(net, online, rec, windows, on_stage=on_stage)
    marks.append(_synced_clock())
    for r, t0, t1 in zip(records, marks[:-1], marks[1:], strict=True):
        r["online"] = online
        r["seconds"] = t1 - t0
    return records, marks[-1] - marks[0]


def _synced_clock() -> float:
    """perf_counter after the GPU's queued work is done, so a stage's time includes its kernels (a
    run that never touched CUDA has nothing queued: no context is created just to wait)."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _stage_times(records: list[dict]) -> str:
    """``rotate 40.1s, smooth 12.0s, …``: where a recipe's time went."""
    return ", ".join(f"{r['stage']} {r['seconds']:.1f}s" for r in records)


def export(
    model: Annotated[str, typer.Argument(help="A quantized (simulated) checkpoint.")],
    output: OutOpt,
    force: ForceOpt = False,
    fmt: Annotated[str, typer.Option(
        "--format", help="mqtool (codes + scales for mqtool's kernels) or compressed-tensors (Hugging Face "
        "Mamba2ForCausalLM for vLLM; Mamba-2 only; needs `pip install \"mqtool[serve]\"`).")] = "mqtool",
) -> None:
    """Pack quantized weights as integer codes + scales (int8; int4 two to a byte), the form the
    integer kernels consume. Loading the export gives exactly the simulated model's weights.
    With --format compressed-tensors: the checkpoint vLLM serves (see docs/guide.md)."""
    from mqtool.checkpoint import (
        check_output_dir,
        checkpoint_hash,
        load_checkpoint,
        mark_transformed,
        record_stage,
        save_checkpoint,
    )
    from mqtool.pipeline import weight_specs
    from mqtool.quant.export import export_state_dict

    src = _model_spec(model)
    check_output_dir(output, force, (src,))
    ckpt = load_checkpoint(src, **HUB)
    if ckpt.manifest.exported:
        raise MqtoolError(f"{model} is already exported")
    specs = weight_specs(ckpt.manifest.stages)
    if not specs:
        raise MqtoolError(f"{model} has no quantized weights to export: run `mqtool quantize` first")
    if fmt == "compressed-tensors":
        from mqtool.quant.ct_export import write_export

        write_export(output, ckpt.config, ckpt.state_dict, specs, ckpt.manifest.online, ckpt.manifest.hf_config,
                     ckpt.tokenizer_path, force)
        err.print(f"export: wrote {output} (compressed-tensors, {len(specs)} quantized linears; "
                  "serve it with vLLM, see docs/guide.md)")
        return
    if fmt != "mqtool":
        raise MqtoolError(f"unknown export format {fmt!r}; expected mqtool or compressed-tensors")
    state = export_state_dict(ckpt.state_dict, specs)
    manifest = record_stage(ckpt.manifest, "export", {"tensors": len(specs)}, checkpoint_hash(ckpt.path))
    manifest.exported = True
    manifest.quant["weights"] = specs
    save_checkpoint(output, ckpt.config, mark_transformed(state, manifest.online), manifest, ckpt.tokenizer_path,
                    force=force)
    before = sum(v.numel() * v.element_size() for v in ckpt.state_dict.values())
    after = sum(v.numel() * v.element_size() for v in state.values())
    err.print(f"export: wrote {output} ({len(specs)} quantized tensors; weights {before / 2**20:.1f} MiB -> "
              f"{after / 2**20:.1f} MiB)")
