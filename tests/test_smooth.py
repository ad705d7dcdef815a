"""Tests for `mqtool.quant.smooth`: SmoothQuant and MambaQuant's smooth-fused smoothing."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mqtool.calibrate import calibrate
from mqtool.checkpoint import Manifest, build_model, load_model, model_state_dict, save_checkpoint
from mqtool.errors import MqtoolError
from mqtool.models import MambaConfig
from mqtool.quant.attach import OnlineHadamard, SSiLU, apply_online, linears
from mqtool.quant.hadamard import hadamard_matrix
from mqtool.quant.smooth import apply_smooth, smoothing_scale

VOCAB = 101
ALL = ["in_proj", "x_proj", "dt_proj", "out_proj", "lm_head"]


def make(family: str, seed: int = 0, rms_norm: bool = True):
    """A tiny model with non-unit (signed) norm weights and a few outlier channels at every input
    smoothing can reach."""
    ssm = {"layer": "Mamba1", "d_state": 8} if family == "mamba1" else \
        {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, ssm_cfg=ssm, rms_norm=rms_norm)
    torch.manual_seed(seed)
    model = build_model(config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                sign = torch.sign(torch.randn(p.shape, generator=g))
                p.copy_(torch.exp(0.3 * torch.randn(p.shape, generator=g)) * sign)
                p[:2] *= 8.0  # outlier channels: in_proj / lm_head input (Mamba-2: out_proj input too)
            elif name.endswith("norm.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("conv1d.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(".D"):
                p.copy_(torch.randn(p.shape, generator=g))
        for mixer in model.mixers:
            if family == "mamba1":
                mixer.in_proj.weight[mixer.d_inner:mixer.d_inner + 3] *= 6.0  # gate outliers: out_proj
                mixer.x_proj.weight[0] *= 10.0  # a dt channel that stands out -> dt_proj input
    return model.eval()


def windows(n: int = 6, seqlen: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def logits(model, ids, mode="parallel"):
    return model(ids, mode=mode).float()


@torch.no_grad()
def add_online_hadamard(model, targets):
    """An online Hadamard at `targets` with the matching H fused offline: W -> W H."""
    online = {"hadamard": {"targets": list(targets), "kind": "hadamard", "seed": None}}
    apply_online(model, online)
    for lin in linears(model, targets).values():
        lin.weight.copy_((lin.weight.double() @ hadamard_matrix(lin.in_features)).float())
    return online


def ratio(absmax: torch.Tensor) -> float:
    a = absmax.double()
    return (a.max() / a.median()).item()


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("method", ["smoothquant", "smooth-fused"])
@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "hadamard"])
def test_logits_unchanged_and_outliers_reduced(family, method, hadamard):
    model = make(family)
    ids = windows(2, 11, seed=7)
    ref = {m: logits(model, ids, m) for m in ("parallel", "recurrent")}
    online: dict = {}
    if hadamard:
        online = add_online_hadamard(model, ["out_proj", "x_proj"] if family == "mamba1" else ["out_proj"])
        assert rel(logits(model, ids), ref["parallel"]) < 1e-4
    data = windows()
    calib = calibrate(model, data, {}, state_samples=0)
    rec = apply_smooth(model, online, calib, method=method, alpha=0.5, targets=ALL)
    json.dumps(rec)
    for mode, r in ref.items():
        err = rel(logits(model, ids, mode), r)
        assert err < 1e-3, f"{mode}: relative error {err:.2e}"

    smoothed, skipped = rec["targets"], rec["skipped"]
    fused_m1 = family == "mamba1" and method == "smooth-fused"
    expected = {"in_proj": "in_proj", "lm_head": "lm_head", "dt_proj": "dt_proj",
                "out_proj": "gated_norm" if family == "mamba2" else "s_silu" if fused_m1 else None,
                "x_proj": "online_smooth" if fused_m1 and hadamard else None}
    for name in linears(model, ALL):
        kind = name.split(".")[-1]
        if expected[kind] is None:
            assert name in skipped and name not in smoothed, name
        else:
            assert smoothed[name]["via"] == expected[kind], name
            assert smoothed[name]["before_hadamard"] == (hadamard and kind in ("out_proj", "x_proj"))
    assert ("s_silu" in online) == fused_m1
    if fused_m1:
        assert all(isinstance(m.gate_act, SSiLU) for m in model.mixers)
    assert ("smooth_scale" in online) == (fused_m1 and hadamard)
    if fused_m1 and hadamard:
        assert online["smooth_scale"] == {"targets": ["x_proj"]}
        assert all(m.x_proj.input_transform.smooth is not None for m in model.mixers)
    # lm_head was smoothed into norm_f: untied, the embedding itself untouched
    assert model.config.tie_embeddings is False and rec["untied"] is True
    assert model.lm_head.weight is not model.backbone.embedding.weight

    # the smoothed inputs (before any online transform) have less prominent outlier channels
    after = calibrate(model, data, {}, state_samples=0)
    for name, entry in smoothed.items():
        before_r = ratio(calib.get(f"{name}.pre", "absmax"))
        seen = after.get(f"{name}.pre", "absmax")
        if entry["via"] == "online_smooth":  # divided inside the online transform, after the `.pre` tap
            seen = seen / dict(model.named_modules())[name].input_transform.smooth.double()
        after_r = ratio(seen)
        assert after_r < before_r, f"{name}: outlier ratio {before_r:.2f} -> {after_r:.2f}"
        assert after_r == pytest.approx(entry["outlier_ratio"][1], rel=1e-3)


@torch.no_grad()
def test_fused_weight_before_hadamard_numerically():
    """Mamba-1 out_proj with an online Hadamard: the stored weight must become (W diag(s)) H, where
    W is the weight acting on the un-rotated input and s the S-SiLU scale."""
    model = make("mamba1")
    W = {i: m.out_proj.weight.detach().double().clone() for i, m in enumerate(model.mixers)}
    Wz = {i: m.in_proj.weight.detach().double()[m.d_inner:].clone() for i, m in enumerate(model.mixers)}
    online = add_online_hadamard(model, ["out_proj"])
    calib = calibrate(model, windows(), {}, state_samples=0)
    apply_smooth(model, online, calib, method="smooth-fused", targets=["out_proj"])
    for i, m in enumerate(model.mixers):
        s = m.gate_act.s.double()
        H = hadamard_matrix(m.d_inner)
        # s from the pre-Hadamard statistics and the un-rotated weight
        pre = calib.get(f"backbone.layers.{i}.mixer.out_proj.pre", "absmax")
        torch.testing.assert_close(s, smoothing_scale(pre, W[i].abs().amax(0), 0.5), rtol=1e-5, atol=0)
        torch.testing.assert_close(m.out_proj.weight.double(), (W[i] * s) @ H, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.in_proj.weight.double()[m.d_inner:], Wz[i] / s[:, None],
                                   atol=1e-6, rtol=1e-5)
        assert not torch.allclose(s, torch.ones_like(s))


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_save_reload_identical(tmp_path, family):
    model = make(family)
    online = add_online_hadamard(model, ["out_proj", "x_proj"] if family == "mamba1" else ["out_proj"])
    calib = calibrate(model, windows(), {}, state_samples=0)
    apply_smooth(model, online, calib, method="smooth-fused", targets=ALL)
    ids = windows(2, 10, seed=5)
    before = {m: logits(model, ids, m) for m in ("parallel", "recurrent")}
    out = save_checkpoint(tmp_path / "s", model.config, model_state_dict(model), Manifest(online=online))
    loaded, ckpt = load_model(out)
    assert ckpt.manifest.online == online
    if family == "mamba1":
        assert isinstance(loaded.mixers[0].gate_act, SSiLU)
        assert torch.equal(loaded.mixers[1].gate_act.s, model.mixers[1].gate_act.s)
        smooth = model.mixers[0].x_proj.input_transform.smooth
        assert torch.equal(loaded.mixers[0].x_proj.input_transform.smooth, smooth)
    for mode, r in before.items():
        assert torch.equal(logits(loaded, ids, mode), r), mode


def test_smoothquant_default_targets_keep_tied_head():
    model = make("mamba2")
    emb = model.backbone.embedding.weight.detach().clone()
    rec = apply_smooth(model, {}, calibrate(model, windows(), {}, state_samples=0))
    assert "lm_head" not in rec["targets"] and rec["untied"] is False
    assert model.config.tie_embeddings is True and model.lm_head.weight is model.backbone.embedding.weight
    assert torch.equal(model.backbone.embedding.weight, emb)


def test_layernorm_blocks():
    """Without RMSNorm the block norm's bias absorbs 1/s too."""
    model = make("mamba1", rms_norm=False)
    ids = windows(2, 9, seed=3)
    ref = logits(model, ids)
    online: dict = {}
    rec = apply_smooth(model, online, calibrate(model, windows(), {}, state_samples=0), method="smooth-fused",
                       targets=ALL)
    assert rec["targets"]["backbone.layers.0.mixer.in_proj"]["into"][:2] == [
        "backbone.layers.0.norm.weight", "backbone.layers.0.norm.bias"]
    assert rel(logits(model, ids), ref) < 1e-3


