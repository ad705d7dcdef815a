"""Calibration statistics at every attachment point, accumulated in a streaming way.

For the input of every linear layer: per-channel abs-max, sum and sum of squares, the token
count, and the full second-moment matrix sum(x^T x) (from which the centred covariance that
KLT needs follows). For the SSM's inputs (x, B, C, Δ) and the gate: per-channel abs-max and sum
of squares. For the recurrent state: per (channel, state) abs-max and mean |h| over every step
of `state_samples` windows run in recurrent mode. Memory does not grow with the number of samples.
For the state quantizer's per-layer choice (`quantize-states --method auto`) also a few sampled
states `state.samples [k, ...]` (about `STATE_KEEP` of them, at evenly spaced steps; for Mamba-2 a
subset of heads when a layer's samples would exceed `STATE_KEEP_ELEMENTS`: every head is quantized
on its own, so a head subset is an exact sample of the problem) and the readout `state.readout
[k, ..., 1, N]`: C of the step *after* the sampled one, the vector the next output multiplies that
state with. Calibrations made before these existed lack them (and `--method auto` asks for a new one).

Names: `<module path>.<statistic>`, e.g. `backbone.layers.0.mixer.in_proj.xtx` (observed after
the linear's online `input_transform`, i.e. what its quantizer sees) and
`backbone.layers.0.mixer.out_proj.pre.absmax` (before the transform).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mqtool.atomic import write_dir_atomic
from mqtool.errors import MqtoolError
from mqtool.models import MambaLMHeadModel
from mqtool.models.layers import Linear

STATS_FILE = "stats.safetensors"
META_FILE = "calib.json"
#: sampled states kept per layer (across the state windows), and at most this many values a layer
STATE_KEEP = 16
STATE_KEEP_ELEMENTS = 2**20


class _Accumulator:
    def __init__(self, full: bool) -> None:
        self.full = full  # full = a linear's input: also sums and x^T x
        self.stats: dict[str, torch.Tensor] = {}

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        xf = x.double() if x.device.type == "cpu" else x.float()
        s = self.stats
        absmax = xf.abs().amax(0).double()
        sumsq = xf.pow(2).sum(0).double()
        if not s:
            s["absmax"], s["sumsq"] = absmax, sumsq
            s["count"] = torch.zeros((), dtype=torch.float64, device=x.device)
            if self.full:
                s["sum"] = torch.zeros_like(sumsq)
                s["xtx"] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
        else:
            torch.maximum(s["absmax"], absmax, out=s["absmax"])
            s["sumsq"] += sumsq
        s["count"] += x.shape[0]
        if self.full:
            s["sum"] += xf.sum(0).double()
            s["xtx"] += (xf.T @ xf).double()


def _attachment_points(model: MambaLMHeadModel) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (module whose input is observed, whether it is a linear layer's input)."""
    points: dict[str, tuple[nn.Module, bool]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear):
            points[name] = (mod.input_quantizer, True)
            # before an online transform too: smoothing placed ahead of an online Hadamard needs it
            points[f"{name}.pre"] = (mod.input_transform, False)
    for i, mixer in enumerate(model.mixers):
        prefix = f"backbone.layers.{i}.mixer"
        for tap in ("ssm_x", "ssm_dt", "ssm_B", "ssm_C"):
            points[f"{prefix}.{tap}"] = (getattr(mixer, tap), False)
        gate = mixer.norm.gate_act if hasattr(mixer, "norm") else mixer.gate_act
        points[f"{prefix}.gate"] = (gate, False)
    return points


def _check_finite(stats: dict[str, torch.Tensor], what: str, hint: str = "") -> None:
    """Refuses NaN/Inf statistics (naming the first): every scale and Hessian made from one would be too."""
    for name, t in stats.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MqtoolError(f"{what} {name} is not finite (NaN or Inf){hint}")


