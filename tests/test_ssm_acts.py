"""Quantizers at the SSM's inputs (x, B, C; Δ on request): `apply_quantize(ssm_activations=...)`,
the manifest's `online["ssm_act_quant"]`, reload, refusals, and the `quantize` stage in a recipe."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from mqtool.calibrate import calibrate
from mqtool.checkpoint import Manifest, load_model, model_state_dict, save_checkpoint
from mqtool.errors import MqtoolError
from mqtool.pipeline import STAGES, parse_recipe, run_recipe, validate_stage
from mqtool.quant.attach import SSM_TARGETS, linears
from mqtool.quant.quantizers import ActQuantizer, static_scale_from_absmax
from mqtool.quant.weights import DEFAULT_SSM_TARGETS, apply_quantize

VOCAB = 101  # conftest's tiny vocabulary

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one thread, restored after


def ids(n: int = 2, seqlen: int = 19, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def logits(model, x, mode="parallel"):
    return model(x, mode=mode).float()


def tap_widths(mixer) -> dict[str, int]:
    """Channels each tap's per-token scale must span."""
    g = getattr(mixer, "ngroups", 1)
    return {"ssm_x": mixer.d_inner, "ssm_B": g * mixer.d_state, "ssm_C": g * mixer.d_state,
            "ssm_dt": getattr(mixer, "nheads", mixer.d_inner)}


@pytest.mark.parametrize("mode", ["per_token", "per_tensor"])
def test_ssm_quantizers_attached_close_and_reloaded(tmp_path, tiny_model, mode):
    model = tiny_model
    calib = calibrate(model, ids(6, 16, seed=1), {}, state_samples=0)
    x = ids()
    ref = {m: logits(model, x, m) for m in ("parallel", "recurrent")}
    online: dict = {}
    rec = apply_quantize(model, online, calib, ssm_activations={"bits": 8, "mode": mode})
    json.dumps(rec)
    spec = {"targets": ["ssm_x", "ssm_B", "ssm_C"], "bits": 8, "mode": mode}
    assert online == {"ssm_act_quant": spec}
    assert {k: v for k, v in rec["ssm_activations"].items() if k != "scales"} == spec
    assert "tensors" not in rec and "activations" not in rec
    for i, mixer in enumerate(model.mixers):
        assert isinstance(mixer.ssm_dt, nn.Identity)  # Δ stays FP by default
        for tap in DEFAULT_SSM_TARGETS:
            q = getattr(mixer, tap)
            assert isinstance(q, ActQuantizer) and q.mode == mode and q.bits == 8, (i, tap)
            if mode == "per_tensor":
                name = f"backbone.layers.{i}.mixer.{tap}"
                expected = static_scale_from_absmax(calib.get(name, "absmax").max(), 8)
                assert torch.equal(q.scale, expected) and rec["ssm_activations"]["scales"][name] == float(expected)
    if mode == "per_token":
        assert "scales" not in rec["ssm_activations"]
    assert all(isinstance(lin.input_quantizer, nn.Identity) for lin in linears(model, ("in_proj", "out_proj",
                                                                                       "lm_head")).values())
    # per token = one scale per token over the tap's channels (Mamba-2: before the head / group reshape)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    mixer = model.mixers[0]

    def keep(tap):
        def hook(module, inp, o):  # the first call (parallel mode) only; returns None: output unchanged
            seen.setdefault(tap, (inp[0], o))
        return hook

    hooks = [getattr(mixer, t).register_forward_hook(keep(t)) for t in DEFAULT_SSM_TARGETS]
    out = {m: logits(model, x, m) for m in ("parallel", "recurrent")}
    for h in hooks:
        h.remove()
    widths = tap_widths(mixer)
    for tap, (inp, o) in seen.items():
        assert inp.shape[-1] == widths[tap], tap
        scale = inp.float().abs().amax(-1, keepdim=True) / 127 if mode == "per_token" else getattr(mixer, tap).scale
        codes = o.float() / scale
        assert torch.allclose(codes, codes.round(), atol=1e-3), tap
        assert not torch.equal(o, inp), tap
    # differs from FP, but int8 at the SSM's inputs stays close; parallel and recurrent agree
    for m in out:
        assert 0 < rel(out[m], ref[m]) < 0.1, (m, rel(out[m], ref[m]))
    assert rel(out["recurrent"], out["parallel"]) < 1e-5
    # a saved and reloaded checkpoint computes exactly the same
    path = save_checkpoint(tmp_path / "q", model.config, model_state_dict(model), Manifest(online=online, quant=rec))
    loaded, ckpt = load_model(path)
    assert ckpt.manifest.online == online
    for m, r in out.items():
        assert torch.equal(logits(loaded, x, m), r), m


def test_ssm_dt_on_request_with_linear_quantization(tmp_path, config_factory, model_factory):
    """Δ is quantized when asked for; SSM and linear quantizers together, saved and reloaded."""
    model = model_factory(config_factory("mamba2"))
    calib = calibrate(model, ids(6, 16, seed=1), {}, state_samples=0)
    x = ids()
    ref = logits(model, x)
    online: dict = {}
    rec = apply_quantize(model, online, calib, weights={"bits": 8}, activations={"bits": 8},
                         ssm_activations={"mode": "per_tensor", "targets": ["ssm_dt", "ssm_C", "ssm_x", "ssm_B"]})
    assert online["ssm_act_quant"] == {"targets": list(SSM_TARGETS), "bits": 8, "mode": "per_tensor"}
    assert online["act_quant"]["targets"] == ["in_proj", "out_proj"] and rec["tensors"]
    assert len(rec["ssm_activations"]["scales"]) == 4 * len(model.mixers)
    for mixer in model.mixers:
        assert all(isinstance(getattr(mixer, t), ActQuantizer) for t in SSM_TARGETS)
    out = logits(model, x)
    assert 0 < rel(out, ref) < 0.15
    path = save_checkpoint(tmp_path / "q", model.config, model_state_dict(model), Manifest(online=online, quant=rec))
    loaded, _ = load_model(path)
    assert torch.equal(logits(loaded, x), out)