@pytest.mark.skipif(importlib.util.find_spec("mqtool.quant.rotate") is None, reason="no mqtool.quant.rotate")
@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_after_rotate(tmp_path, family):
    from mqtool.quant.rotate import apply_rotate

    model = make(family)
    ids = windows(2, 10, seed=5)
    ref = {m: logits(model, ids, m) for m in ("parallel", "recurrent")}
    online: dict = {}
    apply_rotate(model, online, None, method="hadamard",
                 online_targets=["out_proj", "x_proj"] if family == "mamba1" else ["out_proj"])
    calib = calibrate(model, windows(), {}, state_samples=0)
    apply_smooth(model, online, calib, method="smooth-fused", targets=ALL)
    for mode, r in ref.items():
        assert rel(logits(model, ids, mode), r) < 1e-3
    before = logits(model, ids)
    loaded, _ = load_model(save_checkpoint(tmp_path / "s", model.config, model_state_dict(model),
                                           Manifest(online=online)))
    assert torch.equal(logits(loaded, ids), before)


def test_smoothing_scale():
    a = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scale(a, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 1.0], dtype=torch.float64))
    s1 = smoothing_scale(a[:2], w[:2], 1.0)
    torch.testing.assert_close(s1, torch.tensor([4.0, 1.0], dtype=torch.float64))


