"""`mqtool plot`: the papers' figures for a checkpoint (drawing in mqtool.plots; this is arguments only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mqtool.cli._common import HUB, DataDirOpt, DeviceOpt, DType, DTypeOpt, _load, _model_spec, err
from mqtool.errors import MqtoolError


def plot(
    model: Annotated[str, typer.Argument(help="Checkpoint directory, hub repo id, or `demo`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory the PNG files go into.")],
    calib: Annotated[Path | None, typer.Option(help="Calibration of MODEL (`mqtool calibrate`); default: a "
                                               "small one made now from --data.")] = None,
    after: Annotated[Path | None, typer.Option(help="A second calibration (e.g. of MODEL rotated or smoothed), "
                                               "drawn beside the first as 'after'.")] = None,
    base: Annotated[str | None, typer.Option(help="The full-precision checkpoint MODEL was quantized from: "
                                             "adds the per-layer weight error.")] = None,
    data: Annotated[str, typer.Option(help="Without --calib: calibration text (wikitext2, c4, demo, a file).")]
    = "demo",
    samples: Annotated[int, typer.Option(min=1, help="Without --calib: windows.")] = 8,
    seqlen: Annotated[int, typer.Option(min=2, help="Without --calib: tokens per window.")] = 256,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
) -> None:
    """Per-channel input abs-max of each linear per layer (outliers; before/after an online transform,
    or against --after), the state's channel x state map and profiles, and with --base the weight error."""
    import importlib.util

    from mqtool import plots
    from mqtool.calibrate import Calibration
    from mqtool.calibrate import calibrate as run_calibration
    from mqtool.checkpoint import load_checkpoint

    if importlib.util.find_spec("matplotlib") is None:
        raise MqtoolError("mqtool plot needs matplotlib (pip install matplotlib)")
    if output.exists() and not output.is_dir():
        raise MqtoolError(f"{output} exists and is not a directory")
    net, ckpt = _load(model, dtype, device)
    if calib is not None:
        stats = Calibration.load(calib).stats
    else:
        from mqtool.cli.stages import _calib_windows

        windows = _calib_windows(net, ckpt, data, None, samples, seqlen, 0, data_dir)
        stats = run_calibration(net, windows, {"model": model}, batch_size=4, state_samples=2).stats
    output.mkdir(parents=True, exist_ok=True)
    written = plots.input_absmax(stats, output, None if after is None else Calibration.load(after).stats)
    written += plots.state_maps(stats, output)
    if base is not None:
        written += plots.weight_error(net.state_dict(), load_checkpoint(_model_spec(base), **HUB).state_dict, output)
    err.print(f"plot: wrote {len(written)} PNG files to {output} ({', '.join(p.name for p in written)})")
