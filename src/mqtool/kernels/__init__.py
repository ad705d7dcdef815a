"""Triton kernels that run a quantized Mamba model on a GPU, each with a plain-PyTorch reference.

Every public function launches its Triton kernel on CUDA tensors (and on CPU tensors when
``TRITON_INTERPRET=1`` was set before this package was imported: Triton's NumPy interpreter,
which the tests use) and runs its ``*_ref`` otherwise, e.g. on CPU or when Triton is missing
(:data:`HAS_TRITON`). The kernels never import ``mqtool.quant``: the few formulas they follow are
restated in each file, and the tests check the references against ``mqtool.quant``.

* :func:`act_quant` - per-token dynamic int8 quantization of activations; :func:`act_fake_quant`
  the same, dequantized in one launch (what a simulated W8A8 linear multiplies).
* :func:`int8_matmul` / :func:`w4a8_matmul` - W8A8 and W4A8 (packed int4) integer GEMMs with
  per-token activation scales and per-channel or per-group weight scales.
* :func:`state_update` - one Mamba-2 recurrent step on an int8, packed int4, fake-quantized or fp32
  state cache; :func:`mamba1_state_update` the Mamba-1 step on int8 or packed int4 codes.
"""

from ._common import HAS_TRITON, INTERPRET, use_triton
from .act_quant import act_fake_quant, act_fake_quant_ref, act_quant, act_quant_ref
from .int8_matmul import int8_matmul, int8_matmul_ref, unpack_int4_ref, w4a8_matmul, w4a8_matmul_ref
from .state_update import mamba1_state_update, mamba1_state_update_ref, state_update, state_update_ref

__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "act_fake_quant",
    "act_fake_quant_ref",
    "act_quant",
    "act_quant_ref",
    "int8_matmul",
    "int8_matmul_ref",
    "mamba1_state_update",
    "mamba1_state_update_ref",
    "state_update",
    "state_update_ref",
    "unpack_int4_ref",
    "use_triton",
    "w4a8_matmul",
    "w4a8_matmul_ref",
]