def test_errors_change_nothing():
    model = make("mamba1")
    calib = calibrate(model, windows(), {}, state_samples=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MqtoolError, match="unknown smoothing method"):
        apply_smooth(model, {}, calib, method="awq")
    with pytest.raises(MqtoolError, match="alpha"):
        apply_smooth(model, {}, calib, alpha=1.5)
    with pytest.raises(MqtoolError, match="calibration"):
        apply_smooth(model, {}, None)
    with pytest.raises(MqtoolError, match="unknown linear targets"):
        apply_smooth(model, {}, calib, targets=["conv1d"])
    with pytest.raises(MqtoolError, match="before activation quantization"):
        apply_smooth(model, {"act_quant": {"targets": ["in_proj"]}}, calib)
    other = calibrate(make("mamba1", rms_norm=False), windows(), {}, state_samples=0)
    other.stats["backbone.layers.1.mixer.out_proj.pre.absmax"] = torch.ones(5, dtype=torch.float64)
    with pytest.raises(MqtoolError, match="channels"):
        apply_smooth(model, {}, other, method="smooth-fused", targets=["in_proj", "out_proj"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert isinstance(model.mixers[0].out_proj.input_transform, torch.nn.Identity)
    assert not isinstance(model.mixers[0].gate_act, SSiLU)
    assert not isinstance(model.mixers[0].x_proj.input_transform, OnlineHadamard)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "hadamard"])