@dataclass
class Calibration:
    stats: dict[str, torch.Tensor]
    meta: dict

    def get(self, name: str, stat: str) -> torch.Tensor:
        key = f"{name}.{stat}"
        if key not in self.stats:
            raise MqtoolError(f"calibration has no {key}; re-run `mqtool calibrate` with this model")
        return self.stats[key]

    def covariance(self, name: str) -> torch.Tensor:
        """Unbiased centred input covariance of linear `name`: (X^T X - n mu mu^T) / (n - 1)."""
        n = float(self.get(name, "count"))
        mean = self.get(name, "sum") / n
        return (self.get(name, "xtx") - n * torch.outer(mean, mean)) / max(n - 1.0, 1.0)

    def second_moment(self, name: str) -> torch.Tensor:
        return self.get(name, "xtx") / float(self.get(name, "count"))

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.stats.items()}, out / STATS_FILE)
        (out / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")

    def save_atomic(self, out: Path) -> None:
        """Write to a temporary sibling, then move it into place (replacing an existing `out`)
        so that a kill at any instant leaves either the complete new one or the previous one."""
        write_dir_atomic(out, self.save, replace=True)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        if not (path / STATS_FILE).exists():
            raise MqtoolError(f"{path}: not a calibration directory (no {STATS_FILE}); "
                              "make one with `mqtool calibrate`")
        try:
            stats = load_file(path / STATS_FILE)
            meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
        except Exception as e:
            raise MqtoolError(f"{path}: cannot read calibration ({type(e).__name__}: {e})") from None
        _check_finite(stats, f"{path}: calibration statistic")
        return cls(stats, meta)


@torch.inference_mode()
def collect(model: MambaLMHeadModel, windows: torch.Tensor, batch_size: int = 4, state_samples: int = 8,
            on_batch: Callable[[str, int], None] | None = None) -> dict[str, torch.Tensor]:
    """Runs `windows` [n, seqlen] through the model (parallel mode) with observers on every
    attachment point, then `state_samples` of them in recurrent mode for the state statistics."""
    device = next(model.parameters()).device
    accs: dict[str, _Accumulator] = {}
    handles = []
    for name, (mod, full) in _attachment_points(model).items():
        acc = accs[name] = _Accumulator(full)
        handles.append(mod.register_forward_hook(lambda m, inp, out, acc=acc: acc.add(inp[0])))
    try:
        for s in range(0, windows.shape[0], batch_size):
            model(windows[s:s + batch_size].to(device))
            if on_batch:
                on_batch("activations", min(batch_size, windows.shape[0] - s))
    finally:
        for h in handles:
            h.remove()
    stats = {f"{name}.{k}": v for name, acc in accs.items() for k, v in acc.stats.items()}
    if state_samples > 0:
        stats.update(_state_stats(model, windows[:state_samples].to(device), on_batch))
    return stats


def _sample_steps(seqlen: int, batch: int) -> list[int]:
    """Evenly spaced steps (after the first quarter, where the state has filled up) whose states are
    kept, enough of them for about STATE_KEEP states over the batch; the last step is excluded
    because the readout is the next step's C."""
    if seqlen < 2:
        return []
    n = max(1, -(-STATE_KEEP // batch))
    steps = torch.linspace(seqlen // 4, seqlen - 2, n).round().long().unique()
    return [int(t) for t in steps]


def _head_subset(state_shape: tuple[int, ...], k: int) -> torch.Tensor | None:
    """Mamba-2 heads kept ([b, H, P, N] states) so that k samples stay within STATE_KEEP_ELEMENTS;
    None = all (and always for Mamba-1, whose per-state scales span every channel)."""
    if len(state_shape) != 4:
        return None
    heads, per_head = state_shape[1], state_shape[2] * state_shape[3]
    keep = max(1, min(heads, STATE_KEEP_ELEMENTS // max(1, k * per_head)))
    return None if keep == heads else torch.linspace(0, heads - 1, keep).round().long().unique()


def _readout(C: torch.Tensor, state_shape: tuple[int, ...]) -> torch.Tensor:
    """The ssm_C tap's input [b, g*N] (Mamba-2) or [b, N] (Mamba-1) as [b, ..., 1, N] over the state."""
    b, n = C.shape[0], state_shape[-1]
    if len(state_shape) == 4:  # Mamba-2: head h reads group h // (H / g)
        C = C.reshape(b, -1, n).float()
        C = C.repeat_interleave(state_shape[1] // C.shape[1], dim=1)
        return C.unsqueeze(-2)
    return C.reshape(b, 1, n).float()


def _state_stats(model, windows, on_batch) -> dict[str, torch.Tensor]:
    cache = model.allocate_cache(windows.shape[0])
    n_layers = len(model.mixers)
    absmax = [torch.zeros_like(cache[i][1][0]) for i in range(n_layers)]
    abssum = [torch.zeros_like(cache[i][1][0], dtype=torch.float64) for i in range(n_layers)]
    keep_at = _sample_steps(windows.shape[1], windows.shape[0])
    k = len(keep_at) * windows.shape[0]
    heads = [_head_subset(tuple(cache[i][1].shape), k) for i in range(n_layers)]
    last_C: list[torch.Tensor | None] = [None] * n_layers
    pending: list[torch.Tensor | None] = [None] * n_layers
    samples: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    readouts: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    handles = [mixer.ssm_C.register_forward_hook(lambda m, inp, out, i=i: last_C.__setitem__(i, inp[0].detach()))
               for i, mixer in enumerate(model.mixers)]
    try:
        for t in range(windows.shape[1]):
            model.step(windows[:, t], cache)
            for i in range(n_layers):
                h = cache[i][1].abs()
                torch.maximum(absmax[i], h.amax(0), out=absmax[i])
                abssum[i] += h.sum(0).double()
                shape = tuple(cache[i][1].shape)
                if pending[i] is not None:  # the state kept last step, read out by this step's C
                    r = _readout(last_C[i], shape)
                    samples[i].append(pending[i])
                    readouts[i].append(r if heads[i] is None else r[:, heads[i]])
                    pending[i] = None
                if t in keep_at:
                    h = cache[i][1].float()
                    pending[i] = (h if heads[i] is None else h[:, heads[i]]).clone()
            if on_batch and (t + 1) % 64 == 0:
                on_batch("states", 64)
    finally:
        for handle in handles:
            handle.remove()
    steps = windows.shape[0] * windows.shape[1]
    out = {}
    for i in range(n_layers):
        out[f"backbone.layers.{i}.mixer.state.absmax"] = absmax[i]
        out[f"backbone.layers.{i}.mixer.state.absmean"] = (abssum[i] / steps).float()
        if samples[i]:
            out[f"backbone.layers.{i}.mixer.state.samples"] = torch.cat(samples[i])
            out[f"backbone.layers.{i}.mixer.state.readout"] = torch.cat(readouts[i])
    return out


def calibrate(model: MambaLMHeadModel, windows: torch.Tensor, meta: dict, batch_size: int = 4,
              state_samples: int = 8, on_batch=None) -> Calibration:
    start = time.perf_counter()
    stats = collect(model, windows, batch_size, state_samples, on_batch)
    _check_finite(stats, "calibration statistic", " (the activations overflow in this dtype, or the weights are "
                  "damaged; try --dtype float32)")
    meta = {**meta, "samples": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
            "state_samples": int(min(state_samples, windows.shape[0])),
            "seconds": round(time.perf_counter() - start, 2)}
    return Calibration(stats, meta)
