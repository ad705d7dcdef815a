"""Checkpoint directories, the contract between stages.

A checkpoint is a directory with `config.json` (mamba-ssm MambaConfig), `model.safetensors` (or
shards with `model.safetensors.index.json`; `pytorch_model.bin` is read too), `mqtool.json` (the
manifest: where it came from, every stage applied, quantization spec, online transforms) and an
optional `tokenizer.json`. Writes are atomic (mqtool.atomic: a temporary directory, then a rename or
a swap); a stage never modifies its input.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mqtool import __version__, hf_layout, model_card
from mqtool.atomic import interrupted_copy, leftover_of, sweep, write_dir_atomic
from mqtool.errors import MqtoolError
from mqtool.models import MambaConfig, MambaLMHeadModel

FORMAT_VERSION = 1
MANIFEST = "mqtool.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
DEFAULT_SHARD_BYTES = 4 * 1024**3
# A tensor in the weights of a checkpoint with online transforms (their names, as JSON bytes): the
# tensors alone are then a different model, and must not load as a plain one when mqtool.json is lost.
TRANSFORMED = "mqtool.online_transforms"
# What a manifest's history may hold: the stages (pipeline.STAGES), export, and the demo model's training
KNOWN_STAGES = ("train", "rotate", "smooth", "quantize", "quantize-states", "reconstruct", "export")
_KIND_NAMES = {str: "a string", list: "a list", dict: "a mapping", bool: "true or false"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Manifest:
    """What `mqtool.json` holds. `stages` is the history; `quant` maps tensor or module names to
    their quantization spec; `online` lists what inference must apply at run time. `layout` is the
    on-disk layout the checkpoint came in and goes out in ("state-spaces" or "hf", with the HF
    config.json it came with in `hf_config`; see hf_layout)."""

    source: str = ""
    stages: list[dict[str, Any]] = field(default_factory=list)
    quant: dict[str, Any] = field(default_factory=dict)
    online: dict[str, Any] = field(default_factory=dict)
    exported: bool = False
    format_version: int = FORMAT_VERSION
    layout: str = hf_layout.STATE_SPACES
    hf_config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "mqtool", "format_version": self.format_version, "mqtool_version": __version__,
                "source": self.source, "exported": self.exported, "stages": self.stages,
                "quant": self.quant, "online": self.online, "layout": self.layout,
                **({"hf_config": self.hf_config} if self.hf_config else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Checks every field (a malformed manifest is one line, not a traceback later)."""
        if not isinstance(d, dict) or d.get("format") != "mqtool":
            raise MqtoolError("mqtool.json is not an mqtool manifest")
        version = d.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise MqtoolError(f"mqtool.json: format_version must be an integer from 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise MqtoolError(f"mqtool.json has format version {version}; this mqtool reads "
                              f"up to {FORMAT_VERSION}: upgrade mqtool")
        for key, kind in (("source", str), ("stages", list), ("quant", dict), ("online", dict), ("exported", bool)):
            if key in d and not isinstance(d[key], kind):
                raise MqtoolError(f"mqtool.json: {key!r} must be {_KIND_NAMES[kind]}, got {type(d[key]).__name__}")
        stages = list(d.get("stages", []))
        for i, entry in enumerate(stages):
            name = entry.get("stage") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                raise MqtoolError(f"mqtool.json: stage entry {i + 1} has no 'stage' name")
            if name not in KNOWN_STAGES:
                raise MqtoolError(f"mqtool.json: stage entry {i + 1} is {name!r}, unknown to this mqtool "
                                  f"(known: {', '.join(KNOWN_STAGES)}): made by a newer mqtool?")
            if not isinstance(entry.get("params", {}), dict):
                raise MqtoolError(f"mqtool.json: stage entry {i + 1} ({name}): 'params' must be a mapping")
        online = dict(d.get("online", {}))
        for key, spec in online.items():
            if not isinstance(spec, dict):
                raise MqtoolError(f"mqtool.json: online transform {key!r} must be a mapping, got {type(spec).__name__}")
        return cls(source=d.get("source", ""), stages=stages, quant=dict(d.get("quant", {})),
                   online=online, exported=d.get("exported", False), format_version=version,
                   layout=d.get("layout", hf_layout.STATE_SPACES), hf_config=dict(d.get("hf_config", {})))

    def stage_names(self) -> list[str]:
        return [s["stage"] for s in self.stages]


