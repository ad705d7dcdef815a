"""Tests for mqtool.checkpoint: the checkpoint directory contract (round trip, tied lm_head,
manifest, shards, pytorch_model.bin), atomic writes, and clear MqtoolErrors for bad inputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import VOCAB, make_config, make_model  # tests/ is on sys.path under pytest
from mqtool import checkpoint as ck
from mqtool.errors import MqtoolError
from mqtool.models import MambaConfig

pytestmark = pytest.mark.usefixtures("single_thread")

# the repository's sibling ../shared (as every checkout and CI run has it)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF_MODEL = SHARED / "models" / "mamba2-ref-25m"


def _ids(batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, ids=None) -> torch.Tensor:
    return model(_ids() if ids is None else ids)


def _save(model, out: Path, manifest: ck.Manifest | None = None, **kw) -> Path:
    return ck.save_checkpoint(out, model.config, ck.model_state_dict(model),
                              manifest or ck.Manifest(source="test"), **kw)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ round trip

def test_round_trip_identical_logits(tiny_model, tmp_path):
    out = _save(tiny_model, tmp_path / "ckpt")
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "mqtool.json"]
    stored = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in stored  # tied: the embedding is the one copy (as state-spaces stores it)
    assert set(stored) == set(tiny_model.state_dict()) - {"lm_head.weight"}
    assert json.loads((out / "config.json").read_text()) == tiny_model.config.to_dict()

    model, ckpt = ck.load_model(out)
    assert ckpt.config == tiny_model.config and ckpt.tokenizer_path is None
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert torch.equal(_logits(model), _logits(tiny_model))
    assert torch.equal(model(_ids(), mode="recurrent"), tiny_model(_ids(), mode="recurrent"))


def test_untied_lm_head_is_stored(tmp_path):
    src = make_model(make_config("mamba1", tie_embeddings=False))
    out = _save(src, tmp_path / "ckpt")
    stored = load_file(out / "model.safetensors")
    assert torch.equal(stored["lm_head.weight"], src.lm_head.weight)
    model, _ = ck.load_model(out)
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert torch.equal(_logits(model), _logits(src))


def test_load_in_bf16_keeps_tie(tmp_path):
    out = _save(make_model(make_config("mamba2")), tmp_path / "ckpt")
    model, _ = ck.load_model(out, dtype=torch.bfloat16)
    assert model.backbone.embedding.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert torch.isfinite(_logits(model).float()).all()


def test_manifest_records_stages(tiny_model, tmp_path):
    first = _save(tiny_model, tmp_path / "a", manifest=ck.Manifest(source="state-spaces/mamba-130m"))
    base = ck.load_checkpoint(first)
    h = base.input_hash
    assert len(h) == 16 and h == ck.checkpoint_hash(first)
    manifest = ck.record_stage(base.manifest, "rotate", {"method": "klt", "seed": 0}, h)
    manifest = ck.record_stage(manifest, "smooth", {"alpha": 0.5}, "0123456789abcdef")
    assert base.manifest.stages == []  # record_stage returns a copy
    second = _save(tiny_model, tmp_path / "b", manifest=manifest)

    raw = json.loads((second / "mqtool.json").read_text())
    assert raw["format"] == "mqtool" and raw["format_version"] == ck.FORMAT_VERSION
    assert raw["mqtool_version"] and raw["source"] == "state-spaces/mamba-130m" and raw["exported"] is False
    assert [s["stage"] for s in raw["stages"]] == ["rotate", "smooth"]
    rotate = raw["stages"][0]
    assert rotate["params"] == {"method": "klt", "seed": 0} and rotate["input_hash"] == h
    assert {"time", "mqtool_version"} <= set(rotate)
    loaded = ck.load_checkpoint(second).manifest
    assert loaded.stage_names() == ["rotate", "smooth"] and loaded.stages == manifest.stages
    # the hash identifies the content: equal for equal content, different when a weight changes
    assert ck.checkpoint_hash(second) != h
    with torch.no_grad():
        tiny_model.backbone.norm_f.weight.add_(1.0)
    third = _save(tiny_model, tmp_path / "c", manifest=ck.Manifest(source="state-spaces/mamba-130m"))
    assert ck.checkpoint_hash(third) != h


def test_manifest_from_newer_mqtool_is_refused(tiny_model, tmp_path):
    out = _save(tiny_model, tmp_path / "ckpt")
    raw = json.loads((out / "mqtool.json").read_text())
    (out / "mqtool.json").write_text(json.dumps({**raw, "format_version": ck.FORMAT_VERSION + 1}))
    with pytest.raises(MqtoolError, match="upgrade mqtool"):
        ck.load_checkpoint(out)
    (out / "mqtool.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(MqtoolError, match="not an mqtool manifest"):
        ck.load_checkpoint(out)
    (out / "mqtool.json").write_text("{")
    with pytest.raises(MqtoolError, match="not valid JSON"):
        ck.load_checkpoint(out)


def test_online_scales_survive_save_and_reload(tmp_path):
    """What a stage attached (here S-SiLU with its scales) computes the same after reload."""
    from mqtool.quant.attach import apply_online

    src = make_model(make_config("mamba2"))
    online = {"s_silu": {}}
    apply_online(src, online)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mixer in src.mixers:
            mixer.norm.gate_act.s.copy_(torch.rand(mixer.d_inner, generator=g) * 2 + 0.5)
    out = _save(src, tmp_path / "ckpt", manifest=ck.Manifest(source="test", online=online))
    model, _ = ck.load_model(out)
    assert torch.equal(_logits(model), _logits(src))
    # and the scales are really what is loaded: without the manifest entry they are unexpected
    ckpt = ck.load_checkpoint(out)
    with pytest.raises(MqtoolError, match="unexpected"):
        ck.build_model(ckpt.config, ckpt.state_dict)


# ------------------------------------------------------------------------------ shards, .bin

def test_sharded_save_and_load(tiny_model, tmp_path):
    state = ck.model_state_dict(tiny_model)
    limit = 16 * 1024
    out = ck.save_checkpoint(tmp_path / "ckpt", tiny_model.config, state, ck.Manifest(),
                             max_shard_bytes=limit)
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    for name in shards:
        tensors = load_file(out / name)
        size = sum(v.numel() * v.element_size() for v in tensors.values())
        assert size <= limit or len(tensors) == 1  # only a single oversized tensor may exceed it
        assert all(index["weight_map"][k] == name for k in tensors)
    model, _ = ck.load_model(out)
    assert torch.equal(_logits(model), _logits(tiny_model))


def test_pytorch_model_bin_loads(tmp_path):
    src = make_model(make_config("mamba1"))
    out = tmp_path / "bin"
    out.mkdir()
    src.config.save(out / "config.json")
    torch.save(src.state_dict(), out / "pytorch_model.bin")  # as state-spaces did: lm_head.weight included
    model, ckpt = ck.load_model(out)
    assert ckpt.manifest.source == str(out) and ckpt.manifest.stages == []
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert torch.equal(_logits(model), _logits(src))


def test_pytorch_model_bin_with_pickled_code_is_refused(tmp_path):
    src = make_model(make_config("mamba1"))
    out = tmp_path / "bin"
    out.mkdir()
    src.config.save(out / "config.json")
    torch.save({"weights": src.state_dict(), "obj": Path("x")}, out / "pytorch_model.bin")
    with pytest.raises(MqtoolError):  # weights_only: no arbitrary objects are unpickled
        ck.load_checkpoint(out)


# ------------------------------------------------------------------------------ atomic writes

def test_existing_output_needs_force(tiny_model, tmp_path):
    out = _save(tiny_model, tmp_path / "ckpt")
    (out / "keep.txt").write_text("user file")
    before = _tree(out)
    other = make_model(tiny_model.config, seed=1)
    with pytest.raises(MqtoolError, match="--force"):
        _save(other, out)
    assert _tree(out) == before
    _save(other, out, force=True)
    assert not (out / "keep.txt").exists()  # replaced as a whole, not merged
    model, _ = ck.load_model(out)
    assert torch.equal(_logits(model), _logits(other))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .tmp / .old left behind


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_nothing_behind(tiny_model, tmp_path, monkeypatch, existing):
    out = tmp_path / "ckpt"
    if existing:
        _save(tiny_model, out)
    before = _tree(tmp_path)
    listing = sorted(os.listdir(tmp_path))
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # after one shard has been written
            raise OSError("No space left on device")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space"):
        _save(make_model(tiny_model.config, seed=1), out, force=existing, max_shard_bytes=16 * 1024)
    assert len(calls) == 2
    assert sorted(os.listdir(tmp_path)) == listing  # no partial output, no temporary directory
    assert _tree(tmp_path) == before  # an existing checkpoint is untouched


def test_failure_while_swapping_in_keeps_the_old_checkpoint(tiny_model, tmp_path, monkeypatch):
    """--force over an existing checkpoint: if moving the new one into place fails (after the old
    one was moved aside), the old one must be back at `out`, not left under a hidden name."""
    out = _save(tiny_model, tmp_path / "ckpt")
    before = _tree(tmp_path)
    real_rename = Path.rename
    monkeypatch.setattr("mqtool.atomic._exchange", lambda a, b: False)  # the two-rename replace

    def rename(self, target):
        if ".tmp-" in self.name:
            raise OSError("simulated failure moving the new checkpoint into place")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        _save(make_model(tiny_model.config, seed=1), out, force=True)
    monkeypatch.undo()
    assert _tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_check_output_dir(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for spelling in (inp, tmp_path / "in" / ".." / "in", str(inp) + "/"):
        with pytest.raises(MqtoolError, match="input"):
            ck.check_output_dir(spelling, force=True, inputs=(inp,))
    link = tmp_path / "link"
    link.symlink_to(inp)
    with pytest.raises(MqtoolError, match="input"):
        ck.check_output_dir(link, force=True, inputs=(inp,))
    with pytest.raises(MqtoolError, match="--force"):
        ck.check_output_dir(inp, force=False)
    assert ck.check_output_dir(inp, force=True) == inp
    assert ck.check_output_dir(tmp_path / "new", force=False, inputs=(inp,)) == tmp_path / "new"
    (tmp_path / "file").write_text("x")
    with pytest.raises(MqtoolError, match="not a directory"):
        ck.check_output_dir(tmp_path / "file", force=True)


# ------------------------------------------------------------------------------ errors

def test_missing_directory_and_file_instead_of_directory(tmp_path):
    with pytest.raises(MqtoolError, match="no such directory"):
        ck.load_model(tmp_path / "does-not-exist")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(MqtoolError, match="is a file"):
        ck.load_model(tmp_path / "model.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MqtoolError, match="config.json"):
        ck.load_model(empty)


def test_truncated_safetensors(tiny_model, tmp_path):
    out = _save(tiny_model, tmp_path / "ckpt")
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(MqtoolError, match="truncated or corrupt") as e:
        ck.load_model(out)
    assert str(out) in str(e.value)


def test_missing_shard(tiny_model, tmp_path):
    out = _save(tiny_model, tmp_path / "ckpt", max_shard_bytes=16 * 1024)
    next(out.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(MqtoolError, match="cannot read the weights"):
        ck.load_model(out)


def test_no_weights(tiny_model, tmp_path):
    out = _save(tiny_model, tmp_path / "ckpt")
    (out / "model.safetensors").unlink()
    with pytest.raises(MqtoolError, match="no weights"):
        ck.load_model(out)


BERT_CONFIG = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768,
               "num_hidden_layers": 12, "num_attention_heads": 12, "vocab_size": 30522}


@pytest.mark.parametrize("text,match", [
    (json.dumps(BERT_CONFIG), "not a Mamba config"),
    ('{"d_model": 32, "n_layer": 2,', "not valid JSON"),
    ("\xff\xfe garbage", "not valid JSON"),
    (json.dumps({"d_model": 32, "n_layer": 2, "ssm_cfg": {"layer": "Mamba3"}}), "Mamba3"),
    (json.dumps({"d_model": 32, "n_layer": 2, "attn_layer_idx": [1]}), "attention"),
])
def test_bad_config_json(tiny_model, tmp_path, text, match):
    out = _save(tiny_model, tmp_path / "ckpt")
    (out / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(MqtoolError, match=match):
        ck.load_model(out)


def _rewrite_weights(out: Path, edit) -> None:
    state = load_file(out / "model.safetensors")
    edit(state)
    save_file(state, out / "model.safetensors")


def test_weights_not_matching_config(family, tiny_model, tmp_path):
    out = _save(tiny_model, tmp_path / "ckpt")
    key = "backbone.layers.1.mixer.in_proj.weight"

    def wrong_shape(s):
        s[key] = s[key][:-1].contiguous()

    _rewrite_weights(out, wrong_shape)
    with pytest.raises(MqtoolError, match=r"in_proj\.weight has shape"):
        ck.load_model(out)

    out = _save(tiny_model, tmp_path / "ckpt2")
    _rewrite_weights(out, lambda s: s.pop("backbone.layers.0.mixer.A_log"))
    with pytest.raises(MqtoolError, match=r"missing 1 tensors.*A_log"):
        ck.load_model(out)

    out = _save(tiny_model, tmp_path / "ckpt3")
    _rewrite_weights(out, lambda s: s.update({"backbone.layers.2.mixer.D": torch.ones(3)}))
    with pytest.raises(MqtoolError, match=r"unexpected 1 tensors.*layers\.2"):
        ck.load_model(out)

    # weights of another size of the same family: config says d_model 32, weights are 48
    other = make_model(make_config(family, d_model=48))
    out = _save(other, tmp_path / "ckpt4")
    tiny_model.config.save(out / "config.json")
    with pytest.raises(MqtoolError, match="do not match config.json"):
        ck.load_model(out)


def test_repo_id_with_hub_unreachable(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = []

    def unreachable(repo_id, **kw):
        asked.append(repo_id)
        raise OSError("Failed to establish a new connection: [Errno 101] Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(MqtoolError, match="Hugging Face hub") as e:
        ck.load_model("state-spaces/mamba-130m")
    assert asked == ["state-spaces/mamba-130m"]
    assert "state-spaces/mamba-130m" in str(e.value) and "unreachable" in str(e.value)
    # a path that cannot be a repo id is never sent to the hub
    with pytest.raises(MqtoolError, match="no such directory"):
        ck.load_model("./state-spaces/mamba-130m")
    assert asked == ["state-spaces/mamba-130m"]


# ------------------------------------------------------------------------------ the shared reference model

@pytest.mark.skipif(not (REF_MODEL / "config.json").exists(), reason="../shared/models/mamba2-ref-25m absent")
@torch.no_grad()
def test_shared_mamba2_reference_model_loads():
    import tokenizers

    model, ckpt = ck.load_model(REF_MODEL)
    config = ckpt.config
    assert isinstance(config, MambaConfig) and config.layer == "Mamba2" and config.tie_embeddings
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert ckpt.tokenizer_path == REF_MODEL / "tokenizer.json"
    tok = tokenizers.Tokenizer.from_file(str(ckpt.tokenizer_path))
    text_file = SHARED / "data" / "techdocs-test" / "test.txt"
    text = text_file.read_text()[:20000] if text_file.exists() else (
        "The kernel schedules processes and manages memory. A process is an instance of a program. " * 40)
    ids = torch.tensor(tok.encode(text).ids[: 2 * 128]).view(2, 128)
    logits = model(ids)
    assert logits.shape == (2, 128, config.padded_vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # a trained model predicts its own domain far better than chance (ln 8192 = 9.0)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert nll.item() < math.log(config.vocab_size) - 2
