"""`mqtool export --format compressed-tensors`: the checkpoint vLLM's Mamba2ForCausalLM serves.

Tests that read or write the format skip without compressed-tensors (`pip install "mqtool[serve]"`);
the refusals and the missing-package hint run everywhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from mqtool.checkpoint import Manifest, load_model, model_state_dict, save_checkpoint
from mqtool.pipeline import weight_specs

W4A8 = """name: w4a8-test
description: test
stages:
  - quantize:
      weights: {bits: 4, method: rtn}
      activations: {bits: 8, mode: per_token}
      targets: [in_proj, out_proj]
"""


@pytest.fixture
def fp_model(tmp_path: Path, config_factory, model_factory):
    """`fp_model(family)`: a tiny full-precision checkpoint on disk."""

    def make(family: str = "mamba2") -> Path:
        cfg = config_factory(family)
        out = tmp_path / f"fp-{family}"
        save_checkpoint(out, cfg, model_state_dict(model_factory(cfg)), Manifest(source="test"))
        return out

    return make


def _quantize(capsys, src: Path, out: Path, *args: str) -> Path:
    code, _, err = run_cli(capsys, "quantize", str(src), "-o", str(out), *args)
    assert code == 0, err
    return out


def _export(capsys, src: Path, out: Path) -> tuple[int, str]:
    code, _, err = run_cli(capsys, "export", str(src), "-o", str(out), "--format", "compressed-tensors")
    return code, " ".join(err.split())


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": m.weight.detach() for name, m in model.named_modules()
            if name.endswith(("in_proj", "out_proj"))}


@pytest.mark.parametrize("args, fmt, tensor", [
    (("--recipe", "w8a8-serve"), "int-quantized", "weight"),
    (("--weights", "4", "--group-size", "16"), "pack-quantized", "weight_packed"),
])
def test_export_decompresses_to_our_weights(capsys, tmp_path, fp_model, args, fmt, tensor):
    """compressed-tensors' own decompressors (through transformers' loader, as a consumer sees the
    file) give back exactly mqtool's dequantized weights; mqtool reads the export back to the same model."""
    pytest.importorskip("compressed_tensors")
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    q = _quantize(capsys, fp_model("mamba2"), tmp_path / "q", *args)
    e = tmp_path / "e"
    code, err = _export(capsys, q, e)
    assert code == 0, err
    stored = load_file(e / "model.safetensors")
    base = "backbone.layers.0.mixer.in_proj"
    assert f"{base}.weight_scale" in stored and f"{base}.{tensor}" in stored
    if tensor == "weight":
        assert stored[f"{base}.weight"].dtype == torch.int8
    else:
        assert stored[f"{base}.weight_packed"].dtype == torch.int32 and f"{base}.weight" not in stored
    assert "backbone.embeddings.weight" in stored  # HF tensor names

    hf = AutoConfig.from_pretrained(e)
    assert hf.model_type == "mamba2" and type(hf).__name__ == "Mamba2Config"
    qc = hf.quantization_config
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt and "lm_head" in qc["ignore"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert (group["input_activations"] is not None) == (fmt == "int-quantized")

    sim, _ = load_model(q)
    ours = _linear_weights(sim)
    hf_model = AutoModelForCausalLM.from_pretrained(e, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                    dtype=torch.float32)
    theirs = hf_model.state_dict()
    assert len(ours) == 4
    for name, w in ours.items():
        assert torch.equal(theirs[name], w), name

    back, _ = load_model(e)  # mqtool reads it back (dequantized, activation quantizers re-attached)
    for (name, a), (_, b) in zip(sim.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randint(0, 100, (2, 13))
    assert torch.equal(sim(x), back(x))


@pytest.mark.parametrize("family, args, reason", [
    ("mamba1", ("--weights", "8", "--acts", "8"), "vLLM does not quantize Mamba-1's linears"),
    ("mamba2", ("--recipe", "w8a8-rtn"), "SSM-input quantizers"),
    ("mamba2", ("--recipe", "w8a8-quarot"), "an online Hadamard"),
    ("mamba2", ("--recipe", "W4A8"), "W4A8 is not exported"),
])
def test_refuses_what_vllm_cannot_apply(capsys, tmp_path, fp_model, family, args, reason):
    """A checkpoint that needs what vLLM cannot apply is refused with one line that says what."""
    src = fp_model(family)
    if "W4A8" in args:
        (tmp_path / "w4a8.yaml").write_text(W4A8)
        args = ("--recipe", str(tmp_path / "w4a8.yaml"))
    q = _quantize(capsys, src, tmp_path / "q", *args)
    code, err = _export(capsys, q, tmp_path / "e")
    assert code == 2, err
    assert reason in err and "cannot export for vLLM" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()


def test_refusal_reasons(config_factory):
    """The reasons no CLI run above reaches: static activations, other bit widths, grouped W8A8."""
    from mqtool.quant.ct_export import refusal

    cfg = config_factory("mamba2")
    w = "backbone.layers.0.mixer.in_proj.weight"
    per_token = {"act_quant": {"targets": ["in_proj"], "bits": 8, "mode": "per_token"}}
    assert refusal(cfg, {w: {"bits": 8, "group_size": None}}, per_token) is None
    assert refusal(cfg, {w: {"bits": 4, "group_size": 16}}, {}) is None
    static = {"act_quant": {"targets": ["in_proj"], "bits": 8, "mode": "per_tensor"}}
    assert "only dynamic per-token" in refusal(cfg, {w: {"bits": 8, "group_size": None}}, static)
    assert "4 or 8 bits" in refusal(cfg, {w: {"bits": 6, "group_size": None}}, {})
    assert "per output channel" in refusal(cfg, {w: {"bits": 8, "group_size": 16}}, per_token)
    assert "lm_head" in refusal(cfg, {"lm_head.weight": {"bits": 8, "group_size": None}}, {})
    bare = {"act_quant": {"targets": ["out_proj"], "bits": 8, "mode": "per_token"}}
    assert "weights are not" in refusal(cfg, {w: {"bits": 8, "group_size": None}}, bare)


def test_without_compressed_tensors_one_line_hint(capsys, tmp_path, fp_model, monkeypatch):
    """Without the optional package the export fails with the pip command, nothing written."""
    q = _quantize(capsys, fp_model("mamba2"), tmp_path / "q", "--recipe", "w8a8-serve")
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import raises ImportError
    code, err = _export(capsys, q, tmp_path / "e")
    assert code == 2 and 'pip install "mqtool[serve]"' in err, err
    assert not (tmp_path / "e").exists()


def test_serve_recipe_fuses_everything(capsys, tmp_path, fp_model):
    """w8a8-serve leaves nothing online but the per-token activation quantizers vLLM applies."""
    q = _quantize(capsys, fp_model("mamba2"), tmp_path / "q", "--recipe", "w8a8-serve")
    manifest = json.loads((q / "mqtool.json").read_text())
    assert sorted(manifest["online"]) == ["act_quant"]
    assert manifest["online"]["act_quant"]["mode"] == "per_token"
    specs = weight_specs(manifest["stages"])
    assert sorted({n.split(".")[-2] for n in specs}) == ["in_proj", "out_proj"] and len(specs) == 4
