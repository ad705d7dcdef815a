"""Hugging Face layout in and out: tiny random MambaForCausalLM / FalconMambaForCausalLM /
Mamba2ForCausalLM models built and saved by `transformers` itself, loaded by mqtool, compared logit
for logit with transformers' own forward (CPU, fp32); and what mqtool writes, read back by
transformers' `from_pretrained`. Skipped without transformers (an optional dependency)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from helpers import run_cli as run
from mqtool import hf_layout
from mqtool.checkpoint import Manifest, load_checkpoint, load_model, model_state_dict, save_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 100, 21  # chunk_size 8: the sequence crosses chunk boundaries and ends mid-chunk
TOL = 1e-4

_COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "state_size": 8, "num_hidden_layers": 2, "expand": 2,
           "conv_kernel": 4}
# name -> (class, config kwargs)
MODELS = {
    "mamba": ("MambaForCausalLM", "MambaConfig", {**_COMMON, "time_step_rank": 4}),
    "falcon_mamba": ("FalconMambaForCausalLM", "FalconMambaConfig", {**_COMMON, "time_step_rank": 4,
                                                                      "mixer_rms_eps": 1e-6}),
    "mamba2": ("Mamba2ForCausalLM", "Mamba2Config", {**_COMMON, "head_dim": 8, "num_heads": 8, "n_groups": 1,
                                                     "chunk_size": 8}),
    # Mamba-Codestral's shape of groups (8; here 1 head each), a clamping time_step_limit, untied head
    "mamba2_g8": ("Mamba2ForCausalLM", "Mamba2Config", {**_COMMON, "head_dim": 8, "num_heads": 8, "n_groups": 8,
                                                        "chunk_size": 8, "time_step_limit": (0.05, 2.0)}),
}


def _skip_ungrouped_norm(name: str) -> None:
    """transformers >= 5 normalises Mamba-2's gated norm per group on CPU (as mamba-ssm and mqtool);
    4.x's CPU path normalises over all channels, so with groups its logits are not a reference."""
    from transformers.models.mamba2 import modeling_mamba2

    grouped = "group_size" in inspect.signature(modeling_mamba2.MambaRMSNormGated.__init__).parameters
    if name == "mamba2_g8" and not grouped:
        pytest.skip(f"transformers {transformers.__version__}'s CPU Mamba-2 norm ignores n_groups (fixed in 5)")


@torch.no_grad()
def _hf_model(name: str, seed: int = 0):
    cls_name, cfg_name, kw = MODELS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kw)).eval()
    g = torch.Generator().manual_seed(seed)
    for pname, p in model.named_parameters():  # away from the init's ones and zeros, so each part shows
        if pname.endswith(("norm.weight", "norm_f.weight", ".D", "conv1d.bias")):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(MODELS))
def hf_dir(request, tmp_path):
    name = request.param
    model = _hf_model(name)
    path = tmp_path / name
    model.save_pretrained(path)
    with torch.no_grad():
        ref = model(_ids()).logits
    return name, path, ref


@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
def test_load_matches_transformers(hf_dir, mode):
    name, path, ref = hf_dir
    _skip_ungrouped_norm(name)
    net, ckpt = load_model(path)
    assert ckpt.manifest.layout == hf_layout.HF
    assert (net.config.layer == "Mamba2") == name.startswith("mamba2")
    with torch.no_grad():
        out = net(_ids(), mode=mode)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < TOL


def test_falcon_norms_shape_the_output(tmp_path):
    """Without FalconMamba's dt/B/C norms the same weights compute something else (the flag is live)."""
    path = tmp_path / "f"
    _hf_model("falcon_mamba").save_pretrained(path)
    net, ckpt = load_model(path)
    assert net.config.ssm["bcdt_rms_eps"] == 1e-6
    for m in net.mixers:
        m.bcdt_rms_eps = None
    ref = transformers.FalconMambaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        assert (net(_ids()) - ref(_ids()).logits).abs().max().item() > 1e-2


