"""Q-Mamba's state-cache quantization stage (`mqtool quantize-states`).

The stage only decides *how* the recurrent state is quantized; no scale is calibrated, because
every method in :mod:`mqtool.quant.states` computes its scales dynamically from the state itself at
every step. It records the quantizer in the manifest's ``online`` section (key
``"state_quantizer"``: one spec, or ``{"per_layer": [spec, ...]}`` when layers differ) and attaches
it to every mixer, where the model applies it to the state it stores between recurrent steps.

``method="auto"`` with a calibration chooses per layer (:mod:`mqtool.quant.state_choice`: the
candidate with the smallest readout error on that layer's sampled calibration states, and with a
``bits_budget`` some layers at 6 or 8 bits); without one it takes the family's default
(:data:`AUTO_METHOD`).

Consequences for evaluation: the quantizer acts only where a state is *stored* — recurrent mode
(every step) and the cache a parallel prefill fills for generation. A plain parallel forward
(no cache) never stores a state, so its logits do not change: evaluate a state-quantized model in
recurrent mode, as Q-Mamba does.
"""

from __future__ import annotations

from typing import Any

from mqtool.errors import MqtoolError
from mqtool.models import MambaLMHeadModel
from mqtool.quant.attach import apply_online
from mqtool.quant.state_choice import choose_per_layer, describe
from mqtool.quant.states import StateQuantizer

__all__ = ["AUTO_METHOD", "apply_quantize_states", "auto_method", "calibration_samples"]

#: ``method="auto"``: (method, DSQ channel scale) that measured best for the family at 4 bits
#: (docs/results.md): DSQ with abs.max on both, whose steps are never coarser than per-channel's (its
#: state factor is <= 1). The paper's abs.mean.sqrt was a little worse on Mamba-2 and far worse on
#: Mamba-1 (a state there is d_inner x 16, and its state scale is a max over all d_inner channels).
AUTO_METHOD: dict[str, tuple[str, str]] = {"Mamba2": ("dsq", "abs.max"), "Mamba1": ("dsq", "abs.max")}

#: DSQ channel scales per-layer ``auto`` tries unless ``channel_scale`` names one. Only abs.max: its
#: step is never coarser than per-channel's, whatever the state. The mean-based and .sqrt scales can
#: give a whole state column a coarse step when one channel is nearly zero but for one entry; the
#: sampled states need not show that, and the error then persists through the recurrence. Measured
#: (techdocs-test slice, Mamba-1 25M, H4): one layer on dsq abs.mean, chosen for a 12% smaller
#: one-step readout error, took perplexity from 58.0 to 11300.
AUTO_CHANNEL_SCALES: tuple[str, ...] = ("abs.max",)


def auto_method(model: MambaLMHeadModel) -> tuple[str, str]:
    """The (method, channel_scale) that ``method="auto"`` stands for on this model."""
    return AUTO_METHOD[model.config.layer]


def calibration_samples(model: MambaLMHeadModel, calib: Any) -> list[tuple[Any, Any]]:
    """Every layer's sampled calibration states and their readouts (``state.samples``,
    ``state.readout``); a calibration without them (older, or ``--state-samples 0``) is refused."""
    out = []
    for i, mixer in enumerate(model.mixers):
        name = f"backbone.layers.{i}.mixer.state"
        h, r = calib.stats.get(f"{name}.samples"), calib.stats.get(f"{name}.readout")
        if h is None or r is None:
            raise MqtoolError("this calibration has no sampled states (made by an older mqtool, or with "
                              "--state-samples 0): re-run `mqtool calibrate` for --method auto")
        shape = tuple(mixer.allocate_cache(1)[1].shape[1:])
        # Mamba-2 samples may keep a subset of heads (dim 1): the other dims must match
        if h.dim() != len(shape) + 1 or tuple(h.shape[-2:]) != shape[-2:] or r.shape[-1] != shape[-1]:
            raise MqtoolError(f"calibration states of layer {i} have shape {tuple(h.shape[1:])}, the model's "
                              f"{shape}: run `mqtool calibrate` with this model")
        out.append((h, r))
    return out


def apply_quantize_states(
    model: MambaLMHeadModel,
    online: dict[str, Any],
    calib: Any = None,
    bits: int = 4,
    method: str = "dsq",
    channel_scale: str | None = None,
    bits_budget: float | None = None,
) -> dict[str, Any]:
    """Attach a state quantizer (``bits``, ``method``, DSQ's ``channel_scale``) to every mixer.

    ``method="auto"``: with ``calib`` (a calibration with sampled states), per layer the candidate
    with the smallest readout error (DSQ with :data:`AUTO_CHANNEL_SCALES`, or the ``channel_scale``
    given), and with
    ``bits_budget`` (average bits, >= ``bits``) some layers raised to 6 or 8 bits; without
    ``calib``, method and channel scale by family (:data:`AUTO_METHOD`; an explicit
    ``channel_scale`` still wins). The record says which. ``channel_scale`` None: abs.mean.sqrt.

    ``online["state_quantizer"]`` is set (replacing any earlier one) so that loading the
    checkpoint rebuilds the same quantizers: one spec when every layer has the same, else
    ``{"per_layer": [spec, ...]}``. ``calib`` is unused by the other methods: scales are dynamic.
    ``bits=16`` attaches a quantizer that is the identity.
    Raises ``MqtoolError`` on an unknown method / channel_scale, unsupported bits, a budget without
    ``auto`` and a calibration, or a calibration without sampled states.
    """
    StateQuantizer(bits, "dsq", channel_scale or "abs.mean.sqrt")  # validates bits and channel_scale
    if bits_budget is not None and (method != "auto" or calib is None):
        raise MqtoolError("--bits-budget needs --method auto and a calibration (--calib)")
    if method == "auto" and calib is not None and bits < 16:
        samples = calibration_samples(model, calib)
        scales = (channel_scale,) if channel_scale else AUTO_CHANNEL_SCALES
        choices = choose_per_layer(samples, bits, bits_budget, scales)
        specs = [c.spec for c in choices]
        same = all(sp == specs[0] for sp in specs)
        entry: dict[str, Any] = dict(specs[0]) if same else {"per_layer": specs}
        online["state_quantizer"] = entry
        apply_online(model, {"state_quantizer": entry})
        avg = sum(sp["bits"] for sp in specs) / len(specs)
        return {
            "state_quantizer": entry,
            "method": f"auto -> per layer from calibration: {describe(choices)}",
            "average_bits": avg,
            "layers": [{"layer": i, **c.spec, "readout_error": c.error, "candidates": c.errors}
                       for i, c in enumerate(choices)],
            "scales": "dynamic (recomputed from the state at every step; the method chosen from calibration)",
            "eval_mode": "recurrent",
        }
    if method == "auto":
        chosen, auto_scale = auto_method(model)
        channel_scale = channel_scale or auto_scale
    else:
        chosen, channel_scale = method, channel_scale or "abs.mean.sqrt"
    spec = StateQuantizer(bits, chosen, channel_scale).to_dict()  # validates the parameters
    online["state_quantizer"] = spec
    apply_online(model, {"state_quantizer": spec})
    return {
        "state_quantizer": dict(spec),
        **({"method": f"auto -> {chosen} ({channel_scale}) for {model.config.layer}"
                      + ("" if calib is not None else " (no calibration: pass --calib to choose per layer)")}
           if method == "auto" else {}),
        "scales": "dynamic (recomputed from the state at every step; nothing calibrated)",
        "eval_mode": "recurrent",
    }
