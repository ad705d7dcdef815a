"""Tests for the fused rotations (QuaRot Hadamard, MambaQuant KLT) of `mqtool.quant.rotate`."""

from __future__ import annotations

import json

import pytest
import torch

from mqtool.calibrate import calibrate
from mqtool.checkpoint import Manifest, build_model, load_model, model_state_dict, save_checkpoint
from mqtool.errors import MqtoolError
from mqtool.models import MambaConfig
from mqtool.quant.attach import OnlineHadamard
from mqtool.quant.hadamard import has_hadamard, random_hadamard_matrix
from mqtool.quant.rotate import apply_rotate

VOCAB = 101

# d_model 64: powers of two; 48: 12·4 and d_inner 96 = 12·8 (Paley); 46: no Hadamard of order 46,
# 92 (d_inner) or 3 (dt_rank), so every rotation takes the block-diagonal fallback.
SHAPES = {
    ("mamba1", 64): {},
    ("mamba1", 48): {},
    ("mamba1", 46): {},
    ("mamba2", 64): {"headdim": 16},
    ("mamba2", 48): {"headdim": 16},
    ("mamba2", 46): {"headdim": 23},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention (several times slower on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(family: str, d_model: int, seed: int = 0, n_layer: int = 2):
    ssm = {"layer": "Mamba1" if family == "mamba1" else "Mamba2", "d_state": 8, "expand": 2}
    if family == "mamba2":
        ssm.update(chunk_size=8, ngroups=1, **SHAPES[(family, d_model)])
    config = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg=ssm)
    torch.manual_seed(seed)
    model = build_model(config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):  # incl. Mamba-2's gated norm
                sign = torch.sign(torch.randn(p.shape, generator=g))
                p.copy_(torch.exp(0.4 * torch.randn(p.shape, generator=g)) * sign)
            elif name.endswith("conv1d.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(".D"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def windows(n: int = 4, seqlen: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def logits(model, ids, mode="parallel"):
    return model(ids, mode=mode).float()


@pytest.mark.parametrize("family,d_model", list(SHAPES))
@pytest.mark.parametrize("method", ["hadamard", "klt"])
@pytest.mark.parametrize("online_targets", [None, []], ids=["online", "offline"])
def test_logits_unchanged(family, d_model, method, online_targets):
    model = make(family, d_model)
    ids = windows(2, 9, seed=7)
    ref = {m: logits(model, ids, m) for m in ("parallel", "recurrent")}
    calib = calibrate(model, windows(), {}, state_samples=0) if method == "klt" else None
    online: dict = {}
    rec = apply_rotate(model, online, calib, method=method, online_targets=online_targets, seed=3)
    json.dumps(rec)
    for mode, r in ref.items():
        err = rel(logits(model, ids, mode), r)
        assert err < 1e-3, f"{mode}: relative error {err:.2e}"
    # every norm weight is folded
    for layer in model.backbone.layers:
        assert torch.equal(layer.norm.weight, torch.ones_like(layer.norm.weight))
        if family == "mamba2":
            assert torch.equal(layer.mixer.norm.weight, torch.ones_like(layer.mixer.norm.weight))
    assert torch.equal(model.backbone.norm_f.weight, torch.ones_like(model.backbone.norm_f.weight))
    # untied, and recorded
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert model.config.tie_embeddings is False and rec["untied"] is True
    assert rec["method"] == method and rec["seed"] == 3
    assert rec["residual"]["full_hadamard"] == has_hadamard(d_model)
    if family == "mamba1":
        assert rec["dt"]["size"] == model.mixers[0].dt_rank
    if online_targets is None:
        assert online["hadamard"] == {"targets": ["out_proj"], "kind": "hadamard", "seed": None}
        for mixer in model.mixers:
            t = mixer.out_proj.input_transform
            assert isinstance(t, OnlineHadamard) and t.fast == has_hadamard(mixer.d_inner)
        assert rec["online"]["out_proj"]["full_hadamard"] == has_hadamard(2 * d_model)
    else:
        assert online == {} and rec["online"] == {}


def test_hadamard_residual_is_random_hadamard():
    model = make("mamba1", 64)
    emb = model.backbone.embedding.weight.detach().clone()
    apply_rotate(model, {}, None, seed=5, online_targets=[])
    torch.testing.assert_close(model.backbone.embedding.weight.double(),
                               emb.double() @ random_hadamard_matrix(64, 5), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["hadamard", "klt"])
def test_online_x_proj_mamba1(method):
    model = make("mamba1", 48)
    ids = windows(2, 9, seed=3)
    ref = {m: logits(model, ids, m) for m in ("parallel", "recurrent")}
    calib = calibrate(model, windows(), {}, state_samples=0)
    online: dict = {}
    rec = apply_rotate(model, online, calib, method=method, online_targets=["out_proj", "x_proj"])
    assert online["hadamard"]["targets"] == ["out_proj", "x_proj"]
    assert set(rec["online"]) == {"out_proj", "x_proj"}
    for mixer in model.mixers:
        assert isinstance(mixer.x_proj.input_transform, OnlineHadamard)
    for mode, r in ref.items():
        assert rel(logits(model, ids, mode), r) < 1e-3


def _var_ratio(calib, model) -> tuple[float, float]:
    """max/min channel variance of (sum of all residual readers' inputs, layer 0's in_proj input)."""
    names = [f"backbone.layers.{i}.mixer.in_proj" for i in range(len(model.mixers))] + ["lm_head"]
    total = sum(torch.diagonal(calib.covariance(n)) for n in names)
    v0 = torch.diagonal(calib.covariance(names[0]))
    return (total.max() / total.min()).item(), (v0.max() / v0.min()).item()


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_klt_equalises_in_proj_input_variances(family):
    results = {}
    for method in ("hadamard", "klt"):
        model = make(family, 64)
        with torch.no_grad():  # anisotropic, correlated residual: a shared outlier direction on 4 channels
            E = model.backbone.embedding.weight
            a = torch.randn(E.shape[0], 1, generator=torch.Generator().manual_seed(11))
            v = torch.zeros(1, E.shape[1])
            v[0, :4] = 1.0
            E += a * v
            E[:, 4:8] *= 5.0
        data = windows(6, 12)
        calib = calibrate(model, data, {}, state_samples=0)
        apply_rotate(model, {}, calib, method=method, online_targets=[])
        after = calibrate(model, data, {}, state_samples=0)  # unit norm weights: what in_proj quantizes
        results[method] = _var_ratio(after, model)
    (had_total, had_l0), (klt_total, klt_l0) = results["hadamard"], results["klt"]
    msg = (f"max/min variance: hadamard total {had_total:.2f} layer0 {had_l0:.2f}; "
           f"klt {klt_total:.4f} {klt_l0:.2f}")
    assert klt_total < 1.01, msg  # exact on the calibration data
    assert had_total > 8 * klt_total, msg
    assert had_l0 > 5 * klt_l0, msg


@pytest.mark.parametrize("family,d_model", [("mamba1", 48), ("mamba2", 46)])
@pytest.mark.parametrize("method", ["hadamard", "klt"])
def test_save_reload_identical(tmp_path, family, d_model, method):
    model = make(family, d_model)
    calib = calibrate(model, windows(), {}, state_samples=0)
    online: dict = {}
    apply_rotate(model, online, calib, method=method)
    ids = windows(2, 10, seed=5)
    before = {m: logits(model, ids, m) for m in ("parallel", "recurrent")}
    out = save_checkpoint(tmp_path / "r", model.config, model_state_dict(model), Manifest(online=online))
    assert json.loads((out / "config.json").read_text())["tie_embeddings"] is False
    loaded, ckpt = load_model(out)
    assert "lm_head.weight" in ckpt.state_dict
    assert loaded.lm_head.weight is not loaded.backbone.embedding.weight
    assert isinstance(loaded.mixers[0].out_proj.input_transform, OnlineHadamard)
    for mode, r in before.items():
        assert torch.equal(logits(loaded, ids, mode), r)


def test_errors():
    model = make("mamba1", 64)
    with pytest.raises(MqtoolError, match="calibration"):
        apply_rotate(model, {}, None, method="klt")
    with pytest.raises(MqtoolError, match="unknown rotation method"):
        apply_rotate(model, {}, None, method="qr")
    with pytest.raises(MqtoolError, match="targets"):
        apply_rotate(model, {}, None, online_targets=["in_proj"])
    with pytest.raises(MqtoolError, match="already"):
        apply_rotate(model, {"hadamard": {"targets": ["out_proj"]}}, None)
    with pytest.raises(MqtoolError, match="Mamba-1 only"):
        apply_rotate(make("mamba2", 64), {}, None, online_targets=["x_proj"])
    ln = build_model(MambaConfig(d_model=32, n_layer=1, vocab_size=VOCAB, rms_norm=False,
                                 ssm_cfg={"d_state": 4}))
    with pytest.raises(MqtoolError, match="RMSNorm"):
        apply_rotate(ln, {}, None)
    # nothing was changed by the refused calls
    assert model.config.tie_embeddings is True
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_rotate_twice_refused():
    model = make("mamba2", 64)
    online: dict = {}
    apply_rotate(model, online, None)
    with pytest.raises(MqtoolError, match="already"):
        apply_rotate(model, online, None)