def test_config_maps_both_ways(hf_dir):
    name, path, _ = hf_dir
    d = json.loads((path / "config.json").read_text())
    config = hf_layout.config_from_hf(d)
    assert (config.d_model, config.n_layer, config.padded_vocab_size) == (32, 2, VOCAB)
    back = hf_layout.config_to_hf(config, d)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "state_size", "conv_kernel",
                "expand", "tie_word_embeddings", "layer_norm_epsilon", "residual_in_fp32", "use_bias",
                "use_conv_bias", "n_groups", "head_dim", "num_heads", "chunk_size", "time_step_rank",
                "mixer_rms_eps", "bos_token_id", "eos_token_id"):
        if key in d and not (key == "time_step_rank" and name.startswith("mamba2")):
            assert back[key] == d[key], key
    if name.startswith("mamba2"):
        assert config.ssm["ngroups"] == d["n_groups"] and config.ssm["headdim"] == d["head_dim"]
        assert hf_layout._json_float(back["time_step_limit"][1]) == hf_layout._json_float(d["time_step_limit"][1])
    # a state-spaces config is not mistaken for HF, and another HF model is refused in one line
    assert hf_layout.hf_model_type({"d_model": 32, "n_layer": 2}) is None
    with pytest.raises(hf_layout.MqtoolError, match="'llama'"):
        hf_layout.hf_model_type({"model_type": "llama"})


def _transformers_logits(path, name: str) -> torch.Tensor:
    model = getattr(transformers, MODELS[name][0]).from_pretrained(path).eval()
    with torch.no_grad():
        return model(_ids()).logits


