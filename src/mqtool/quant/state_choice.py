"""Per-layer choice of the state quantizer from calibration states (`quantize-states --method auto`).

For every layer, each candidate — a method of :data:`~mqtool.quant.states.METHODS` (DSQ once per
channel scale of :data:`~mqtool.quant.states.CHANNEL_SCALES`) at the requested bits — fake-quantizes
that layer's sampled calibration states, and the candidate with the smallest error is kept. (The
stage passes only DSQ abs.max by default: see ``state_stage.AUTO_CHANNEL_SCALES`` for why.)

The error is the relative squared error of the *readout*, ``sum (C·(Q(h) - h))^2 / sum (C·h)^2``,
with ``C`` the SSM's C of the step after the sampled state: the quantized state is only ever used
through the next step's ``y = C·(dA h + dB x)``, so this measures what the quantization error does to
the output. A plain MSE of the state weighs every entry alike, although entries of states that C
reads with small weights hardly matter (Mamba's states have outlier states j with small C_j). It
costs one multiply and a sum over N per candidate. Left out: the decay dA of the next step (per head
in Mamba-2, per entry in Mamba-1; it shrinks error and signal alike over most of the state) and the
error's propagation over later steps (it decays the same way for every candidate).

With a bits budget (average bits over the layers, e.g. 4.5 at 4 bits), layers are then raised to
6 or 8 bits greedily, the raise with the largest error reduction per added bit first, while the
average stays within the budget. Errors of different layers are compared as they are (relative):
a layer whose readout error is a larger share of its signal gains more.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mqtool.errors import MqtoolError
from mqtool.quant.states import CHANNEL_SCALES, METHODS, quantize_state

__all__ = ["RAISE_BITS", "Choice", "candidates", "choose_per_layer", "describe", "readout_error"]

#: the bit widths a budget may raise a layer to
RAISE_BITS: tuple[int, ...] = (6, 8)


@dataclass(frozen=True)
class Choice:
    """One layer's choice: the quantizer spec and its readout error (and every candidate's)."""

    spec: dict
    error: float
    errors: dict[str, float]


def candidates(bits: int, channel_scales: tuple[str, ...] = CHANNEL_SCALES) -> list[dict]:
    """Every (method, channel_scale) spec at ``bits``; DSQ once per channel scale of ``channel_scales``."""
    out = []
    for method in METHODS:
        for scale in channel_scales if method == "dsq" else ("abs.mean.sqrt",):
            out.append({"bits": bits, "method": method, "channel_scale": scale})
    return out


def _name(spec: dict) -> str:
    return f"{spec['method']} {spec['channel_scale']}" if spec["method"] == "dsq" else spec["method"]


def readout_error(states: Tensor, readout: Tensor, spec: dict) -> float:
    """Relative squared readout error of quantizing ``states [k, ..., P, N]`` with ``spec``, read
    out by ``readout [k, ..., 1, N]``: ``sum (C·(Q(h) - h))^2 / sum (C·h)^2`` (C·h sums over N)."""
    h = states.float()
    err = ((quantize_state(h, spec["bits"], spec["method"], spec["channel_scale"]) - h) * readout).sum(-1)
    ref = (h * readout).sum(-1)
    return float(err.pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


def _best(states: Tensor, readout: Tensor, bits: int, channel_scales: tuple[str, ...]) -> Choice:
    specs = candidates(bits, channel_scales)
    errors = {_name(c): readout_error(states, readout, c) for c in specs}
    # ties keep the earlier candidate (min returns the first)
    spec = min(specs, key=lambda c: errors[_name(c)])
    return Choice(spec, errors[_name(spec)], errors)


def choose_per_layer(samples: list[tuple[Tensor, Tensor]], bits: int, bits_budget: float | None = None,
                     channel_scales: tuple[str, ...] = CHANNEL_SCALES) -> list[Choice]:
    """One :class:`Choice` per layer from ``(states, readout)`` calibration samples, at ``bits``
    (DSQ with each of ``channel_scales``); with ``bits_budget`` (an average over layers, >= bits)
    some layers are raised to 6 or 8 bits."""
    if not samples:
        raise MqtoolError("no layers to choose a state quantizer for")
    chosen = [_best(h, r, bits, channel_scales) for h, r in samples]
    if bits_budget is None:
        return chosen
    if isinstance(bits_budget, bool) or not isinstance(bits_budget, (int, float)) or bits_budget < bits:
        raise MqtoolError(f"bits budget must be a number >= the state bits ({bits}), got {bits_budget!r}")
    levels = [b for b in RAISE_BITS if b > bits]
    # every layer's best choice at each raised width, computed once
    at = [{b: _best(h, r, b, channel_scales) for b in levels} for h, r in samples]
    spare = bits_budget * len(samples) - bits * len(samples)
    while True:
        best, gain = None, 0.0
        for i, c in enumerate(chosen):
            for b in levels:
                extra = b - c.spec["bits"]
                if extra <= 0 or extra > spare + 1e-9:
                    continue
                g = (c.error - at[i][b].error) / extra
                if g > gain:
                    best, gain = (i, b), g
        if best is None:
            return chosen
        i, b = best
        spare -= b - chosen[i].spec["bits"]
        chosen[i] = at[i][b]


def describe(choices: list[Choice]) -> str:
    """e.g. ``"dsq abs.max x10, per-channel x2"`` (with bits when they differ)."""
    widths = {c.spec["bits"] for c in choices}
    counts: dict[str, int] = {}
    for c in choices:
        key = _name(c.spec) if len(widths) == 1 else f"H{c.spec['bits']} {_name(c.spec)}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items())

