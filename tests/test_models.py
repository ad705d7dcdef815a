"""Tests for mqtool.models: the three scan modes agree, prefill + step, the scans' intermediate
states, the mixers against references written here from mamba-ssm's formulas, the attachment
points, tied and padded vocabularies, generation, bf16 state precision and MambaConfig."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import VOCAB, make_config, make_model  # tests/ is on sys.path under pytest
from mqtool.errors import MqtoolError
from mqtool.models import MambaConfig, MambaLMHeadModel, generate, scan
from mqtool.models.lm import MODES

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """Relative to the expected tensor's scale (values cross zero, so an element-wise rtol alone
    would be meaningless near zero)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def differs(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3) -> bool:
    """True when a and b differ by far more than the numerical tolerance used in this file."""
    return (a - b).abs().max().item() > rel * b.abs().max().item()


def ids_for(batch: int, length: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


class Recorder(nn.Module):
    """An attachment-point stand-in: counts calls, optionally logs them, optionally transforms."""

    def __init__(self, fn=None, log: list | None = None, tag=None) -> None:
        super().__init__()
        self.fn, self.log, self.tag, self.calls = fn, log, tag, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.log is not None:
            self.log.append(self.tag)
        return x if self.fn is None else self.fn(x)


# ------------------------------------------------------------------------------ the three modes

@pytest.mark.parametrize("length", [1, 8, 21])  # 21: not a multiple of chunk_size 8
@torch.no_grad()
def test_parallel_sequential_recurrent_agree(tiny_model, length):
    ids = ids_for(2, length)
    par = tiny_model(ids, mode="parallel")
    assert par.shape == (2, length, 104) and par.dtype == torch.float32
    assert_close(tiny_model(ids, mode="sequential"), par)
    assert_close(tiny_model(ids, mode="recurrent"), par)


def test_unknown_mode_is_refused(tiny_model):
    with pytest.raises(ValueError, match="mode"):
        tiny_model(ids_for(1, 3), mode="chunked")


@pytest.mark.parametrize("prefill", [2, 13])  # 2 < d_conv; 13 ends mid-chunk
@torch.no_grad()
def test_prefill_then_step_matches_full_parallel_and_stepping(tiny_model, prefill):
    new = 4
    ids = ids_for(2, prefill + new, seed=3)
    full = tiny_model(ids)

    cache = tiny_model.allocate_cache(2)
    assert_close(tiny_model(ids[:, :prefill], cache=cache), full[:, :prefill])
    for t in range(prefill, prefill + new):
        assert_close(tiny_model.step(ids[:, t], cache), full[:, t])

    ref = tiny_model.allocate_cache(2)  # token by token from scratch
    tiny_model(ids, mode="recurrent", cache=ref)
    for (conv, ssm), (conv_ref, ssm_ref) in zip(cache.layers, ref.layers, strict=True):
        assert ssm.abs().max() > 0 and conv.abs().max() > 0
        assert_close(conv, conv_ref)
        assert_close(ssm, ssm_ref)


@torch.no_grad()
def test_mixer_return_states_ends_in_the_cached_state(tiny_model):
    mixer = tiny_model.mixers[0]
    hidden = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(0))
    cache = mixer.allocate_cache(2)
    out = mixer(hidden, cache=cache)
    out_s, states = mixer(hidden, return_states=True)
    torch.testing.assert_close(out_s, out)
    assert states.shape == (2, 11, *cache[1].shape[1:]) and states.dtype == torch.float32
    assert_close(states[:, -1], cache[1])


# ------------------------------------------------------------------------------ scans vs plain loops

def _loop_mamba1(u, delta, A, B, C, D, h0):
    h, ys, hs = h0.clone(), [], []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
        hs.append(h)
    return torch.stack(ys, 1), torch.stack(hs, 1)


