"""ESR — Q-Mamba's efficient selectivity reconstruction (`mqtool reconstruct`).

Block by block, the rows of the projections that produce the selective parameters Δ, B and C
(optionally conv1d and the block's norm) are trained so that the *state-quantized* block
reproduces the FP block: the loss is the MSE between the FP block's output and the quantized
block's output, both on the block's FP inputs (Q-Mamba, Chen et al. 2025).

The quantized recurrence ``h_t^q = Ā_t Q(h_{t-1}^q) + B̄_t x_t`` is sequential; ESR simulates it in
parallel by computing every exact state with the parallel scan and quantizing one step only,
``h_t^q ≈ Ā_t Q(h_{t-1}) + B̄_t x_t`` (:func:`qat_mixer_forward`), with a straight-through round.

Design decisions:

* The *quantized* block is the block as attached: its state quantizer (required) and whatever
  activation quantizers / online transforms earlier stages attached. The *FP* block is the same
  block with every ``ActQuantizer`` and the state quantizer temporarily replaced by identities
  (online rotations and smoothing are function-preserving and stay). Weights are whatever the
  model holds. If an earlier stage simulated weight quantization in place, pass that stage's
  ``tensors`` record as ``weight_specs``: those weights train quantization-aware (forward and
  backward on the grid, updates to a float copy, straight-through) and end on their grid. Without
  it ESR trains in float and the trained rows are left off the grid, to be quantized again later
  (the record says which).
* The FP hidden states are propagated block by block (the next block's FP input is this block's
  FP output, computed before this block is trained), so memory holds one block's inputs and
  targets for all windows (on the CPU; batches move to the model's device).
* Activation quantizers of the block run straight-through while it trains (the forward value is
  unchanged): rounding has no gradient, and without this the rows ahead of a quantized linear input
  (all of them, for out_proj's) would learn from the scales' gradient alone.
* Row-wise training: a parameter whose rows are only partly trainable (Mamba-2's in_proj,
  Mamba-1's x_proj) gets a gradient mask; with AdamW(weight_decay=0) a zero gradient means a zero
  update, so rows outside ``train`` stay bit-identical.
* Mamba-1's exact states are computed here with an autograd-friendly chunked recurrence (``unbind``
  + ``stack``, ~chunk + l / chunk recorded steps): ``scan.mamba1_scan`` writes each step into a
  preallocated tensor in place, which makes its backward copy the whole time chunk at every step
  (measured 35-50x slower than a plain per-step loop for 2048 tokens on CPU). Mamba-2 uses
  ``scan.mamba2_ssd(return_states=True)``.
* Resumable (``state_dir``): after each block its trained parameters and the next block's FP inputs
  are written, then ``esr.json`` (the commit point). A restart with the same settings restores the
  finished blocks and continues; shuffling uses a generator seeded per block, so an interrupted and
  resumed run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mqtool.errors import MqtoolError
from mqtool.models import MambaLMHeadModel, scan
from mqtool.models.layers import causal_conv1d
from mqtool.models.lm import Block
from mqtool.models.mamba1 import Mamba
from mqtool.models.mamba2 import Mamba2
from mqtool.quant.quantizers import ActQuantizer, dequantize_weight, fake_quantize_weight
from mqtool.quant.states import StateQuantizer, quantize_one_step
from mqtool.quant.weights import KEPT_CODES, keep_codes

__all__ = ["TRAINABLE", "apply_reconstruct", "qat_block_forward", "qat_mixer_forward", "trainable_rows"]

TRAINABLE: tuple[str, ...] = ("dt", "B", "C", "conv", "norm")
STATE_FILE = "esr.json"
# name (relative to the block) -> (parameter, mask of its trainable rows, or None for all rows)
Rows = dict[str, tuple[nn.Parameter, Tensor | None]]
WEIGHTS_NOTE = ("ESR trains the selected rows in floating point: weight quantization, if an earlier stage "
                "simulated it, must be re-applied to the trained rows after reconstruction (quantize "
                "weights after this stage, or pass that stage's `tensors` record as weight_specs).")
REGRID_NOTE = ("trained weights named in weight_specs trained on their RTN grid (straight-through) and "
               "were put back on it after each block (only the trained rows move: rows and groups have "
               "their own scales)")


# ------------------------------------------------------------------- quantization-aware forward

def _linear_recurrence(dA: Tensor, dBx: Tensor, chunk: int = 64) -> Tensor:
    """Every exact state of ``h_t = dA_t * h_{t-1} + dBx_t`` (h_{-1} = 0), time dim 1.

    Two short loops instead of one of the sequence's length (autograd records ~chunk + l / chunk
    steps, not l): chunk-local states from zero, all chunks at once; then each chunk's initial state
    from the previous chunk's last, carried in through the chunk's running decay. Built from
    ``unbind`` / ``stack`` (no in-place writes), so the backward stays linear in the length.
    """
    b, l = dBx.shape[:2]
    T = max(1, min(chunk, l))
    pad = (-l) % T
    if pad:  # decay 1 and no input on the pads: the real states are unchanged
        dA = torch.cat([dA, dA.new_ones(b, pad, *dA.shape[2:])], dim=1)
        dBx = torch.cat([dBx, dBx.new_zeros(b, pad, *dBx.shape[2:])], dim=1)
    n_chunks = (l + pad) // T
    a = dA.reshape(b, n_chunks, T, *dA.shape[2:])
    bx = dBx.reshape(b, n_chunks, T, *dBx.shape[2:])
    h = torch.zeros_like(bx[:, :, 0])
    decay = torch.ones_like(a[:, :, 0])
    local, decays = [], []
    for a_t, bx_t in zip(a.unbind(2), bx.unbind(2), strict=True):
        h = torch.addcmul(bx_t, a_t, h)
        decay = decay * a_t
        local.append(h)
        decays.append(decay)
    # each chunk's last local state and total decay, unbound (not indexed: an index's backward
    # would write a zero gradient the size of all states per chunk)
    init = [torch.zeros_like(h[:, 0])]
    for last_h, last_decay in list(zip(h.unbind(1), decay.unbind(1), strict=True))[:-1]:
        init.append(torch.addcmul(last_h, last_decay, init[-1]))
    states = torch.addcmul(torch.stack(local, 2), torch.stack(decays, 2), torch.stack(init, 1).unsqueeze(2))
    return states.reshape(b, n_chunks * T, *states.shape[3:])[:, :l]


def _state_quantizer(mixer: nn.Module) -> StateQuantizer:
    q = getattr(mixer, "state_quantizer", None)
    if not isinstance(q, StateQuantizer):
        raise MqtoolError("ESR needs a state quantizer attached to every mixer: run quantize-states first")
    return q


def _qat_mamba1(mixer: Mamba, hidden: Tensor, quantizer: StateQuantizer) -> Tensor:
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)
    x = mixer.conv_act(causal_conv1d(x, mixer.conv1d.weight, mixer.conv1d.bias))
    u, delta, B, C = mixer._ssm_inputs(x)
    uf, df = u.float(), delta.float()
    dA = torch.exp(df.unsqueeze(-1) * mixer._A())                               # [b, l, d, n]
    dBx = (df * uf).unsqueeze(-1) * B.float().unsqueeze(-2)                      # [b, l, d, n]
    h_q = quantize_one_step(_linear_recurrence(dA, dBx), dA, dBx, quantizer)
    y = (h_q @ C.float().unsqueeze(-1)).squeeze(-1) + uf * mixer.D.float()       # [b, l, d]
    y = (mixer.ssm_y(y) * mixer.gate_act(z.float())).to(hidden.dtype)
    return mixer.out_proj(y)


def _qat_mamba2(mixer: Mamba2, hidden: Tensor, quantizer: StateQuantizer) -> Tensor:
    b, l, _ = hidden.shape
    z, xBC, dt = mixer._split(mixer.in_proj(hidden))
    xBC = mixer.conv_act(causal_conv1d(xBC, mixer.conv1d.weight, mixer.conv1d.bias))
    x, delta, B, C = mixer._ssm_inputs(xBC, dt)
    A, D = mixer._A(), mixer._D()
    _, _, states = scan.mamba2_ssd(x, delta, A, B, C, None, mixer.chunk_size, return_states=True)
    xf, df = x.float(), delta.float()
    per_group = mixer.nheads // mixer.ngroups
    Bh = B.float().repeat_interleave(per_group, dim=-2)                         # [b, l, h, n]
    Ch = C.float().repeat_interleave(per_group, dim=-2)
    dA = torch.exp(df * A)                                                       # [b, l, h]
    dBx = (df.unsqueeze(-1) * xf).unsqueeze(-1) * Bh.unsqueeze(-2)               # [b, l, h, p, n]
    h_q = quantize_one_step(states, dA, dBx, quantizer)
    y = (h_q @ Ch.unsqueeze(-1)).squeeze(-1)                                     # [b, l, h, p]
    y = y + xf * (D.float()[:, None] if D.dim() == 1 else D.float())
    y = mixer.norm(mixer.ssm_y(y.reshape(b, l, mixer.d_inner)), z).to(hidden.dtype)
    return mixer.out_proj(y)


def qat_mixer_forward(mixer: nn.Module, hidden: Tensor) -> Tensor:
    """ESR's quantization-aware parallel forward of a mixer: hidden [b, l, d_model] -> [b, l, d_model].

    All exact states come from a parallel scan; the output at step t reads
    ``h_q_t = dA_t * Q(h_{t-1}) + dBx_t`` (:func:`mqtool.quant.states.quantize_one_step`, STE),
    ``y_t = C_t · h_q_t + D x_t``, then the gate / gated norm and out_proj as in the mixer's own
    forward. Every piece is the mixer's own (in_proj, conv1d, ``_ssm_inputs``, A, D, gate, norm,
    out_proj), so whatever is attached to it applies. With a 16-bit (identity) state quantizer
    this equals the mixer's parallel forward.
    """
    quantizer = _state_quantizer(mixer)
    if isinstance(mixer, Mamba2):
        return _qat_mamba2(mixer, hidden, quantizer)
    if isinstance(mixer, Mamba):
        return _qat_mamba1(mixer, hidden, quantizer)
    raise MqtoolError(f"ESR does not know the mixer type {type(mixer).__name__}")


def qat_block_forward(block: Block, hidden: Tensor, residual: Tensor | None) -> Tensor:
    """A block's mixer output (what ``Block.forward`` returns first) through :func:`qat_mixer_forward`."""
    residual = block._residual(hidden, residual)
    return qat_mixer_forward(block.mixer, block.norm(residual.to(block.norm.weight.dtype)))


