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

__all__ = ["apply_quantize_states"]


def apply_quantize_states(
    model: MambaLMHeadModel,
    online: dict[str, Any],
    calib: Any = None,
    bits: int = 4,
    method: str = "dsq",
    channel_scale: str = "abs.mean.sqrt",
) -> dict[str, Any]:
    """Attach a state quantizer (``bits``, ``method``, DSQ's ``channel_scale``) to every mixer.

    ``online["state_quantizer"]`` is set (replacing any earlier one) so that loading the
    checkpoint rebuilds the same quantizer. ``calib`` is accepted for the common stage signature
    and unused: scales are dynamic. ``bits=16`` attaches a quantizer that is the identity.
    Raises ``MqtoolError`` on an unknown method / channel_scale or unsupported bits.
    """
    spec = StateQuantizer(bits, method, channel_scale).to_dict()  # validates the parameters
    online["state_quantizer"] = spec
    apply_online(model, {"state_quantizer": spec})
    return {
        "state_quantizer": dict(spec),
        "scales": "dynamic (recomputed from the state at every step; nothing calibrated)",
        "eval_mode": "recurrent",
    }
