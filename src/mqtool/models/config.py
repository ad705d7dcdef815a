"""The model config, in the format of mamba-ssm's `MambaConfig` (`config.json` of state-spaces checkpoints)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mqtool.errors import MqtoolError

# Keys each mixer understands, with mamba-ssm's defaults. Unknown keys are kept (so a config
# round-trips) but only these shape the model.
MAMBA1_DEFAULTS: dict[str, Any] = {
    "d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto", "dt_min": 0.001, "dt_max": 0.1,
    "dt_init_floor": 1e-4, "conv_bias": True, "bias": False,
    "bcdt_rms_eps": None,  # FalconMamba's weightless norms on dt, B, C (not a mamba-ssm key)
}
MAMBA2_DEFAULTS: dict[str, Any] = {
    "d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "d_ssm": None, "ngroups": 1,
    "A_init_range": (1, 16), "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False,
    "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4, "dt_limit": (0.0, float("inf")),
    "bias": False, "conv_bias": True, "chunk_size": 256,
}


@dataclass
class MambaConfig:
    """mamba-ssm's MambaConfig fields; `ssm_cfg["layer"]` picks Mamba1 (default) or Mamba2."""

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.layer not in ("Mamba1", "Mamba2"):
            raise MqtoolError(f"unsupported ssm_cfg.layer {self.layer!r}: expected 'Mamba1' or 'Mamba2'")
        if self.attn_layer_idx:
            raise MqtoolError("hybrid attention layers (attn_layer_idx) are not supported")
        if self.d_intermediate:
            raise MqtoolError("MLP blocks (d_intermediate > 0) are not supported")
        for name in ("d_model", "n_layer", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise MqtoolError(f"config {name} must be a positive integer, got {getattr(self, name)!r}")
        ssm = self.ssm
        if self.layer == "Mamba2":
            if ssm["d_ssm"] not in (None, self.d_inner):
                raise MqtoolError("Mamba2 with d_ssm != expand * d_model (a gated MLP branch) is not supported")
            if self.d_inner % ssm["headdim"] or self.d_inner % ssm["ngroups"]:
                raise MqtoolError("Mamba2 d_inner must be divisible by headdim and ngroups")
            if (self.d_inner // ssm["headdim"]) % ssm["ngroups"]:
                raise MqtoolError(f"Mamba2 nheads ({self.d_inner // ssm['headdim']}) must be divisible by "
                                  f"ngroups ({ssm['ngroups']})")
            if not ssm["rmsnorm"] or ssm["norm_before_gate"]:
                raise MqtoolError("Mamba2 is supported with rmsnorm=True, norm_before_gate=False (mamba-ssm defaults)")

    @property
    def layer(self) -> str:
        return self.ssm_cfg.get("layer", "Mamba1")

    @property
    def ssm(self) -> dict[str, Any]:
        """The mixer's settings: mamba-ssm defaults overlaid with ssm_cfg."""
        defaults = MAMBA2_DEFAULTS if self.layer == "Mamba2" else MAMBA1_DEFAULTS
        return {**defaults, **{k: v for k, v in self.ssm_cfg.items() if k != "layer"}}

    @property
    def d_inner(self) -> int:
        return int(self.ssm["expand"] * self.d_model)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size + (m - self.vocab_size % m) % m

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["norm_epsilon"] == 1e-5:  # mamba-ssm's MambaConfig has no such field; keep files identical
            d.pop("norm_epsilon")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MambaConfig:
        if not isinstance(d, dict) or "d_model" not in d or "n_layer" not in d:
            raise MqtoolError("config.json is not a Mamba config (needs d_model, n_layer, vocab_size, ssm_cfg)")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def load(cls, path: str | Path, d: dict[str, Any] | None = None) -> MambaConfig:
        """From config.json at `path` (or from `d`, already read from it)."""
        path = Path(path)
        d = read_json(path) if d is None else d
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise MqtoolError(f"{path} is not a valid Mamba config: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_json(path: Path) -> Any:
    """A JSON file's content, or one line saying why it cannot be read."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MqtoolError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MqtoolError(f"{path} is not valid JSON: {e}") from None


def _preset(d_model: int, n_layer: int, layer: str) -> dict[str, Any]:
    return {"d_model": d_model, "n_layer": n_layer, "vocab_size": 50277,
            "ssm_cfg": {"layer": layer} if layer == "Mamba2" else {},
            "pad_vocab_size_multiple": 16 if layer == "Mamba2" else 8}


# The shapes of the state-spaces checkpoints (for random-init models: tests, timing) plus tiny ones.
PRESETS: dict[str, dict[str, Any]] = {
    "mamba-130m": _preset(768, 24, "Mamba1"), "mamba-370m": _preset(1024, 48, "Mamba1"),
    "mamba-790m": _preset(1536, 48, "Mamba1"), "mamba-1.4b": _preset(2048, 48, "Mamba1"),
    "mamba-2.8b": _preset(2560, 64, "Mamba1"),
    "mamba2-130m": _preset(768, 24, "Mamba2"), "mamba2-370m": _preset(1024, 48, "Mamba2"),
    "mamba2-780m": _preset(1536, 48, "Mamba2"), "mamba2-1.3b": _preset(2048, 48, "Mamba2"),
    "mamba2-2.7b": _preset(2560, 64, "Mamba2"),
    "tiny-mamba1": {"d_model": 64, "n_layer": 2, "vocab_size": 50277, "ssm_cfg": {"d_state": 8}},
    "tiny-mamba2": {"d_model": 64, "n_layer": 2, "vocab_size": 50277,
                    "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 32},
                    "pad_vocab_size_multiple": 16},
}


def config_from_name(name: str) -> MambaConfig:
    """A preset shape by name (state-spaces/mamba-130m -> mamba-130m)."""
    key = name.split("/")[-1]
    if key not in PRESETS:
        raise MqtoolError(f"unknown model shape {name!r}; known: {', '.join(PRESETS)}")
    return MambaConfig.from_dict(json.loads(json.dumps(PRESETS[key])))