@dataclass
class Checkpoint:
    path: Path
    config: MambaConfig
    manifest: Manifest
    state_dict: dict[str, torch.Tensor]
    tokenizer_path: Path | None

    @property
    def input_hash(self) -> str:
        return checkpoint_hash(self.path)


def resolve(spec: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id downloaded with huggingface-hub:
    at `revision` (a branch, tag or commit; also written `owner/name@revision`), with `token` for a
    private or gated repo (default: huggingface-hub's own, $HF_TOKEN or the saved login)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MqtoolError(f"{path} is a file; expected a checkpoint directory")
        owner = leftover_of(path)
        if owner is not None:  # possibly half written: an interrupted run leaves nothing a stage accepts
            raise MqtoolError(f"{path} is what an interrupted write of {path.parent / owner} left behind, not a "
                              f"checkpoint (the next write of {owner} sweeps or restores it)")
        return path
    s = str(spec)
    if "@" in s and _REPO_ID.match(s.split("@", 1)[0]):
        s, at = s.split("@", 1)
        if revision is not None and revision != at:
            raise MqtoolError(f"{spec} names revision {at!r}, and --revision says {revision!r}: give one")
        revision = at or None
    if not _REPO_ID.match(s) or s.startswith((".", "/", "~")):
        hidden = interrupted_copy(path)
        if hidden is not None:
            raise MqtoolError(f"{spec}: no such directory; a killed --force replace left the previous copy "
                              f"at {hidden} (the next write to {path} restores it, or rename it back)")
        raise MqtoolError(f"{spec}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "*.safetensors", WEIGHTS_INDEX, TORCH_WEIGHTS, "tokenizer.json", MANIFEST]
        return Path(snapshot_download(s, revision=revision, token=token, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo or revision, auth: all mean the same to the user
        at = f" at revision {revision}" if revision else ""
        raise MqtoolError(f"{spec}: not a local directory, and downloading it{at} from the Hugging Face hub "
                          f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _load_aligned(file: Path) -> dict[str, torch.Tensor]:
    """safetensors >= 0.8 hands back zero-copy tensors at the file's (unaligned) offsets, and a
    kernel may then round differently than on fresh memory: a reloaded model must compute bit for
    bit what the saved one did, so every tensor gets memory of its own."""
    return {k: v.clone() for k, v in load_file(file).items()}


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if (path / WEIGHTS).exists():
            return _load_aligned(path / WEIGHTS)
        if (path / WEIGHTS_INDEX).exists():
            index = json.loads((path / WEIGHTS_INDEX).read_text())
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(_load_aligned(path / shard))
            return state
        if (path / TORCH_WEIGHTS).exists():
            return torch.load(path / TORCH_WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # torch's message is a page of advice to unpickle it unsafely
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise MqtoolError(f"{path}: {TORCH_WEIGHTS} holds more than tensors"
                          + (f" ({found.group(1)})" if found else "")
                          + "; mqtool loads it only as plain tensors (weights_only): save it as safetensors") from None
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, EOFError, json.JSONDecodeError) as e:
        raise MqtoolError(f"{path}: cannot read the weights ({type(e).__name__}: {e}); "
                          "the file may be truncated or corrupt") from None
    raise MqtoolError(f"{path}: no weights ({WEIGHTS}, {WEIGHTS_INDEX} or {TORCH_WEIGHTS})")


def load_checkpoint(spec: str | Path, revision: str | None = None, token: str | None = None) -> Checkpoint:
    """Reads config, manifest and raw tensors (no model is built); `revision`, `token`: see resolve."""
    path = resolve(spec, revision, token)
    config, hf_config = hf_layout.load_config(path / "config.json")
    manifest = Manifest(source=str(spec) + (f"@{revision}" if revision and "@" not in str(spec) else ""))
    if (path / MANIFEST).exists():
        try:
            manifest = Manifest.from_dict(json.loads((path / MANIFEST).read_text()))
        except json.JSONDecodeError as e:
            raise MqtoolError(f"{path / MANIFEST} is not valid JSON: {e}") from None
    state = _load_weights(path)
    if hf_config is not None:  # the directory's config.json says the layout, whatever the manifest says
        manifest.layout, manifest.hf_config, state = hf_layout.HF, hf_config, hf_layout.state_from_hf(state)
        qconfig = manifest.hf_config.pop("quantization_config", None)
        if isinstance(qconfig, dict) and qconfig.get("quant_method") == "compressed-tensors":
            from mqtool.quant.ct_export import read_compressed  # a vLLM export: dequantized, evaluable

            state, online = read_compressed(state, qconfig)
            manifest.online = {**manifest.online, **online}
    tok = path / "tokenizer.json"
    check_finite(state, f"{path}: weight")
    _check_layer_count(path, config, state)
    _check_transforms(path, config, state, manifest if (path / MANIFEST).exists() else None)
    return Checkpoint(path, config, manifest, state, tok if tok.exists() else None)


_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")


def _check_layer_count(path: Path, config: MambaConfig, state: dict[str, torch.Tensor]) -> None:
    """config.json's n_layer against the layers the weights hold, before any model is built (an
    absurd n_layer would otherwise spend minutes building layers only to fail the shape check)."""
    layers = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    held = len({i for i in layers if i < config.n_layer})
    if held < config.n_layer:  # (layers beyond n_layer are build_model's "unexpected tensors")
        raise MqtoolError(f"weights do not match config.json: it says n_layer={config.n_layer}, "
                          f"the weights hold {held} of those layers")


def mark_transformed(state: dict[str, torch.Tensor], online: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`state` plus the TRANSFORMED tensor when `online` names any transform."""
    if not online:
        return state
    return {**state, TRANSFORMED: torch.tensor(list(json.dumps(sorted(online)).encode()), dtype=torch.uint8)}


def _check_transforms(path: Path, config: MambaConfig, state: dict[str, torch.Tensor],
                      manifest: Manifest | None) -> None:
    """Tensors that say the checkpoint was transformed must come with the manifest that says how
    (pops the TRANSFORMED tensor: nothing after loading sees it)."""
    marker = state.pop(TRANSFORMED, None)
    said: list[str] = []
    if marker is not None:
        try:
            said = json.loads(bytes(marker.to(torch.uint8).tolist()).decode())
        except (ValueError, TypeError):
            said = ["?"]
    if manifest is None:
        if said:
            raise MqtoolError(f"{path}: tensor {TRANSFORMED} says the model was transformed "
                              f"({', '.join(map(str, said))}) but there is no {MANIFEST}: restore it "
                              "(without it this is a different model)")
        with torch.device("meta"):
            plain = set(MambaLMHeadModel(config).state_dict())
        extra = sorted(set(state) - plain)
        if extra:
            raise MqtoolError(f"{path}: tensor {extra[0]} is not part of a plain model (written by an mqtool stage?) "
                              f"and there is no {MANIFEST} to say what it is")
    elif marker is not None and sorted(said) != sorted(manifest.online):
        raise MqtoolError(f"{path}: tensor {TRANSFORMED} says the model was transformed ({', '.join(map(str, said))}), "
                          f"but {MANIFEST} records {', '.join(sorted(manifest.online)) or 'no online transforms'}")


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuses NaN or Inf in any float tensor, naming the first one: a NaN weight would otherwise
    give a `nan` perplexity with exit 0, and RTN would spread it over its row (one scale)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t)
            kinds = " and ".join(k for k, m in (("NaN", torch.isnan(t)), ("Inf", torch.isinf(t))) if bool(m.any()))
            raise MqtoolError(f"{what} {name} holds {int(bad.sum())} {kinds} value(s) (first at index "
                              f"{tuple(int(i) for i in bad.nonzero()[0])}); it cannot be used")


def build_model(config: MambaConfig, state_dict: dict[str, torch.Tensor] | None = None,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                online: dict[str, Any] | None = None) -> MambaLMHeadModel:
    """A model from a config, with weights when given (built on the meta device, so a large model
    is not initialised only to be overwritten), and the manifest's online transforms attached
    (their scales are read from the same state dict). Without weights: random init."""
    if state_dict is None:
        model = MambaLMHeadModel(config).to(device=device, dtype=dtype)
        return _attach(model, online or {})
    with torch.device("meta"):
        model = MambaLMHeadModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = dict(state_dict)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the one copy
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise MqtoolError(f"weights do not match config.json: missing {len(missing)} tensors "
                          f"(e.g. {', '.join(missing[:3])})")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise MqtoolError(f"weights do not match config.json: {k} has shape {tuple(state[k].shape)}, "
                              f"expected {tuple(shape)}")
    base = {k: state.pop(k).to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(base, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    _attach(model, online or {})
    # what is left are the attached modules' buffers (scales): exactly those, no more, no less
    attached = set(model.state_dict()) - set(expected) - {"lm_head.weight"}
    if set(state) != attached:
        extra = sorted(set(state) - attached)
        lacking = sorted(attached - set(state))
        raise MqtoolError("weights do not match config.json and mqtool.json: "
                          + (f"unexpected {len(extra)} tensors (e.g. {', '.join(extra[:3])})" if extra else "")
                          + ("; " if extra and lacking else "")
                          + (f"missing {len(lacking)} tensors (e.g. {', '.join(lacking[:3])})" if lacking else ""))
    if state:
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    return model.eval()


def _attach(model: MambaLMHeadModel, online: dict[str, Any]) -> MambaLMHeadModel:
    """apply_online, with a malformed entry (a missing key, a wrong type) as one line."""
    from mqtool.quant.attach import apply_online

    try:
        return apply_online(model, online)
    except MqtoolError as e:
        raise MqtoolError(f"mqtool.json: online transforms: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MqtoolError(f"mqtool.json: malformed online transforms ({type(e).__name__}: {e})") from None


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               revision: str | None = None, token: str | None = None) -> tuple[MambaLMHeadModel, Checkpoint]:
    ckpt = load_checkpoint(spec, revision, token)
    state = ckpt.state_dict
    if ckpt.manifest.exported:  # packed codes + scales -> the simulated weights they encode
        from mqtool.quant.export import import_state_dict

        state = import_state_dict(state, ckpt.manifest.quant.get("weights", {}))
    model = build_model(ckpt.config, state, dtype, device, ckpt.manifest.online)
    if dtype != torch.float32 and not ckpt.manifest.exported:
        _keep_quantized(model, state, ckpt.manifest)
    return model, ckpt


def _keep_quantized(model: MambaLMHeadModel, state: dict[str, torch.Tensor], manifest: Manifest) -> None:
    """In bf16/fp16 the quantized weights keep their codes, so that a later stage saves them exactly."""
    if "quantize" not in manifest.stage_names():
        return
    from mqtool.pipeline import weight_specs
    from mqtool.quant.weights import keep_codes

    for name, spec in weight_specs(manifest.stages).items():
        w = state.get(name)
        if w is not None and w.dtype == torch.float32 and name.endswith(".weight"):
            lin = model.get_submodule(name[: -len(".weight")])
            # on the model's device: a GPU finds the codes of a large model in moments
            keep_codes(lin, w.to(lin.weight.device), spec["bits"], spec.get("group_size"))


def model_state_dict(model: MambaLMHeadModel, online: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """What goes into model.safetensors: the tied lm_head is not stored (as state-spaces does); a
    quantized weight of a bf16/fp16 model is stored as its exact float32 value (``q * scale``, which
    the compute dtype rounds), so that export recovers its codes; with `online` transforms (the
    manifest's), the TRANSFORMED tensor that names them."""
    from mqtool.quant.weights import exact_weight

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        w = exact_weight(module)
        if w is not None:
            state[f"{name}.weight"] = w.contiguous()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return mark_transformed(state, online or {})


def checkpoint_hash(path: Path) -> str:
    """sha256 over config, manifest and weight files: what a stage records as its input."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".json", ".bin")) and name != "tokenizer.json":
            with open(path / name, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()[:16]


def is_mqtool_output(path: Path) -> bool:
    """A directory mqtool writes: a checkpoint (mqtool.json, or config.json with weights) or a calibration."""
    names = set(os.listdir(path))
    return (MANIFEST in names or ("config.json" in names and bool(names & {WEIGHTS, WEIGHTS_INDEX}))
            or {"calib.json", "stats.safetensors"} <= names)


def paths_overlap(a: Path, b: Path) -> bool:
    """Whether a equals b, contains it or lies inside it."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_output_dir(out: str | Path, force: bool, inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """Fails early (before any work) when `out` exists without --force, is not something mqtool wrote,
    overlaps an input (equals, contains or lies inside one), or cannot be created."""
    out = Path(out).expanduser()
    for i in inputs:
        if i is not None and Path(i).exists() and paths_overlap(out, Path(i)):
            raise MqtoolError(f"{out} overlaps this stage's input {i}; a stage never modifies its input")
    restored = sweep(out)  # what a killed earlier write to `out` left beside it
    if out.exists() and not out.is_dir():
        raise MqtoolError(f"{out} exists and is not a directory")
    if out.exists() and not force:
        note = f" (restored from {restored.name}, left by a killed --force replace)" if restored else ""
        raise MqtoolError(f"{out} exists{note}; pass --force to overwrite it")
    if out.exists() and any(out.iterdir()) and not is_mqtool_output(out):  # an empty one loses nothing
        raise MqtoolError(f"{out} is not an mqtool checkpoint; --force replaces only a directory mqtool wrote")
    _check_creatable(out)
    return out


def _check_creatable(out: Path) -> None:
    """`out` can be made (with its missing parents): its nearest existing ancestor is a writable directory."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MqtoolError(f"cannot create {out}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MqtoolError(f"cannot create {out}: {parent} is not writable")


def check_output_file(out: str | Path, what: str) -> Path:
    """Fails early (before any work) when a report file (`what`: the option) cannot be written at
    `out`; the caller creates missing parents when it writes (:func:`prepare_output_file`)."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise MqtoolError(f"{what} {out} is a directory; give a file name")
    if not out.exists():
        _check_creatable(out)
    elif not os.access(out, os.W_OK):
        raise MqtoolError(f"{what} {out} is not writable")
    return out


def prepare_output_file(out: Path) -> Path:
    """`out` with its missing parent directories made."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def check_state_dir(sdir: Path) -> None:
    """A directory a stage keeps its progress in: an existing directory, or one that can be made."""
    if sdir.exists() and not sdir.is_dir():
        raise MqtoolError(f"--state-dir {sdir} is a file; give a directory")
    if not sdir.exists():
        _check_creatable(sdir)


def _save_sharded(state: dict[str, torch.Tensor], tmp: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(shards[0], tmp / WEIGHTS, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=1))


def save_checkpoint(out: str | Path, config: MambaConfig, state: dict[str, torch.Tensor], manifest: Manifest,
                    tokenizer_path: Path | None = None, force: bool = False,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, perplexity: dict[str, float] | None = None) -> Path:
    """Writes a checkpoint directory atomically (see mqtool.atomic): a kill at any instant leaves
    either the complete new checkpoint or the previous one; an existing `out` is replaced only with force.
    The config and tensor names are written in the manifest's layout (state-spaces or Hugging Face);
    a model card (README.md, mqtool.model_card) with `perplexity` (task -> value) where the caller measured it."""

    def fill(tmp: Path) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        emb = tensors.get("backbone.embedding.weight")
        hf_layout.write_config(tmp / "config.json", config, manifest.layout, manifest.hf_config,
                               None if emb is None else emb.dtype)
        _save_sharded(hf_layout.state_to_hf(tensors) if manifest.layout == hf_layout.HF else tensors, tmp,
                      max_shard_bytes)
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        (tmp / model_card.README).write_text(model_card.render(config, manifest, perplexity))

    return write_dir_atomic(Path(out).expanduser(), fill, replace=force)


def record_stage(manifest: Manifest, stage: str, params: dict[str, Any], input_hash: str) -> Manifest:
    """A copy of the manifest with one more stage in its history."""
    new = Manifest.from_dict(manifest.to_dict())
    new.stages.append({"stage": stage, "params": params, "input_hash": input_hash,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mqtool_version": __version__})
    return new