def test_bad_ssm_specs_refused(config_factory, model_factory):
    model = model_factory(config_factory("mamba1"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibrate(model, ids(4, 12, seed=1), {}, state_samples=0)
    refusals = [
        ({"bits": 8, "granularity": "token"}, "unknown SSM activation settings"),
        ({"targets": ["ssm_x", "ssm_z"]}, "unknown SSM activation targets"),
        ({"targets": ["in_proj"]}, "unknown SSM activation targets"),
        ({"targets": "ssm_x"}, "non-empty list"),
        ({"targets": []}, "non-empty list"),
        ({"bits": 16}, "bits"),
        ({"bits": True}, "bits"),
        ({"mode": "per_channel"}, "mode"),
    ]
    for spec, match in refusals:
        with pytest.raises(MqtoolError, match=match):
            apply_quantize(model, {}, calib, ssm_activations=spec)
    with pytest.raises(MqtoolError, match="must be a mapping"):
        apply_quantize(model, {}, calib, ssm_activations=8)
    with pytest.raises(MqtoolError, match="already quantizes the SSM"):
        apply_quantize(model, {"ssm_act_quant": {"targets": ["ssm_x"]}}, calib, ssm_activations={})
    with pytest.raises(MqtoolError, match="calibration"):
        apply_quantize(model, {}, None, ssm_activations={"mode": "per_tensor"})
    # stats missing at a tap, or of another width: refused before anything changes (weights too)
    no_tap = copy.copy(calib)
    no_tap.stats = {k: v for k, v in calib.stats.items() if ".ssm_C." not in k}
    with pytest.raises(MqtoolError, match="calibration has no backbone.layers.0.mixer.ssm_C.absmax"):
        apply_quantize(model, {}, no_tap, weights={"bits": 4}, ssm_activations={"mode": "per_tensor"})
    narrow = copy.copy(calib)
    narrow.stats = dict(calib.stats)
    narrow.stats["backbone.layers.1.mixer.ssm_B.absmax"] = torch.ones(3, dtype=torch.float64)
    with pytest.raises(MqtoolError, match="ssm_B does not match"):
        apply_quantize(model, {}, narrow, weights={"bits": 4}, activations={},
                       ssm_activations={"mode": "per_tensor"})
    # a bad SSM spec also stops the linear quantization given with it
    with pytest.raises(MqtoolError, match="unknown SSM activation targets"):
        apply_quantize(model, {}, calib, weights={"bits": 4}, activations={}, ssm_activations={"targets": ["h"]})
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for mixer in model.mixers:
        assert all(isinstance(getattr(mixer, t), nn.Identity) for t in SSM_TARGETS)
    assert all(isinstance(lin.input_quantizer, nn.Identity) for lin in linears(model, ("in_proj",)).values())


def test_recipe_with_ssm_activations(config_factory, model_factory):
    """A recipe's quantize stage takes ssm_activations; per tensor recalibrates the model as it is."""
    with pytest.raises(MqtoolError, match="unknown parameters"):
        validate_stage("quantize", {"ssm_acts": {}})
    assert STAGES["quantize"].needs_calib({"ssm_activations": {"mode": "per_tensor"}})
    assert not STAGES["quantize"].needs_calib({"ssm_activations": {"bits": 8}})
    recipe = parse_recipe({"name": "w8a8s8", "stages": [
        {"rotate": {"method": "hadamard"}},
        {"quantize": {"weights": {"bits": 8}, "activations": {"bits": 8},
                      "ssm_activations": {"bits": 8, "mode": "per_tensor"}}},
    ]})
    model = model_factory(config_factory("mamba1"))
    x = ids()
    ref = logits(model, x)
    windows = ids(6, 16, seed=1)
    online: dict = {}
    records = run_recipe(model, online, recipe, windows)
    assert [r["stage"] for r in records] == ["rotate", "quantize"]
    rec = records[1]["record"]
    assert online["ssm_act_quant"] == {"targets": ["ssm_x", "ssm_B", "ssm_C"], "bits": 8, "mode": "per_tensor"}
    assert "act_quant" in online and "hadamard" in online
    # the static scales come from a calibration of the stage's input (the rotated model)
    rotated = model_factory(config_factory("mamba1"))
    run_recipe(rotated, {}, parse_recipe({"stages": recipe.to_dict()["stages"][:1]}), windows)
    c = calibrate(rotated, windows, {}, state_samples=0)
    for name, s in rec["ssm_activations"]["scales"].items():
        assert s == float(static_scale_from_absmax(c.get(name, "absmax").max(), 8)), name
    assert 0 < rel(logits(model, x), ref) < 0.1
    # and a recipe with ssm_activations alone
    only = model_factory(config_factory("mamba2"))
    online = {}
    records = run_recipe(only, online, parse_recipe({"stages": [{"quantize": {"ssm_activations": {"bits": 8}}}]}),
                         windows)
    assert online == {"ssm_act_quant": {"targets": ["ssm_x", "ssm_B", "ssm_C"], "bits": 8, "mode": "per_token"}}
    assert "tensors" not in records[0]["record"]
