"""Module swaps that make generation cheaper while computing the very same numbers.

The runtime runs the simulated model's own modules; where a module's PyTorch form costs several
kernel launches per call and a fused kernel gives the identical result, the runtime swaps it in
(gpt-fast's habit: quantization as a module swap, not a branch inside the model).

* A dynamic per-token activation quantizer (the W8A8 recipes' input quantizers) becomes one
  `kernels.act_fake_quant` launch (absmax, scale, round, dequantize), bit for bit the same.
"""

from __future__ import annotations

from torch import Tensor, nn

from mqtool import kernels
from mqtool.quant.quantizers import ActQuantizer

__all__ = ["FusedTokenFakeQuant", "fuse_activation_quantizers"]


class FusedTokenFakeQuant(nn.Module):
    """`ActQuantizer(bits, "per_token")` in one Triton launch."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, x: Tensor) -> Tensor:
        return kernels.act_fake_quant(x, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode=per_token, fused"


def _swappable(m: nn.Module) -> bool:
    return isinstance(m, ActQuantizer) and m.mode == "per_token" and not m.ste


def fuse_activation_quantizers(model: nn.Module) -> int:
    """Swap every dynamic per-token `ActQuantizer` of a CUDA model for :class:`FusedTokenFakeQuant`
    (in place; nothing where Triton or CUDA is missing). Returns how many were swapped."""
    p = next(model.parameters())
    if not (p.is_cuda and kernels.HAS_TRITON):
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if _swappable(child)]
    for parent, name, child in swaps:
        setattr(parent, name, FusedTokenFakeQuant(child.bits))
    return len(swaps)