def test_ssm_input_smoothing(tmp_path, family, hadamard):
    """The 'ssm' target divides the scan's input x by s (conv weights + S-SiLU), the scan carries
    1/s to its output, which is multiplied back: logits unchanged in both modes, the SSM input's
    outlier channels flattened, and a reloaded checkpoint computes the same."""
    model = make(family)
    with torch.no_grad():
        for mixer in model.mixers:  # outlier channels at the SSM's input x
            mixer.conv1d.weight[1:3] *= 8.0
            mixer.conv1d.bias[1:3] += 2.0
    ids = windows(2, 11, seed=7)
    ref = {m: logits(model, ids, m) for m in ("parallel", "recurrent")}
    online: dict = {}
    if hadamard:
        online = add_online_hadamard(model, ["out_proj", "x_proj"] if family == "mamba1" else ["out_proj"])
    data = windows()
    calib = calibrate(model, data, {}, state_samples=0)
    rec = apply_smooth(model, online, calib, method="smooth-fused", alpha=0.5, targets=ALL + ["ssm"])
    json.dumps(rec)
    assert "ssm_smooth" in online and rec["targets"]["ssm"]["via"] == "ssm_smooth"
    assert all(isinstance(m.conv_act, SSiLU) for m in model.mixers)
    for mode, r in ref.items():
        err = rel(logits(model, ids, mode), r)
        assert err < 1e-3, f"{mode}: relative error {err:.2e}"
    after = calibrate(model, data, {}, state_samples=0)
    for i, (before_r, after_r) in enumerate(rec["targets"]["ssm"]["outlier_ratio"]):
        seen = ratio(after.get(f"backbone.layers.{i}.mixer.ssm_x", "absmax"))
        assert before_r == pytest.approx(ratio(calib.get(f"backbone.layers.{i}.mixer.ssm_x", "absmax")), rel=1e-3)
        assert seen == pytest.approx(after_r, rel=1e-3)
        assert after_r < 0.5 * before_r, f"layer {i}: outlier ratio {before_r:.2f} -> {after_r:.2f}"
    before = {m: logits(model, ids, m) for m in ("parallel", "recurrent")}
    loaded, ckpt = load_model(save_checkpoint(tmp_path / "s", model.config, model_state_dict(model),
                                              Manifest(online=online)))
    assert ckpt.manifest.online["ssm_smooth"] == {}
    for mode, r in before.items():
        assert torch.equal(logits(loaded, ids, mode), r), mode


