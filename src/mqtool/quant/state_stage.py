"""Q-Mamba's state-cache quantization stage (`mqtool quantize-states`).

The stage only decides *how* the recurrent state is quantized; there is nothing to calibrate,
because every method in :mod:`mqtool.quant.states` computes its scales dynamically from the state
itself at every step. It records the quantizer in the manifest's ``online`` section (key
``"state_quantizer"``) and attaches it to every mixer, where the model applies it to the state it
stores between recurrent steps.

Consequences for evaluation: the quantizer acts only where a state is *stored* — recurrent mode
(every step) and the cache a parallel prefill fills for generation. A plain parallel forward
(no cache) never stores a state, so its logits do not change: evaluate a state-quantized model in
recurrent mode, as Q-Mamba does.
"""

from __future__ import annotations

from typing import Any

from mqtool.models import MambaLMHeadModel
from mqtool.quant.attach import apply_online
from mqtool.quant.states import StateQuantizer

__all__ = ["AUTO_METHOD", "apply_quantize_states", "auto_method"]

#: ``method="auto"``: (method, DSQ channel scale) that measured best for the family at 4 bits
#: (docs/results.md): DSQ with abs.max on both, whose steps are never coarser than per-channel's (its
#: state factor is <= 1). The paper's abs.mean.sqrt was a little worse on Mamba-2 and far worse on
#: Mamba-1 (a state there is d_inner x 16, and its state scale is a max over all d_inner channels).
AUTO_METHOD: dict[str, tuple[str, str]] = {"Mamba2": ("dsq", "abs.max"), "Mamba1": ("dsq", "abs.max")}


def auto_method(model: MambaLMHeadModel) -> tuple[str, str]:
    """The (method, channel_scale) that ``method="auto"`` stands for on this model."""
    return AUTO_METHOD[model.config.layer]


def apply_quantize_states(
    model: MambaLMHeadModel,
    online: dict[str, Any],
    calib: Any = None,
    bits: int = 4,
    method: str = "dsq",
    channel_scale: str | None = None,
) -> dict[str, Any]:
    """Attach a state quantizer (``bits``, ``method``, DSQ's ``channel_scale``) to every mixer.
    ``method="auto"`` picks method and channel scale by family (:data:`AUTO_METHOD`; an explicit
    ``channel_scale`` still wins); the record says which. ``channel_scale`` None: abs.mean.sqrt.

    ``online["state_quantizer"]`` is set (replacing any earlier one) so that loading the
    checkpoint rebuilds the same quantizer. ``calib`` is accepted for the common stage signature
    and unused: scales are dynamic. ``bits=16`` attaches a quantizer that is the identity.
    Raises ``MqtoolError`` on an unknown method / channel_scale or unsupported bits.
    """
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
        **({"method": f"auto -> {chosen} ({channel_scale}) for {model.config.layer}"} if method == "auto" else {}),
        "scales": "dynamic (recomputed from the state at every step; nothing calibrated)",
        "eval_mode": "recurrent",
    }
