"""What every kernel file shares: the guarded Triton import, the kernel-or-reference dispatch and
the exact-arithmetic device helpers.

Triton is optional (the ``gpu`` / ``dev`` extras). Without it :data:`HAS_TRITON` is False, no
``@triton.jit`` function is defined and every public kernel function runs its PyTorch reference.

Triton decides at *decoration* time whether a ``@triton.jit`` function is compiled or interpreted
(``TRITON_INTERPRET=1``: the kernel runs on the CPU through NumPy), so :data:`INTERPRET` is read
once, at import, with Triton's own truth rule. Set the variable before importing ``mqtool.kernels``.

Exactness on a GPU: Triton's ``/`` on fp32 compiles to an approximate division (``div.full.f32``)
and ``tl.sqrt`` to an approximate square root, so the kernels that must match the reference bit
for bit use ``tl.math.div_rn`` / ``tl.sqrt_rn`` (IEEE round-to-nearest). Round-half-to-even
(``torch.round``) is :func:`rint` below; libdevice's ``rint`` would be one instruction on the GPU,
but the interpreter cannot run libdevice calls, and one code path for both is what the CPU tests
can vouch for.
"""

from __future__ import annotations

import os

import torch

try:  # the PyTorch fallback below needs none of this
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False


def _env_bool(name: str) -> bool:
    # the rule of triton.knobs.env_bool, so we agree with Triton about what "set" means
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on", "y")


#: True when Triton is importable and ``TRITON_INTERPRET`` was set when this module was imported:
#: the ``@triton.jit`` kernels are then NumPy-interpreted and run on CPU tensors.
INTERPRET: bool = HAS_TRITON and _env_bool("TRITON_INTERPRET")

#: Smallest activation / weight scale (``mqtool.quant.quantizers.SCALE_MIN``, restated).
SCALE_MIN = 1e-8
#: Floor of every DSQ state statistic (``mqtool.quant.states.EPS``, restated).
STATE_EPS = 1e-12


def qmax_for(bits: int) -> int:
    """Largest code of the symmetric ``bits``-bit grid: ``2**(bits-1) - 1`` (127 for 8, 7 for 4)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8 (int8 storage), got {bits!r}")
    return 2 ** (bits - 1) - 1


def true_div(x: torch.Tensor, d: float) -> torch.Tensor:
    """``x / d`` as an IEEE division on every device (``mqtool.quant.quantizers.true_div``, restated):
    PyTorch's CUDA division by a Python number multiplies by the reciprocal instead, an ulp off at
    times, while the kernels divide with ``div_rn``."""
    return x / torch.full((), d, dtype=x.dtype, device=x.device)


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run these kernels in this environment, or None.

    Triton < 3.7's interpreter calls ``int()`` on 1-element arrays, which NumPy >= 2.4 refuses, so
    every kernel with a loop over a runtime bound fails (triton-lang/triton#9171, fixed in 3.7).
    """
    if not INTERPRET:
        return None
    import numpy

    def version(v: str) -> tuple[int, int]:
        major, minor = v.split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
                "(triton-lang/triton#9171): use triton >= 3.7 or numpy < 2.4 for TRITON_INTERPRET=1")
    return None


def use_triton(t: torch.Tensor) -> bool:
    """Whether a public function should launch its Triton kernel for data on ``t``'s device:
    on CUDA when Triton is installed; on the CPU only under ``TRITON_INTERPRET=1``."""
    if not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return True
    return INTERPRET and t.device.type == "cpu"


if HAS_TRITON:

    @triton.jit
    def rint(v):
        """Round half to even (``torch.round``) of fp32 ``v``, exact for ``|v| < 2**23``.

        ``v - floor(v)`` is exact there, so the tie test ``d == 0.5`` is exact; a tie goes up only
        when ``floor(v)`` is odd. Callers clamp ``v`` to a small range first.
        """
        f = tl.floor(v)
        d = v - f
        f_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        up = (d > 0.5) | ((d == 0.5) & f_odd)
        return tl.where(up, f + 1.0, f)

    @triton.jit
    def quant_codes(v, QMAX: tl.constexpr):
        """``clamp(round_half_even(v), -QMAX, QMAX)`` as fp32 (cast to int8 by the caller).

        Clamping to ``±(QMAX + 1)`` first keeps ``rint`` in its exact range and changes nothing:
        anything beyond rounds to at least ``QMAX + 1`` and is clamped to ``QMAX`` either way.
        """
        lim = QMAX + 1.0
        v = tl.minimum(tl.maximum(v, -lim), lim)
        return tl.minimum(tl.maximum(rint(v), -QMAX * 1.0), QMAX * 1.0)