# -------------------------------------------------------------------------- trainable rows

def _rows(param: Tensor, start: int, stop: int) -> Tensor:
    mask = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
    mask[start:stop] = True
    return mask


def trainable_rows(block: Block, train: tuple[str, ...] | list[str]) -> Rows:
    """``name -> (parameter, row mask or None for every row)`` of the block's parameters ESR trains.

    Names are relative to the block. "dt": Mamba-1 dt_proj (weight, bias) and x_proj's dt rows;
    Mamba-2 in_proj's dt rows and dt_bias. "B" / "C": the rows producing B / C (Mamba-1 x_proj,
    Mamba-2 in_proj; on Mamba-2 they then pass through their conv1d channels, trained only with
    "conv"). "conv": conv1d weight and bias. "norm": the block's (pre-mixer) norm.
    """
    unknown = set(train) - set(TRAINABLE)
    if unknown:
        raise MqtoolError(f"unknown ESR trainable parts {sorted(unknown)}; choose from {list(TRAINABLE)}")
    mixer = block.mixer
    masks: dict[str, Tensor | None] = {}

    def add(name: str, param: Tensor | None, start: int | None = None, stop: int | None = None) -> None:
        if param is None:
            return
        if start is None:
            masks[name] = None
            return
        rows = _rows(param, start, stop)
        if name in masks:
            if masks[name] is None:
                return
            rows = rows | masks[name]
        masks[name] = None if bool(rows.all()) else rows

    if isinstance(mixer, Mamba2):
        d, gn, h = mixer.d_inner, mixer.ngroups * mixer.d_state, mixer.nheads
        spans = {"B": (2 * d, 2 * d + gn), "C": (2 * d + gn, 2 * d + 2 * gn),
                 "dt": (2 * d + 2 * gn, 2 * d + 2 * gn + h)}
        for part in ("dt", "B", "C"):
            if part in train:
                add("mixer.in_proj.weight", mixer.in_proj.weight, *spans[part])
                add("mixer.in_proj.bias", mixer.in_proj.bias, *spans[part])
        if "dt" in train:
            add("mixer.dt_bias", mixer.dt_bias)
    elif isinstance(mixer, Mamba):
        r, n = mixer.dt_rank, mixer.d_state
        spans = {"dt": (0, r), "B": (r, r + n), "C": (r + n, r + 2 * n)}
        for part in ("dt", "B", "C"):
            if part in train:
                add("mixer.x_proj.weight", mixer.x_proj.weight, *spans[part])
                add("mixer.x_proj.bias", mixer.x_proj.bias, *spans[part])
        if "dt" in train:
            add("mixer.dt_proj.weight", mixer.dt_proj.weight)
            add("mixer.dt_proj.bias", mixer.dt_proj.bias)
    else:
        raise MqtoolError(f"ESR does not know the mixer type {type(mixer).__name__}")
    if "conv" in train:
        add("mixer.conv1d.weight", mixer.conv1d.weight)
        add("mixer.conv1d.bias", mixer.conv1d.bias)
    if "norm" in train:
        add("norm.weight", block.norm.weight)
        add("norm.bias", getattr(block.norm, "bias", None))
    params = dict(block.named_parameters())
    return {name: (params[name], mask) for name, mask in masks.items()}