def _loop_mamba2(x, dt, A, B, C, D, h0):
    nh, g = x.shape[2], B.shape[2]
    group = torch.arange(nh) // (nh // g)
    Dp = D if D.dim() == 2 else D[:, None]
    h, ys, hs = h0.clone(), [], []
    for t in range(x.shape[1]):
        Bt, Ct = B[:, t, group], C[:, t, group]                               # [b, h, n]
        h = (torch.exp(dt[:, t] * A)[..., None, None] * h
             + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :])
        ys.append((h * Ct[:, :, None, :]).sum(-1) + Dp * x[:, t])
        hs.append(h)
    return torch.stack(ys, 1), torch.stack(hs, 1)


def _rand(*shape, g):
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("time_chunk", [4, 128])
@pytest.mark.parametrize("with_h0", [False, True])
def test_mamba1_scan_states_match_loop(time_chunk, with_h0):
    g = torch.Generator().manual_seed(0)
    b, l, d, n = 2, 11, 6, 5
    u, B, C = _rand(b, l, d, g=g), _rand(b, l, n, g=g), _rand(b, l, n, g=g)
    delta = F.softplus(_rand(b, l, d, g=g))
    A = -torch.exp(torch.empty(d, n).uniform_(math.log(0.05), math.log(4.0), generator=g))
    D = _rand(d, g=g)
    h0 = _rand(b, d, n, g=g) if with_h0 else torch.zeros(b, d, n)
    y_ref, hs_ref = _loop_mamba1(u, delta, A, B, C, D, h0)

    y, h_last, states = scan.mamba1_scan(u, delta, A, B, C, D, h0=h0 if with_h0 else None,
                                         return_states=True, time_chunk=time_chunk)
    assert states.shape == (b, l, d, n)
    assert_close(states, hs_ref)
    assert_close(h_last, hs_ref[:, -1])
    assert_close(y, y_ref)
    y2, h2 = scan.mamba1_scan(u, delta, A, B, C, D, h0=h0 if with_h0 else None, time_chunk=time_chunk)
    assert_close(y2, y_ref)
    assert_close(h2, hs_ref[:, -1])
    y3, h3 = scan.mamba1_sequential(u, delta, A, B, C, D, h0=h0 if with_h0 else None)
    assert_close(y3, y_ref)
    assert_close(h3, hs_ref[:, -1])


@pytest.mark.parametrize("length,chunk", [(11, 4), (16, 8), (3, 8), (1, 4)])
@pytest.mark.parametrize("ngroups,d_hdim", [(1, False), (2, True)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_mamba2_ssd_states_match_loop(length, chunk, ngroups, d_hdim, with_h0):
    g = torch.Generator().manual_seed(length * 10 + ngroups)
    b, nh, p, n = 2, 4, 3, 5
    x = _rand(b, length, nh, p, g=g)
    B, C = _rand(b, length, ngroups, n, g=g), _rand(b, length, ngroups, n, g=g)
    dt = F.softplus(_rand(b, length, nh, g=g))
    A = -torch.exp(torch.empty(nh).uniform_(math.log(0.05), math.log(4.0), generator=g))
    D = _rand(nh, p, g=g) if d_hdim else _rand(nh, g=g)
    h0 = _rand(b, nh, p, n, g=g) if with_h0 else torch.zeros(b, nh, p, n)
    y_ref, hs_ref = _loop_mamba2(x, dt, A, B, C, D, h0)

    kw = {"h0": h0 if with_h0 else None}
    y, h_last, states = scan.mamba2_ssd(x, dt, A, B, C, D, chunk, return_states=True, **kw)
    assert states.shape == (b, length, nh, p, n)
    assert_close(states, hs_ref)
    assert_close(h_last, hs_ref[:, -1])
    assert_close(y, y_ref)
    y2, h2 = scan.mamba2_ssd(x, dt, A, B, C, D, chunk, **kw)
    assert_close(y2, y_ref)
    assert_close(h2, hs_ref[:, -1])
    y3, h3 = scan.mamba2_sequential(x, dt, A, B, C, D, **kw)
    assert_close(y3, y_ref)
    assert_close(h3, hs_ref[:, -1])


# ------------------------------------------------------------------------------ independent references

def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's `selective_scan_ref` (ops/selective_scan_interface.py), real-valued case.
    u, delta, z [b, d, l]; A [d, n]; B, C [b, n, l]; D [d]."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    x = A.new_zeros((u.shape[0], A.shape[0], A.shape[1]))
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i].float()))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    return out.to(dtype_in)


