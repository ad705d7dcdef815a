"""The generation runtime, a room of its own fed by the same checkpoints as everything else:

* :mod:`.cache` - the state cache in its stored form (float, int8 codes, packed int4 codes + scales);
* :mod:`.step` - the decode step (mamba-ssm's fused pieces, mqtool's quantized-state kernels, or
  the plain-PyTorch reference);
* :mod:`.generate` - prefill into the cache, CUDA-graph decode loop (:class:`Runtime`);
* :mod:`.bench` - speed and memory beside mamba-ssm's generate;
* :mod:`.integer` - exported checkpoints on the integer GEMM kernels (:class:`IntLinear`).
"""

from mqtool.runtime.bench import benchmark, mamba_ssm_baseline, plot_sweep
from mqtool.runtime.cache import LayerCache, StateCache, StateFormat, pack_int4, state_format_of, unpack_int4
from mqtool.runtime.generate import Runtime
from mqtool.runtime.integer import IntLinear, kernel_backend, load_integer_model, model_bytes, tensor_bytes

__all__ = [
    "IntLinear", "LayerCache", "Runtime", "StateCache", "StateFormat", "benchmark", "kernel_backend",
    "load_integer_model", "mamba_ssm_baseline", "model_bytes", "pack_int4", "plot_sweep", "state_format_of",
    "tensor_bytes", "unpack_int4",
]