# ------------------------------------------------------------------------------- helpers

@contextmanager
def _unquantized(module: nn.Module) -> Iterator[None]:
    """Temporarily replace every activation and state quantizer under ``module`` by an identity."""
    swapped = []
    for name, sub in list(module.named_modules()):
        if name and isinstance(sub, (ActQuantizer, StateQuantizer)):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            swapped.append((parent, attr, sub))
            setattr(parent, attr, nn.Identity())
    try:
        yield
    finally:
        for parent, attr, sub in reversed(swapped):
            setattr(parent, attr, sub)


@contextmanager
def _straight_through(module: nn.Module) -> Iterator[None]:
    """Temporarily put every activation quantizer under ``module`` in straight-through mode: a
    plain round has a zero gradient, so a quantizer between the trained rows and the loss (e.g. at
    out_proj's input) would otherwise pass back only its scale's gradient, which is noise."""
    quantizers = [m for m in module.modules() if isinstance(m, ActQuantizer)]
    flags = [q.ste for q in quantizers]
    for q in quantizers:
        q.ste = True
    try:
        yield
    finally:
        for q, flag in zip(quantizers, flags, strict=True):
            q.ste = flag


def _batches(n: int, batch_size: int, order: Tensor | None = None) -> Iterator[Tensor]:
    order = torch.arange(n) if order is None else order
    for s in range(0, n, batch_size):
        yield order[s:s + batch_size]