def ref_mamba1(mixer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """mamba-ssm `Mamba.forward`'s reference path, from the state dict alone."""
    p = {k: v.detach().float() for k, v in mixer.state_dict().items()}
    b, l, _ = hidden.shape
    d_inner, dt_rank = p["dt_proj.weight"].shape
    d_state = p["A_log"].shape[1]
    xz = F.linear(hidden, p["in_proj.weight"], p.get("in_proj.bias")).transpose(1, 2)   # [b, 2d, l]
    x, z = xz.chunk(2, dim=1)
    k = p["conv1d.weight"].shape[-1]
    x = F.silu(F.conv1d(x, p["conv1d.weight"], p.get("conv1d.bias"), padding=k - 1, groups=d_inner)[..., :l])
    x_dbl = x.transpose(1, 2).reshape(b * l, d_inner) @ p["x_proj.weight"].T
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    dt = (p["dt_proj.weight"] @ dt.T).view(d_inner, b, l).permute(1, 0, 2)
    B = B.view(b, l, d_state).transpose(1, 2)
    C = C.view(b, l, d_state).transpose(1, 2)
    A = -torch.exp(p["A_log"])
    y = selective_scan_ref(x, dt, A, B, C, p["D"], z=z, delta_bias=p["dt_proj.bias"], delta_softplus=True)
    return F.linear(y.transpose(1, 2), p["out_proj.weight"], p.get("out_proj.bias"))


def ref_mamba2(mixer: nn.Module, hidden: torch.Tensor, *, headdim: int, ngroups: int, dt_limit=None,
               norm_groups: int | None = None, eps: float = 1e-5):
    """The naive Mamba-2 recurrence head by head, then `RMSNormGated` (norm_before_gate=False):
    rmsnorm(y * silu(z)) per group of d_inner / ngroups channels. Returns (out, softplus(dt + dt_bias))."""
    p = {k: v.detach().float() for k, v in mixer.state_dict().items()}
    b, l, _ = hidden.shape
    nheads = p["A_log"].numel()
    d_inner = nheads * headdim
    conv_dim = p["conv1d.weight"].shape[0]
    d_state = (conv_dim - d_inner) // (2 * ngroups)
    zxbcdt = F.linear(hidden, p["in_proj.weight"], p.get("in_proj.bias"))
    z, xBC, dt = torch.split(zxbcdt, [d_inner, conv_dim, zxbcdt.shape[-1] - d_inner - conv_dim], dim=-1)
    assert dt.shape[-1] == nheads
    k = p["conv1d.weight"].shape[-1]
    xBC = F.conv1d(xBC.transpose(1, 2), p["conv1d.weight"], p.get("conv1d.bias"),
                   padding=k - 1, groups=conv_dim)[..., :l]
    xBC = F.silu(xBC).transpose(1, 2)
    x = xBC[..., :d_inner]
    B = xBC[..., d_inner:d_inner + ngroups * d_state]
    C = xBC[..., d_inner + ngroups * d_state:]
    dt_sp = F.softplus(dt + p["dt_bias"])
    dt = dt_sp if dt_limit is None else dt_sp.clamp(*dt_limit)
    A = -torch.exp(p["A_log"])
    D = p["D"]
    heads_per_group = nheads // ngroups
    y = torch.zeros(b, l, d_inner)
    for hh in range(nheads):
        gi = hh // heads_per_group
        cs = slice(hh * headdim, (hh + 1) * headdim)
        gs = slice(gi * d_state, (gi + 1) * d_state)
        Dh = D[cs] if D.numel() == d_inner else D[hh]
        state = torch.zeros(b, headdim, d_state)
        for t in range(l):
            state = (torch.exp(dt[:, t, hh] * A[hh])[:, None, None] * state
                     + dt[:, t, hh, None, None] * x[:, t, cs, None] * B[:, t, None, gs])
            y[:, t, cs] = (state @ C[:, t, gs, None])[..., 0] + Dh * x[:, t, cs]
    y = y * F.silu(z)
    ng = ngroups if norm_groups is None else norm_groups
    yg = y.view(b, l, ng, d_inner // ng)
    yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + eps)
    y = yg.reshape(b, l, d_inner) * p["norm.weight"]
    return F.linear(y, p["out_proj.weight"], p.get("out_proj.bias")), dt_sp


def _mixer_all_modes(mixer: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    cache = mixer.allocate_cache(hidden.shape[0])
    rec = torch.stack([mixer.step(hidden[:, t], cache) for t in range(hidden.shape[1])], dim=1)
    return {"parallel": mixer(hidden), "sequential": mixer(hidden, mode="sequential"), "recurrent": rec}


@torch.no_grad()
def test_mamba1_mixer_matches_selective_scan_ref():
    model = make_model(make_config("mamba1", d_model=48), seed=5)
    mixer = model.mixers[1]
    hidden = torch.randn(2, 13, 48, generator=torch.Generator().manual_seed(2))
    ref = ref_mamba1(mixer, hidden)
    for out in _mixer_all_modes(mixer, hidden).values():
        assert_close(out, ref)


@pytest.mark.parametrize("family", ["mamba2", "mamba2_g2"])
@torch.no_grad()
def test_mamba2_mixer_matches_naive_recurrence(family):
    config = make_config(family, d_model=32)
    ssm = config.ssm
    mixer = make_model(config, seed=7).mixers[0]
    hidden = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(4))
    dt_limit = tuple(ssm["dt_limit"]) if family == "mamba2_g2" else None
    ref, dt_sp = ref_mamba2(mixer, hidden, headdim=ssm["headdim"], ngroups=ssm["ngroups"], dt_limit=dt_limit)
    for out in _mixer_all_modes(mixer, hidden).values():
        assert_close(out, ref)
    if family == "mamba2_g2":
        lo, hi = dt_limit
        assert (dt_sp < lo).any() and (dt_sp > hi).any(), "the clamp must be active on both sides"
        # the test tells the traps apart: a norm over all channels, no clamp, clamp before softplus
        wrong_norm, _ = ref_mamba2(mixer, hidden, headdim=16, ngroups=2, dt_limit=dt_limit, norm_groups=1)
        assert differs(wrong_norm, ref)
        no_clamp, _ = ref_mamba2(mixer, hidden, headdim=16, ngroups=2, dt_limit=None)
        assert differs(no_clamp, ref)


# ------------------------------------------------------------------------------ attachment points

def _logits_all_modes(model: MambaLMHeadModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {mode: model(ids, mode=mode) for mode in MODES}


def test_every_linear_routes_through_transform_then_quantizer(tiny_model):
    from mqtool.models.layers import Linear

    linears = {n: m for n, m in tiny_model.named_modules() if isinstance(m, Linear)}
    per_mixer = {"in_proj", "out_proj"}
    if tiny_model.config.layer == "Mamba1":
        per_mixer |= {"x_proj", "dt_proj"}
    assert {n.rsplit(".", 1)[-1] for n in linears} == per_mixer | {"lm_head"}
    ids = ids_for(1, 5)
    for mode in MODES:
        log: list = []
        for name, lin in linears.items():
            lin.input_transform = Recorder(log=log, tag=("transform", name))
            lin.input_quantizer = Recorder(log=log, tag=("quantizer", name))
        with torch.no_grad():
            tiny_model(ids, mode=mode)
        calls = 5 if mode == "recurrent" else 1
        for name, lin in linears.items():
            assert lin.input_transform.calls == calls and lin.input_quantizer.calls == calls, (mode, name)
            i = log.index(("transform", name))
            assert log[i + 1] == ("quantizer", name)


@pytest.mark.parametrize("tap", ["ssm_x", "ssm_dt", "ssm_B", "ssm_C"])
def test_ssm_input_taps_are_used_in_all_modes(tiny_model, tap):
    ids = ids_for(2, 9)
    base = _logits_all_modes(tiny_model, ids)
    for mixer in tiny_model.mixers:
        setattr(mixer, tap, Recorder(fn=lambda t: 0.5 * t))
    scaled = _logits_all_modes(tiny_model, ids)
    for mode in MODES:
        assert differs(scaled[mode], base[mode]), mode
        assert_close(scaled[mode], scaled["parallel"])
    assert all(getattr(m, tap).calls == 1 + 1 + 9 for m in tiny_model.mixers)


def test_out_proj_input_quantizer_affects_all_modes(tiny_model):
    ids = ids_for(2, 11)
    base = _logits_all_modes(tiny_model, ids)
    for mixer in tiny_model.mixers:
        mixer.out_proj.input_quantizer = Recorder(fn=torch.zeros_like)
    zeroed = _logits_all_modes(tiny_model, ids)
    for mode in MODES:
        assert differs(zeroed[mode], base[mode]), mode
        assert_close(zeroed[mode], zeroed["parallel"])
    # with the mixers' outputs zeroed, only the embedding reaches the head
    with torch.no_grad():
        emb = tiny_model.backbone.embedding(ids).float()
        expected = tiny_model.lm_head(tiny_model.backbone.norm_f(emb))
    assert_close(zeroed["parallel"], expected)


def test_out_proj_input_transform_is_applied_in_all_modes(tiny_model):
    """An online rotation R with W' = W R (as a Hadamard before out_proj is used) preserves the
    output only if the transform is really applied."""
    ids = ids_for(2, 11)
    base = _logits_all_modes(tiny_model, ids)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for mixer in tiny_model.mixers:
            R, _ = torch.linalg.qr(torch.randn(mixer.d_inner, mixer.d_inner, generator=g))
            mixer.out_proj.weight.copy_(mixer.out_proj.weight @ R)
            mixer.out_proj.input_transform = Recorder(fn=lambda x, R=R: x @ R)
    rotated = _logits_all_modes(tiny_model, ids)
    for mode in MODES:
        assert_close(rotated[mode], base[mode])
    for mixer in tiny_model.mixers:
        mixer.out_proj.input_transform = nn.Identity()
    assert differs(_logits_all_modes(tiny_model, ids)["parallel"], base["parallel"])


def test_state_quantizer_acts_on_stored_states_only(tiny_model):
    ids = ids_for(2, 11)
    base = _logits_all_modes(tiny_model, ids)
    cache_base = tiny_model.allocate_cache(2)
    with torch.no_grad():
        tiny_model(ids, cache=cache_base)
    for mixer in tiny_model.mixers:
        mixer.state_quantizer = Recorder(fn=lambda h: 0.5 * h)
    squashed = _logits_all_modes(tiny_model, ids)
    assert torch.equal(squashed["parallel"], base["parallel"])
    assert differs(squashed["recurrent"], base["recurrent"])
    assert differs(squashed["sequential"], base["sequential"])
    assert_close(squashed["recurrent"], squashed["sequential"])
    assert all(m.state_quantizer.calls >= 11 for m in tiny_model.mixers)
    # a parallel prefill stores the state through the quantizer too
    cache = tiny_model.allocate_cache(2)
    with torch.no_grad():
        tiny_model(ids, cache=cache)
    for (_, ssm), (_, ssm_base) in zip(cache.layers, cache_base.layers, strict=True):
        assert_close(ssm, 0.5 * ssm_base)


def _gate_owner(mixer: nn.Module) -> nn.Module:
    return mixer.norm if hasattr(mixer, "norm") else mixer


def test_gate_act_is_used_in_all_modes(tiny_model):
    ids = ids_for(2, 9)
    base = _logits_all_modes(tiny_model, ids)
    for mixer in tiny_model.mixers:
        assert isinstance(_gate_owner(mixer).gate_act, nn.SiLU)
        _gate_owner(mixer).gate_act = Recorder(fn=F.silu)
    same = _logits_all_modes(tiny_model, ids)
    for mode in MODES:
        assert_close(same[mode], base[mode])
    assert all(_gate_owner(m).gate_act.calls == 1 + 1 + 9 for m in tiny_model.mixers)
    for mixer in tiny_model.mixers:  # S-SiLU with s = 2
        _gate_owner(mixer).gate_act = Recorder(fn=lambda x: x * torch.sigmoid(2.0 * x))
    ssilu = _logits_all_modes(tiny_model, ids)
    for mode in MODES:
        assert differs(ssilu[mode], base[mode]), mode
        assert_close(ssilu[mode], ssilu["parallel"])


# ------------------------------------------------------------------------------ vocabulary, generation

def test_tied_and_untied_lm_head():
    tied = make_model(make_config("mamba2"))
    assert tied.lm_head.weight is tied.backbone.embedding.weight
    tied.to(torch.bfloat16)
    assert tied.lm_head.weight is tied.backbone.embedding.weight  # a dtype change does not untie
    untied = make_model(make_config("mamba2", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.backbone.embedding.weight
    assert untied.lm_head.weight.data_ptr() != untied.backbone.embedding.weight.data_ptr()
    before = untied.lm_head.weight.detach().clone()
    with torch.no_grad():
        untied.backbone.embedding.weight.zero_()
    assert torch.equal(untied.lm_head.weight, before)


@torch.no_grad()
def test_padded_vocab_never_generated():
    config = make_config("mamba1", d_model=16, n_layer=1, vocab_size=50277)
    assert config.padded_vocab_size == 50280
    model = make_model(config)
    assert model.backbone.embedding.weight.shape == (50280, 16)
    assert model.lm_head.weight.shape == (50280, 16)

    def favour_padding(_module, _inp, out):  # the padded rows win every argmax
        out = out.clone()
        out[..., 50277:] += 1e4
        return out

    model.lm_head.register_forward_hook(favour_padding)
    prompt = ids_for(2, 4, vocab=50277)
    logits = model(prompt)
    assert logits.shape == (2, 4, 50280)
    assert (logits.argmax(-1) >= 50277).all()
    out = generate(model, prompt, max_new_tokens=5)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], prompt)
    assert (out < 50277).all()


@torch.no_grad()
def test_generate_equals_repeated_full_forward_argmax(tiny_model):
    prompt = ids_for(2, 5, seed=11)
    ref = prompt
    for _ in range(6):
        nxt = tiny_model(ref)[:, -1, :VOCAB].argmax(-1)
        ref = torch.cat([ref, nxt[:, None]], dim=1)
    assert torch.equal(generate(tiny_model, prompt, max_new_tokens=6), ref)
    # eos stops once every sequence has produced it
    one = prompt[:1]
    first = tiny_model(one)[0, -1, :VOCAB].argmax().item()
    assert generate(tiny_model, one, max_new_tokens=6, eos_token_id=first).shape == (1, 6)


@torch.no_grad()
def test_bf16_model_keeps_fp32_state(tiny_model, monkeypatch):
    ref32 = tiny_model(ids_for(2, 9), mode="recurrent")
    model = tiny_model.to(torch.bfloat16)
    seen = []
    for name in ("mamba1_step", "mamba2_step"):
        fn = getattr(scan, name)

        def spy(h, *args, _fn=fn, **kw):
            seen.append((h.dtype, args[2].dtype))  # (state, A)
            return _fn(h, *args, **kw)

        monkeypatch.setattr(scan, name, spy)
    ids = ids_for(2, 9)
    cache = model.allocate_cache(2)
    model(ids[:, :7], cache=cache)
    model.step(ids[:, 7], cache)
    out = model.step(ids[:, 8], cache)
    assert out.dtype == torch.bfloat16
    assert seen and all(s == (torch.float32, torch.float32) for s in seen)
    for conv, ssm in cache.layers:
        assert conv.dtype == torch.bfloat16
        assert ssm.dtype == torch.float32
        assert not torch.equal(ssm.to(torch.bfloat16).float(), ssm), "the state was rounded to bf16"
    assert_close(out.float(), ref32[:, -1], rtol=0.1)  # bf16 weights and activations: loose


# ------------------------------------------------------------------------------ MambaConfig

STATE_SPACES_130M = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
                     "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}


def test_config_round_trip_state_spaces():
    c = MambaConfig.from_dict(STATE_SPACES_130M)
    assert c.layer == "Mamba1" and c.padded_vocab_size == 50280 and c.d_inner == 1536
    assert c.tie_embeddings and c.ssm["d_state"] == 16
    d = c.to_dict()
    assert {k: d[k] for k in STATE_SPACES_130M} == STATE_SPACES_130M
    assert "norm_epsilon" not in d  # mamba-ssm's MambaConfig has no such field
    assert MambaConfig.from_dict(d) == c
    m2 = {**STATE_SPACES_130M, "ssm_cfg": {"layer": "Mamba2", "ngroups": 1}, "pad_vocab_size_multiple": 16}
    c2 = MambaConfig.from_dict(m2)
    assert c2.layer == "Mamba2" and c2.ssm["headdim"] == 64 and c2.padded_vocab_size == 50288
    assert MambaConfig.from_dict(c2.to_dict()) == c2 and c2.to_dict()["ssm_cfg"] == m2["ssm_cfg"]


def test_config_save_load(tmp_path):
    c = make_config("mamba2_g2")
    c.save(tmp_path / "config.json")
    assert MambaConfig.load(tmp_path / "config.json") == c


@pytest.mark.parametrize("bad,match", [
    ({"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768,
      "num_hidden_layers": 12}, "not a Mamba config"),
    ({**STATE_SPACES_130M, "ssm_cfg": {"layer": "Mamba3"}}, "Mamba3"),
    ({**STATE_SPACES_130M, "attn_layer_idx": [3], "attn_cfg": {"num_heads": 12}}, "attention"),
    ({**STATE_SPACES_130M, "d_intermediate": 3072}, "MLP"),
    ({**STATE_SPACES_130M, "d_model": "768"}, "d_model"),
    ({**STATE_SPACES_130M, "ssm_cfg": {"layer": "Mamba2", "headdim": 100}}, "headdim"),
    # 3 heads cannot be split into 2 groups (mamba-ssm asserts nheads % ngroups == 0)
    ({**STATE_SPACES_130M, "d_model": 96, "ssm_cfg": {"layer": "Mamba2", "headdim": 64, "ngroups": 2}},
     "ngroups"),
    ([1, 2, 3], "not a Mamba config"),
])
def test_config_errors(bad, match):
    with pytest.raises(MqtoolError, match=match):
        MambaConfig.from_dict(bad)


def test_config_load_errors(tmp_path):
    with pytest.raises(MqtoolError, match="not found"):
        MambaConfig.load(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(MqtoolError, match="not valid JSON"):
        MambaConfig.load(tmp_path / "config.json")
