"""Tests for `mqtool.quant.weights`: RTN / GPTQ weight quantization and activation quantizers."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mqtool.calibrate import calibrate
from mqtool.checkpoint import Manifest, build_model, load_model, model_state_dict, save_checkpoint
from mqtool.errors import MqtoolError
from mqtool.models import MambaConfig
from mqtool.quant.attach import linears
from mqtool.quant.quantizers import ActQuantizer, dequantize_weight, quantize_weight, static_scale_from_absmax
from mqtool.quant.weights import apply_quantize, weight_codes

VOCAB = 101
TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj")


def make(family: str, seed: int = 0):
    ssm = {"layer": "Mamba1", "d_state": 8} if family == "mamba1" else \
        {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, ssm_cfg=ssm)
    torch.manual_seed(seed)
    model = build_model(config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(torch.exp(0.3 * torch.randn(p.shape, generator=g)))
            elif name.endswith("conv1d.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def windows(n: int = 6, seqlen: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def logits(model, ids, mode="parallel"):
    return model(ids, mode=mode).float()


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 16)])
def test_rtn_exact(family, bits, group_size):
    model = make(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = apply_quantize(model, {}, None, weights={"bits": bits, "group_size": group_size})
    json.dumps(rec)
    targets = linears(model, TARGETS)
    assert set(rec["tensors"]) == {f"{n}.weight" for n in targets}
    for name, lin in targets.items():
        spec = rec["tensors"][f"{name}.weight"]
        gs = group_size if group_size is not None and lin.in_features % group_size == 0 else None
        assert spec == {"bits": bits, "group_size": gs, "method": "rtn"}
        w0 = before[f"{name}.weight"]
        q, scale = quantize_weight(w0, bits, gs)
        assert torch.equal(lin.weight, dequantize_weight(q, scale, gs)), name
        q2, scale2 = weight_codes(lin.weight, spec)  # codes and scales reproducible from the checkpoint
        assert torch.equal(q2, q) and torch.equal(scale2, scale), name
    if group_size is not None and family == "mamba1":  # dt_proj reads dt_rank = 2 channels: per channel
        assert rec["per_channel_fallback"] == [f"backbone.layers.{i}.mixer.dt_proj" for i in (0, 1)]
    # nothing else changed; lm_head / embedding untouched and still tied
    changed = {f"{n}.weight" for n in targets}
    for k, v in model.state_dict().items():
        if k not in changed:
            assert torch.equal(v, before[k]), k
    assert model.config.tie_embeddings is True and model.lm_head.weight is model.backbone.embedding.weight
    assert rec["untied"] is False


def _layer_error(calib, name, w, wq) -> float:
    """||X W^T - X Wq^T||_F^2 over the calibration inputs, from X^T X."""
    d = (w - wq).detach().double()
    return torch.trace(d @ calib.get(name, "xtx") @ d.T).item()


@pytest.mark.parametrize("family,group_size", [("mamba1", None), ("mamba1", 16), ("mamba2", None)])
def test_gptq_beats_rtn(family, group_size):
    model = make(family)
    calib = calibrate(model, windows(8, 16), {}, state_samples=0)
    originals = {n: lin.weight.detach().clone() for n, lin in linears(model, TARGETS).items()}
    results = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        rec = apply_quantize(m, {}, calib, weights={"bits": 4, "method": method, "group_size": group_size,
                                                     "block_size": 16})
        errs = {n: _layer_error(calib, n, originals[n], lin.weight) for n, lin in linears(m, TARGETS).items()}
        results[method] = errs
        for n, lin in linears(m, TARGETS).items():  # GPTQ weights are on the grid their spec records
            weight_codes(lin.weight, rec["tensors"][f"{n}.weight"])
        if method == "gptq":
            assert isinstance(rec["regridded_groups"], int)
    rtn, gptq = sum(results["rtn"].values()), sum(results["gptq"].values())
    assert gptq < 0.9 * rtn, f"GPTQ {gptq:.4g} vs RTN {rtn:.4g}"
    worse = {n: (results["gptq"][n], e) for n, e in results["rtn"].items() if results["gptq"][n] > 1.05 * e}
    assert not worse, worse


def test_lm_head_targeted_is_untied():
    model = make("mamba1")
    emb = model.backbone.embedding.weight.detach().clone()
    with pytest.raises(MqtoolError, match="both targeted and ignored"):
        apply_quantize(model, {}, None, weights={"bits": 4}, targets=[*TARGETS, "lm_head"])
    assert model.lm_head.weight is model.backbone.embedding.weight
    rec = apply_quantize(model, {}, None, weights={"bits": 4}, targets=["lm_head"], ignore=())
    assert rec["untied"] is True and model.config.tie_embeddings is False
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert torch.equal(model.backbone.embedding.weight, emb)  # never silently quantized
    assert torch.equal(model.lm_head.weight, dequantize_weight(*quantize_weight(emb, 4)))
    assert set(rec["tensors"]) == {"lm_head.weight"}


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("mode", ["per_token", "per_tensor"])
def test_act_quant_attached_and_reloaded(tmp_path, family, mode):
    model = make(family)
    calib = calibrate(model, windows(), {}, state_samples=0)
    ids = windows(2, 10, seed=5)
    ref = logits(model, ids)
    online: dict = {}
    rec = apply_quantize(model, online, calib, weights={"bits": 8}, activations={"bits": 8, "mode": mode})
    json.dumps(rec)
    kinds = ["in_proj", "x_proj", "dt_proj", "out_proj"] if family == "mamba1" else ["in_proj", "out_proj"]
    assert online == {"act_quant": {"targets": kinds, "bits": 8, "mode": mode}}
    for name, lin in linears(model, TARGETS).items():
        q = lin.input_quantizer
        assert isinstance(q, ActQuantizer) and q.mode == mode and q.bits == 8
        if mode == "per_tensor":
            expected = static_scale_from_absmax(calib.get(name, "absmax").max(), 8)
            assert torch.equal(q.scale, expected) and rec["activations"]["scales"][name] == float(expected)
    assert not isinstance(model.lm_head.input_quantizer, ActQuantizer)
    out = {m: logits(model, ids, m) for m in ("parallel", "recurrent")}
    assert 0 < rel(out["parallel"], ref) < 0.1
    path = save_checkpoint(tmp_path / "q", model.config, model_state_dict(model),
                           Manifest(online=online, quant=rec))
    loaded, ckpt = load_model(path)
    assert ckpt.manifest.online == online
    for m, r in out.items():
        assert torch.equal(logits(loaded, ids, m), r), m


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_w8a8_small_w4_larger(family):
    model = make(family)
    ids = windows(2, 16, seed=9)
    ref = logits(model, ids)
    errs = {}
    for bits in (8, 4):
        m = copy.deepcopy(model)
        apply_quantize(m, {}, None, weights={"bits": bits}, activations={"bits": 8})
        errs[bits] = rel(logits(m, ids), ref)
    assert errs[8] < 0.05, errs
    assert errs[4] > 2 * errs[8], errs


def test_errors_change_nothing():
    model = make("mamba1")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibrate(model, windows(), {}, state_samples=0)
    with pytest.raises(MqtoolError, match="nothing to quantize"):
        apply_quantize(model, {}, calib)
    with pytest.raises(MqtoolError, match="unknown weight settings"):
        apply_quantize(model, {}, calib, weights={"bits": 4, "groupsize": 128})
    with pytest.raises(MqtoolError, match="bits"):
        apply_quantize(model, {}, calib, weights={"bits": 16})
    with pytest.raises(MqtoolError, match="unknown weight quantization method"):
        apply_quantize(model, {}, calib, weights={"method": "awq"})
    with pytest.raises(MqtoolError, match="mode"):
        apply_quantize(model, {}, calib, activations={"mode": "per_channel"})
    with pytest.raises(MqtoolError, match="calibration"):
        apply_quantize(model, {}, None, weights={"method": "gptq"})
    with pytest.raises(MqtoolError, match="calibration"):
        apply_quantize(model, {}, None, activations={"mode": "per_tensor"})
    with pytest.raises(MqtoolError, match="unknown linear"):
        apply_quantize(model, {}, calib, weights={}, targets=["conv1d"])
    with pytest.raises(MqtoolError, match="already quantizes"):
        apply_quantize(model, {"act_quant": {"targets": ["in_proj"]}}, calib, activations={})
    bad = copy.copy(calib)
    bad.stats = dict(calib.stats)
    bad.stats["backbone.layers.1.mixer.out_proj.xtx"] = torch.eye(3, dtype=torch.float64)
    with pytest.raises(MqtoolError, match="width"):
        apply_quantize(model, {}, bad, weights={"method": "gptq"})
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(isinstance(lin.input_quantizer, torch.nn.Identity) for lin in linears(model, TARGETS).values())