def _take(t: Tensor | None, idx: Tensor, device: torch.device) -> Tensor | None:
    return None if t is None else t[idx].to(device)


@torch.no_grad()
def _fp_block(block: Block, hidden: Tensor, residual: Tensor | None, batch_size: int,
              device: torch.device) -> tuple[Tensor, Tensor]:
    """The FP block's (output, residual) for every window, on the CPU."""
    outs, resids = [], []
    with _unquantized(block):
        for idx in _batches(hidden.shape[0], batch_size):
            out, res = block(_take(hidden, idx, device), _take(residual, idx, device))
            outs.append(out.cpu())
            resids.append(res.cpu())
    return torch.cat(outs), torch.cat(resids)


@torch.no_grad()
def _block_loss(block: Block, hidden: Tensor, residual: Tensor | None, target: Tensor, batch_size: int,
                device: torch.device) -> float:
    """Mean squared error of the quantization-aware block output against the FP target."""
    total = 0.0
    for idx in _batches(hidden.shape[0], batch_size):
        out = qat_block_forward(block, _take(hidden, idx, device), _take(residual, idx, device))
        total += F.mse_loss(out.float(), target[idx].to(device).float(), reduction="sum").item()
    return total / target.numel()


def _train_block(model: MambaLMHeadModel, block: Block, params: Rows,
                 hidden: Tensor, residual: Tensor | None, target: Tensor, epochs: int, lr: float,
                 batch_size: int, generator: torch.Generator, device: torch.device,
                 grids: dict[str, dict[str, Any]] | None = None) -> None:
    """AdamW on the rows of ``params``. A parameter named in ``grids`` (its weight-quantization
    spec) is trained quantization-aware: each step runs forward and backward with the weight on its
    grid and applies the gradient to a float copy (straight-through), so the loss training lowers
    is the loss of the weights that are kept (training in float and re-gridding afterwards measured
    slightly worse: docs/results.md)."""
    grids = grids or {}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    hooks = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p, mask in params.values():
            p.requires_grad_(True)
            if mask is not None:
                m = mask.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
                hooks.append(p.register_hook(lambda g, m=m: g * m))
        opt = torch.optim.AdamW([p for p, _ in params.values()], lr=lr, weight_decay=0.0)
        with torch.enable_grad(), _straight_through(block):
            for _ in range(epochs):
                order = torch.randperm(hidden.shape[0], generator=generator)
                for idx in _batches(hidden.shape[0], batch_size, order):
                    latent = {}
                    with torch.no_grad():
                        for name, spec in grids.items():
                            p = params[name][0]
                            latent[name] = p.detach().clone()
                            p.copy_(_grid_point(p, spec).to(p.dtype))
                    out = qat_block_forward(block, _take(hidden, idx, device), _take(residual, idx, device))
                    loss = F.mse_loss(out.float(), target[idx].to(device).float())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    with torch.no_grad():
                        for name, w in latent.items():
                            params[name][0].copy_(w)
                    opt.step()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, _ in params.values():
            p.grad = None


