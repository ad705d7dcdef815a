"""The figures the MambaQuant and Q-Mamba papers draw, from calibration statistics and weights alone
(no algorithm runs here): per-channel abs-max of each linear's input per layer (the outliers), before
and after a transform; the recurrent state's channel x state magnitude map; and the per-layer
weight error of a quantized checkpoint against its full-precision base. PNG files, one per figure,
drawn on matplotlib Figure objects (no pyplot global state; matplotlib is an optional dependency)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from mqtool.errors import MqtoolError

LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")
_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.mixer\.(\w+)\.")


def _figure(n_panels: int, cols: int = 4, size: tuple[float, float] = (4.0, 2.6)):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MqtoolError("plots need matplotlib (pip install matplotlib)") from None
    cols = min(cols, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _layers(stats: dict[str, torch.Tensor], linear: str) -> list[int]:
    return sorted({int(m.group(1)) for k in stats if (m := _LAYER.match(k)) and m.group(2) == linear})


def input_absmax(stats: dict[str, torch.Tensor], out: Path, after: dict[str, torch.Tensor] | None = None,
                 labels: tuple[str, str] = ("before", "after")) -> list[Path]:
    """One PNG per linear kind: per-channel abs-max of its input, one panel per layer. Drawn: what
    the quantizer sees; where an online transform (a Hadamard) sits in front, the input before it
    too; with `after` (the statistics of a rotated / smoothed checkpoint), its curve beside."""
    written = []
    for linear in LINEARS:
        layers = _layers(stats, linear)
        if not layers:
            continue
        fig, axes = _figure(len(layers))
        for ax, i in zip(axes, layers, strict=True):
            key = f"backbone.layers.{i}.mixer.{linear}"
            curves = [(labels[0] if after is not None else "quantizer input", stats[f"{key}.absmax"])]
            pre = stats.get(f"{key}.pre.absmax")
            if pre is not None and not torch.equal(pre, stats[f"{key}.absmax"]):
                curves.insert(0, ("before online transform", pre))
            if after is not None and f"{key}.absmax" in after:
                curves.append((labels[1], after[f"{key}.absmax"]))
            for label, v in curves:
                ax.plot(v.float().cpu().numpy(), lw=0.7, label=label)
            ax.set_yscale("log")
            ax.set_title(f"layer {i} {linear} input", fontsize=9)
            ax.set_xlabel("channel", fontsize=8)
            ax.set_ylabel("abs-max", fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle(f"{linear}: per-channel abs-max of the input (outliers)")
        written.append(_save(fig, out / f"input-absmax-{linear}.png"))
    return written


def state_maps(stats: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """The recurrent state's (channel x state) abs-max map per layer (Q-Mamba's state figure), and
    its per-channel and per-state-dimension profiles (what per-channel / per-state / DSQ scales see)."""
    layers = sorted({int(m.group(1)) for k in stats if (m := _LAYER.match(k)) and m.group(2) == "state"})
    if not layers:
        return []
    maps = {i: stats[f"backbone.layers.{i}.mixer.state.absmax"].float().cpu() for i in layers}
    maps = {i: m.reshape(-1, m.shape[-1]) for i, m in maps.items()}  # Mamba-2: (heads, headdim, N) -> (P, N)
    fig, axes = _figure(len(layers))
    for ax, i in zip(axes, layers, strict=True):
        im = ax.imshow(maps[i].T.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(f"layer {i} state |h| max", fontsize=9)
        ax.set_xlabel("channel", fontsize=8)
        ax.set_ylabel("state dim", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.suptitle("recurrent state: channel x state abs-max")
    written = [_save(fig, out / "state-map.png")]
    fig, axes = _figure(2, cols=2, size=(6.0, 3.0))
    for i, m in maps.items():
        axes[0].plot(m.amax(1).numpy(), lw=0.7, label=f"layer {i}")
        axes[1].plot(m.amax(0).numpy(), lw=0.9, marker=".", label=f"layer {i}")
    for ax, what in zip(axes, ("channel", "state dim"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel(what, fontsize=8)
        ax.set_ylabel("abs-max", fontsize=8)
        ax.set_title(f"state abs-max per {what}", fontsize=9)
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "state-profiles.png"))
    return written


def weight_error(quantized: dict[str, torch.Tensor], base: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """Relative error ||W_q - W|| / ||W|| of each mixer linear per layer, against the FP base (the
    checkpoint the quantize stage read: after a rotation the base must be the rotated one)."""
    err: dict[str, dict[int, float]] = {}
    for k, w in quantized.items():
        m = _LAYER.match(k)
        if m and m.group(2) in LINEARS and k.endswith(".weight") and k in base and base[k].shape == w.shape:
            b = base[k].double()
            err.setdefault(m.group(2), {})[int(m.group(1))] = float((w.double() - b).norm() / b.norm().clamp_min(1e-30))
    if not err:
        return []
    fig, axes = _figure(1, size=(6.0, 3.5))
    for linear, per_layer in err.items():
        layers = sorted(per_layer)
        axes[0].plot(layers, [per_layer[i] for i in layers], marker="o", label=linear)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("||W_q - W|| / ||W||")
    axes[0].set_title("weight quantization error per layer")
    axes[0].legend(fontsize=8)
    return [_save(fig, out / "weight-error.png")]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path