def test_fp_goes_out_as_hf(hf_dir, tmp_path):
    """An HF checkpoint saved by mqtool is HF layout again, and transformers computes the same logits."""
    name, path, ref = hf_dir
    _skip_ungrouped_norm(name)
    net, ckpt = load_model(path)
    out = save_checkpoint(tmp_path / "out", net.config, model_state_dict(net), ckpt.manifest, ckpt.tokenizer_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == json.loads((path / "config.json").read_text())["model_type"]
    from safetensors.torch import load_file

    stored = load_file(out / "model.safetensors")
    assert "backbone.embeddings.weight" in stored and "backbone.embedding.weight" not in stored
    assert (_transformers_logits(out, name) - ref).abs().max().item() < TOL
    again = load_checkpoint(out)
    assert again.manifest.layout == hf_layout.HF
    assert again.state_dict.keys() == model_state_dict(net).keys()


def test_state_spaces_stays_state_spaces(tmp_path):
    from conftest import make_config, make_model

    model = make_model(make_config("mamba1"))
    out = save_checkpoint(tmp_path / "ss", model.config, model_state_dict(model), Manifest(source="test"))
    cfg = json.loads((out / "config.json").read_text())
    assert "d_model" in cfg and "model_type" not in cfg
    assert load_checkpoint(out).manifest.layout == hf_layout.STATE_SPACES
    assert "backbone.embedding.weight" in load_checkpoint(out).state_dict


@pytest.mark.parametrize("name", ["mamba", "falcon_mamba", "mamba2"])
def test_fake_quant_stage_loads_in_transformers(capsys, tmp_path, name):
    """`mqtool quantize` on an HF checkpoint writes HF layout: transformers loads the weight-only
    stage and computes what mqtool does; with activation quantizers (extra buffers, which transformers
    ignores) it still loads, and mqtool reloads everything from mqtool.json."""
    src = tmp_path / "src"
    _hf_model(name).save_pretrained(src)
    w8, w8a8 = tmp_path / "w8", tmp_path / "w8a8"
    code, _, err = run(capsys, "quantize", str(src), "--weights", "8", "-o", str(w8))
    assert code == 0, err
    code, _, err = run(capsys, "quantize", str(src), "--weights", "8", "--acts", "8", "-o", str(w8a8))
    assert code == 0, err
    for out in (w8, w8a8):
        assert json.loads((out / "config.json").read_text())["model_type"] == name
        assert json.loads((out / "mqtool.json").read_text())["layout"] == hf_layout.HF
    fp, _ = load_model(src)
    q, _ = load_model(w8)
    qa, _ = load_model(w8a8)
    with torch.no_grad():
        q_logits, qa_logits, fp_logits = q(_ids()), qa(_ids()), fp(_ids())
    assert (q_logits - fp_logits).abs().max().item() > 1e-4  # the weights did change
    assert (_transformers_logits(w8, name) - q_logits).abs().max().item() < TOL
    assert (qa_logits - q_logits).abs().max().item() > 1e-5  # mqtool reloaded the activation quantizers
    hf_qa = _transformers_logits(w8a8, name)  # loads: the quantizers' buffers are unexpected keys
    assert (hf_qa - q_logits).abs().max().item() < TOL  # what transformers computes: the weights alone


TEXT = ("The kernel schedules tasks on each CPU. A task that sleeps gives up the processor; "
        "the scheduler then picks the next runnable task from its queue.\n\n") * 40


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", ["mamba", "falcon_mamba", "mamba2"])
def test_stage_chain_on_hf(capsys, tmp_path, name):
    """calibrate -> smooth (smooth-fused) -> quantize (W8A8, static per-tensor scales) on an HF
    checkpoint with its own tokenizer: every output is HF layout that transformers loads, extra
    tensors (S-SiLU scales, activation scales) and all; mqtool reloads the smoothed model to the
    same function. FalconMamba's dt_proj is not smoothed (a norm sits between x_proj and dt_proj)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cls_name, cfg_name, kw = MODELS[name]
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**{**kw, "vocab_size": 300}))
    src = tmp_path / "src"
    hf.save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    c1, c2, s, q = (tmp_path / n for n in ("c1", "c2", "s", "q"))
    calib = ["--data", str(text), "--samples", "8", "--seqlen", "32", "--state-samples", "2", "--device", "cpu"]
    assert run(capsys, "calibrate", str(src), "-o", str(c1), *calib)[0] == 0
    code, _, err = run(capsys, "smooth", str(src), "--calib", str(c1), "--method", "smooth-fused", "-o", str(s))
    assert code == 0, err
    assert run(capsys, "calibrate", str(s), "-o", str(c2), *calib)[0] == 0
    code, _, err = run(capsys, "quantize", str(s), "--weights", "8", "--acts", "8", "--act-mode", "per_tensor",
                       "--calib", str(c2), "-o", str(q))
    assert code == 0, err
    ids = torch.randint(0, 300, (1, SEQ), generator=torch.Generator().manual_seed(2))
    fp, _ = load_model(src)
    smoothed, _ = load_model(s)
    with torch.no_grad():
        assert (smoothed(ids) - fp(ids)).abs().max().item() < TOL
    record = json.loads((s / "mqtool.json").read_text())["stages"][-1]["params"]["record"]
    smoothed_dt = [k for k in record["targets"] if k.endswith("dt_proj")]
    skipped_dt = {k: v for k, v in record["skipped"].items() if k.endswith("dt_proj")}
    assert len(smoothed_dt) == (2 if name == "mamba" else 0)
    assert len(skipped_dt) == (2 if name == "falcon_mamba" else 0)
    assert all("FalconMamba" in why for why in skipped_dt.values())
    hf_keys = set(getattr(transformers, cls_name).from_pretrained(src).state_dict())
    for out in (s, q):
        from safetensors.torch import load_file

        assert json.loads((out / "config.json").read_text())["model_type"] == name
        stored = set(load_file(out / "model.safetensors"))
        if out == q or name != "mamba2":
            assert stored - hf_keys  # tensors transformers has no place for ...
        model = getattr(transformers, cls_name).from_pretrained(out).eval()  # ... and it loads all the same
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all()
        if out == s and name == "mamba2":  # smoothing changed weights only: transformers computes it too
            assert (logits - fp(ids)).abs().max().item() < TOL