def _check_args(windows: Any, model: MambaLMHeadModel, epochs: Any, lr: Any, train: Any,
                batch_size: Any, seed: Any) -> tuple[Tensor, tuple[str, ...]]:
    if isinstance(train, str):
        train = [t.strip() for t in train.split(",") if t.strip()]
    train = tuple(dict.fromkeys(train))  # keep order, drop repeats
    if not train:
        raise MqtoolError(f"ESR needs at least one trainable part; choose from {list(TRAINABLE)}")
    unknown = set(train) - set(TRAINABLE)
    if unknown:
        raise MqtoolError(f"unknown ESR trainable parts {sorted(unknown)}; choose from {list(TRAINABLE)}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise MqtoolError(f"epochs must be a non-negative integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MqtoolError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or lr == float("inf"):
        raise MqtoolError(f"lr must be a positive number, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MqtoolError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.numel() == 0 \
            or windows.is_floating_point() or windows.is_complex() or windows.dtype == torch.bool:
        raise MqtoolError("ESR needs calibration windows: an integer token tensor [n_windows, seq_len]")
    vocab = model.backbone.embedding.num_embeddings
    if int(windows.min()) < 0 or int(windows.max()) >= vocab:
        raise MqtoolError(f"calibration windows hold token ids outside the vocabulary [0, {vocab})")
    return windows.long(), train


@torch.no_grad()
def _grid_point(w: Tensor, spec: dict[str, Any]) -> Tensor:
    """The weight on the grid of its weight-quantization spec ``{"bits", "group_size"}``: the RTN
    fixed point (scales are per row or per group, so rows that did not train, already fixed points,
    stay bit-identical)."""
    w = w.detach().float()
    for _ in range(4):
        nxt = fake_quantize_weight(w, spec["bits"], spec.get("group_size"))
        if torch.equal(nxt, w):
            break
        w = nxt
    return w


@torch.no_grad()
def _regrid(lin: nn.Module, spec: dict[str, Any]) -> None:
    """Put a trained weight back on its grid (:func:`_grid_point`), in place (keeping its codes
    where the weight is bf16/fp16, as the quantize stage does)."""
    w = lin.weight.detach().float()
    kept = getattr(lin, KEPT_CODES, None)
    if kept is not None:  # what did not train keeps its exact value, not that value's bf16 rounding
        exact = dequantize_weight(*kept).to(w.device)
        w = torch.where(exact.to(lin.weight.dtype) == lin.weight.detach(), exact, w)
    keep_codes(lin, _grid_point(w, spec), spec["bits"], spec.get("group_size"))


def _owner(block: nn.Module, param_name: str) -> nn.Module:
    """The module holding a block's parameter (``mixer.in_proj.weight`` -> ``mixer.in_proj``)."""
    return block.get_submodule(param_name.rpartition(".")[0])


def _check_weight_specs(weight_specs: Any, model: MambaLMHeadModel) -> dict[str, dict[str, Any]]:
    if weight_specs is None:
        return {}
    if not isinstance(weight_specs, dict):
        raise MqtoolError("weight_specs must map '<linear>.weight' to its spec {'bits', 'group_size'}")
    params = dict(model.named_parameters())
    for name, spec in weight_specs.items():
        if name not in params and name != "lm_head.weight":
            raise MqtoolError(f"weight_specs names {name!r}, which is not a parameter of this model")
        if not isinstance(spec, dict) or "bits" not in spec:
            raise MqtoolError(f"weight_specs[{name!r}] must be a mapping with 'bits' (and 'group_size')")
    return weight_specs


# ------------------------------------------------------------------------------ resumption

def _fingerprint(model: MambaLMHeadModel, windows: Tensor, settings: dict[str, Any]) -> dict[str, Any]:
    h = hashlib.sha256()
    h.update(windows.cpu().contiguous().numpy().tobytes())
    emb = model.backbone.embedding.weight.detach().float().cpu().contiguous()
    emb = hashlib.sha256(emb.numpy().tobytes())
    return {**settings, "windows_sha256": h.hexdigest()[:16], "embedding_sha256": emb.hexdigest()[:16],
            "config": model.config.to_dict()}


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _atomic_write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _block_file(state_dir: Path, i: int) -> Path:
    return state_dir / f"block-{i:04d}.safetensors"


def _inputs_file(state_dir: Path, i: int) -> Path:
    return state_dir / f"inputs-{i:04d}.safetensors"


def clear_state_dir(state_dir: Path) -> None:
    """Removes the files ESR writes into `state_dir` (and their temporaries), and the directory
    only if that leaves it empty: whatever else a user keeps there stays."""
    ours = re.compile(r"(esr\.json|(block|inputs)-\d{4}\.safetensors)(\.tmp)?")
    for f in state_dir.glob("*"):
        if ours.fullmatch(f.name):
            f.unlink(missing_ok=True)
    with suppress(OSError):
        state_dir.rmdir()


def _load_state_file(path: Path, state_dir: Path) -> dict[str, Tensor]:
    """A block's or the inputs' saved tensors; a truncated or damaged file is one line."""
    if not path.exists():
        raise MqtoolError(f"{path} is missing; remove {state_dir} to start over")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise MqtoolError(f"{path} cannot be read ({type(e).__name__}: {e}), truncated by an interruption? "
                          f"remove {state_dir} to start over") from None


def _resume(state_dir: Path, fingerprint: dict[str, Any], model: MambaLMHeadModel,
            names: list[Rows]) -> tuple[list[dict], Tensor | None, Tensor | None]:
    """Restores the finished blocks; returns (their losses, next hidden, next residual)."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return [], None, None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MqtoolError(f"{path} is not valid JSON ({e}); remove {state_dir} to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("blocks", []), list) \
            or not all(isinstance(b, dict) for b in state.get("blocks", [])):
        raise MqtoolError(f"{path} is not an ESR state file; remove {state_dir} to start over")
    if state.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        raise MqtoolError(f"{state_dir} holds an ESR run with other settings, model or calibration windows; "
                          "use another state directory or remove it to start over")
    blocks = list(state.get("blocks", []))
    layers = model.backbone.layers
    if [rec.get("block") for rec in blocks] != list(range(len(blocks))) or len(blocks) > len(layers):
        raise MqtoolError(f"{path} does not list blocks 0, 1, ... of this model; "
                          f"remove {state_dir} to start over")
    for rec in blocks:
        i = rec["block"]
        saved = _load_state_file(_block_file(state_dir, i), state_dir)
        with torch.no_grad():
            for name, (p, _) in names[i].items():
                if name not in saved:
                    raise MqtoolError(f"{_block_file(state_dir, i)} lacks {name}; "
                                      f"remove {state_dir} to start over")
                p.copy_(saved[name].to(device=p.device, dtype=p.dtype))
    if not blocks or len(blocks) == len(layers):
        return blocks, None, None
    inputs = _load_state_file(_inputs_file(state_dir, len(blocks)), state_dir)
    if "hidden" not in inputs:
        raise MqtoolError(f"{_inputs_file(state_dir, len(blocks))} lacks the hidden states; "
                          f"remove {state_dir} to start over")
    return blocks, inputs["hidden"], inputs.get("residual")


# ----------------------------------------------------------------------------------- stage

def apply_reconstruct(
    model: MambaLMHeadModel,
    online: dict[str, Any],
    calib: Any = None,
    windows: Tensor | None = None,
    epochs: int = 3,
    lr: float = 3e-5,
    train: tuple[str, ...] | list[str] | str = ("dt", "B", "C"),
    batch_size: int = 1,
    state_dir: str | Path | None = None,
    on_block: Callable[[int, int, dict[str, Any]], None] | None = None,
    seed: int = 0,
    weight_specs: dict[str, dict[str, Any]] | None = None,
    holdout: int | None = None,
    restore_worse: bool = False,
) -> dict[str, Any]:
    """ESR: train the rows producing Δ, B, C (``train``) of each block, in place, so that the
    state-quantized block matches the FP block on the FP block inputs of ``windows`` [n, seq_len].

    AdamW(lr, weight_decay=0), MSE loss, ``epochs`` passes over the windows (shuffled, seeded per
    block from ``seed``), ``batch_size`` windows per step. The default lr is 3e-5, not the paper's
    1e-3: Adam's first steps move every weight by about lr, and on our Mamba-1 reference model with
    W8A8 attached 1e-3 raised every block's held-out loss and cost up to 2.3% perplexity
    (docs/results.md). Needs a state quantizer attached
    (``apply_quantize_states``); ``online`` is not changed (ESR only changes weights). ``calib`` is
    accepted for the common stage signature and unused. With ``state_dir``, progress is saved after
    each block and a rerun with the same settings resumes. ``on_block(i, n_layer, block_record)``
    is called after each block is trained (and saved). Returns the manifest record: settings and
    per-block reconstruction loss (the quantization-aware MSE) before and after.

    By default every trained block is kept and every window trains (the paper's ESR). With
    ``restore_worse``, ``holdout`` windows (the last ones; default n // 8) are not trained on and a
    block whose loss on them does not fall gets its parameters back as they were (``kept: false``
    in its record); ``holdout=0`` decides on the training windows' loss instead. Not the default:
    on a Mamba-2 W8A8H4 slice the check restored every block, and keeping them measured better.

    ``weight_specs`` (the weight-quantization stage's ``tensors`` record, ``"<linear>.weight" ->
    {"bits", "group_size", ...}``): when weights were fake-quantized before ESR, each trained weight
    named there trains on its grid (straight-through to a float copy) and is put back on it after
    its block trains (the loss after is measured on the re-gridded block). Without it, trained rows
    of quantized weights are left off the grid and the record says weight quantization must be
    re-applied.
    """
    windows, train = _check_args(windows, model, epochs, lr, train, batch_size, seed)
    n_check = (windows.shape[0] // 8 if restore_worse else 0) if holdout is None else holdout
    if isinstance(n_check, bool) or not isinstance(n_check, int) or not 0 <= n_check < windows.shape[0]:
        raise MqtoolError(f"holdout must be an integer in [0, {windows.shape[0]}) (the number of calibration "
                          f"windows), got {holdout!r}")
    n_fit = windows.shape[0] - n_check
    weight_specs = _check_weight_specs(weight_specs, model)
    spec = None
    for mixer in model.mixers:
        spec = _state_quantizer(mixer).to_dict()
    layers = model.backbone.layers
    n_layer = len(layers)
    device = model.backbone.embedding.weight.device
    settings = {"epochs": epochs, "lr": float(lr), "train": list(train), "batch_size": batch_size,
                "seed": seed, "state_quantizer": spec, "weight_specs": weight_specs, "holdout": n_check,
                "restore_worse": bool(restore_worse)}
    params = [trainable_rows(layer, train) for layer in layers]

    blocks: list[dict[str, Any]] = []
    hidden = residual = None
    sdir = None
    if state_dir is not None:
        sdir = Path(state_dir).expanduser()
        if sdir.exists() and not sdir.is_dir():
            raise MqtoolError(f"ESR state directory {sdir} exists and is not a directory")
        sdir.mkdir(parents=True, exist_ok=True)
        fingerprint = _fingerprint(model, windows, settings)
        blocks, hidden, residual = _resume(sdir, fingerprint, model, params)
    resumed = [rec["block"] for rec in blocks]
    if not blocks:
        with torch.no_grad():
            hidden = torch.cat([model.backbone.embedding(windows[idx].to(device)).cpu()
                                for idx in _batches(windows.shape[0], batch_size)])

    for i in range(len(blocks), n_layer):
        block = layers[i]
        target, next_residual = _fp_block(block, hidden, residual, batch_size, device)
        fit = (hidden[:n_fit], None if residual is None else residual[:n_fit], target[:n_fit])
        check = (hidden[n_fit:], None if residual is None else residual[n_fit:], target[n_fit:])
        before = _block_loss(block, *fit, batch_size, device)
        check_before = _block_loss(block, *check, batch_size, device) if n_check else before
        original = {name: p.detach().clone() for name, (p, _) in params[i].items()} if restore_worse else {}
        codes = {name: getattr(_owner(block, name), KEPT_CODES, None) for name in params[i]}
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        grids = {name: weight_specs[f"backbone.layers.{i}.{name}"] for name in params[i]
                 if f"backbone.layers.{i}.{name}" in weight_specs}
        _train_block(model, block, params[i], *fit, epochs, lr, batch_size, generator, device, grids)
        for name, spec in grids.items():
            _regrid(_owner(block, name), spec)
        after = _block_loss(block, *fit, batch_size, device)
        check_after = _block_loss(block, *check, batch_size, device) if n_check else after
        rec = {"block": i, "loss_before": before, "loss_after": after,
               "kept": not restore_worse or check_after < check_before}
        if n_check:
            rec.update(holdout_loss_before=check_before, holdout_loss_after=check_after)
        if not rec["kept"]:  # training made this block worse where it was not fitted: undo it
            with torch.no_grad():
                for name, (p, _) in params[i].items():
                    p.copy_(original[name])
                    if codes[name] is not None:
                        setattr(_owner(block, name), KEPT_CODES, codes[name])
        del original
        blocks.append(rec)
        hidden, residual = target, next_residual  # the next block's FP inputs
        if sdir is not None:
            _atomic_save({name: p for name, (p, _) in params[i].items()}, _block_file(sdir, i))
            if i + 1 < n_layer:
                _atomic_save({"hidden": hidden, "residual": residual}, _inputs_file(sdir, i + 1))
            _atomic_write_json({"fingerprint": fingerprint, "blocks": blocks}, sdir / STATE_FILE)
            _inputs_file(sdir, i).unlink(missing_ok=True)  # superseded (committed above)
        if on_block is not None:
            on_block(i, n_layer, rec)

    regridded = sorted(f"backbone.layers.{{i}}.{name}" for name in params[0]
                       if f"backbone.layers.0.{name}" in weight_specs)
    return {
        "method": "esr",
        "epochs": epochs,
        "lr": float(lr),
        "train": list(train),
        "batch_size": batch_size,
        "seed": seed,
        "optimizer": "AdamW(weight_decay=0)",
        "loss": "mse(block output): FP block on FP inputs vs state-quantized block (one-step parallel QAT)",
        "reference": "the block with activation and state quantizers disabled",
        "windows": list(windows.shape),
        "holdout": n_check,
        "restore_worse": bool(restore_worse),
        "reverted_blocks": [b["block"] for b in blocks if not b.get("kept", True)],
        "state_quantizer": spec,
        "trained": {f"backbone.layers.{{i}}.{name}": "all rows" if mask is None else f"{int(mask.sum())} rows"
                    for name, (_, mask) in params[0].items()},
        "blocks": blocks,
        "resumed_blocks": resumed,
        "regridded": regridded,
        "requantize_weights": not weight_specs,
        "note": REGRID_NOTE if weight_specs else WEIGHTS_NOTE,
    }