def test_ssm_target_refusals_change_nothing():
    model = make("mamba2")
    calib = calibrate(model, windows(), {}, state_samples=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MqtoolError, match="smooth-fused only"):
        apply_smooth(model, {}, calib, method="smoothquant", targets=["in_proj", "ssm"])
    with pytest.raises(MqtoolError, match="already smoothed"):
        apply_smooth(model, {"ssm_smooth": {}}, calib, method="smooth-fused", targets=["ssm"])
    bad = calibrate(model, windows(), {}, state_samples=0)
    bad.stats["backbone.layers.1.mixer.ssm_x.absmax"] = torch.ones(3, dtype=torch.float64)
    with pytest.raises(MqtoolError, match="SSM input"):
        apply_smooth(model, {}, bad, method="smooth-fused", targets=["in_proj", "ssm"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not isinstance(model.mixers[0].conv_act, SSiLU)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("with_ssm", [False, True], ids=["matmul", "matmul+ssm"])
def test_matmul_smoothing_preserves_model(tmp_path, family, with_ssm):
    """The 'matmul' target (B / s, C * s per state channel) makes every state h / s and leaves C · h,
    so the fp32 logits are unchanged in parallel and recurrent mode, the states seen by the matmul
    are divided by s, and a reloaded checkpoint computes the same."""
    model = make(family)
    with torch.no_grad():  # outlier state channels: large B (and so h) in a few of them
        for mixer in model.mixers:
            if family == "mamba1":
                mixer.x_proj.weight[mixer.dt_rank:mixer.dt_rank + 2] *= 8.0
            else:
                mixer.conv1d.weight[mixer.d_inner:mixer.d_inner + 2] *= 8.0
    ids = windows(2, 11, seed=7)
    ref = {m: logits(model, ids, m) for m in ("parallel", "recurrent")}
    data = windows()
    calib = calibrate(model, data, {}, state_samples=4)
    online: dict = {}
    targets = ["matmul", "ssm"] if with_ssm else ["matmul"]
    rec = apply_smooth(model, online, calib, method="smooth-fused", alpha=0.5, targets=targets)
    json.dumps(rec)
    entry = rec["targets"]["matmul"]
    assert "matmul_smooth" in online and entry["via"] == "matmul_smooth"
    assert entry["s_range"][1] > 1.5 * entry["s_range"][0]  # a real (non-uniform) scale, not a no-op
    for mode, r in ref.items():
        err = rel(logits(model, ids, mode), r)
        assert err < 1e-5, f"{mode}: relative error {err:.2e}"
    after = calibrate(model, data, {}, state_samples=4)
    for i, mixer in enumerate(model.mixers):
        h0 = calib.get(f"backbone.layers.{i}.mixer.state", "absmax").double()
        h1 = after.get(f"backbone.layers.{i}.mixer.state", "absmax").double()
        g = getattr(mixer, "ngroups", 1)
        per_n0 = h0.reshape(g, -1, mixer.d_state).amax(1).reshape(-1)
        per_n1 = h1.reshape(g, -1, mixer.d_state).amax(1).reshape(-1)
        assert ratio(per_n1) < 0.5 * ratio(per_n0), f"layer {i}: state outlier ratio not reduced"
        if with_ssm:  # the SSM-input scale divides the states along d_inner too
            continue
        c0 = calib.get(f"backbone.layers.{i}.mixer.ssm_C", "absmax").double()
        s = smoothing_scale(per_n0, c0, 0.5)
        assert torch.allclose(per_n1, per_n0 / s, rtol=1e-4), f"layer {i}: states are not h / s"
    before = {m: logits(model, ids, m) for m in ("parallel", "recurrent")}
    loaded, ckpt = load_model(save_checkpoint(tmp_path / "s", model.config, model_state_dict(model),
                                              Manifest(online=online)))
    assert ckpt.manifest.online["matmul_smooth"] == {}
    for mode, r in before.items():
        assert torch.equal(logits(loaded, ids, mode), r), mode


def test_matmul_target_refusals_change_nothing():
    model = make("mamba1")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    no_states = calibrate(model, windows(), {}, state_samples=0)
    with pytest.raises(MqtoolError, match="state statistics"):
        apply_smooth(model, {}, no_states, method="smooth-fused", targets=["out_proj", "matmul"])
    calib = calibrate(model, windows(), {}, state_samples=2)
    with pytest.raises(MqtoolError, match="smooth-fused only"):
        apply_smooth(model, {}, calib, method="smoothquant", targets=["matmul"])
    with pytest.raises(MqtoolError, match="already smoothed"):
        apply_smooth(model, {"matmul_smooth": {}}, calib, method="smooth-fused", targets=["matmul"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_matmul_target_in_a_recipe(family):
    """A recipe's smooth stage with 'matmul' is calibrated with state statistics (recurrent mode),
    which the other stages do without; the stage keeps the model's function."""
    from mqtool.pipeline import STAGES, parse_recipe, run_recipe

    assert STAGES["smooth"].needs_states({"targets": ["out_proj", "matmul"]})
    assert not STAGES["smooth"].needs_states({"targets": ["out_proj", "ssm"]})
    assert not STAGES["quantize"].needs_states({"weights": {"bits": 8}})
    model = make(family)
    ids = windows(2, 11, seed=7)
    ref = logits(model, ids)
    online: dict = {}
    recipe = parse_recipe({"stages": [{"smooth": {"method": "smooth-fused", "targets": ["matmul"]}}]})
    records = run_recipe(model, online, recipe, windows())
    assert records[0]["record"]["targets"]["matmul"]["via"] == "matmul_smooth"
    assert rel(logits(model, ids), ref) < 1e-5
