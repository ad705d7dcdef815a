"""Shared fixtures: tiny Mamba-1 / Mamba-2 configs and randomly initialised models.

Every tiny model has 2 layers, d_model 32 (d_inner 64), d_state 8, a vocabulary of 101 padded to
104 (so padded rows exist), and for Mamba-2 headdim 16 (4 heads) and chunk_size 8, so that the
odd sequence lengths used in the tests cross chunk boundaries and end mid-chunk.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

# Triton decides at import whether its kernels are compiled or interpreted: without a GPU the
# kernel tests run them interpreted, so set it here, before any test module imports mqtool.kernels
# (whichever module is collected first must not decide it)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mqtool.models import MambaConfig, MambaLMHeadModel

VOCAB = 101  # padded to 104 with pad_vocab_size_multiple 8

SSM_CFGS: dict[str, dict] = {
    "mamba1": {"layer": "Mamba1", "d_state": 8, "d_conv": 4, "expand": 2},
    "mamba2": {"layer": "Mamba2", "d_state": 8, "d_conv": 4, "expand": 2, "headdim": 16, "ngroups": 1,
               "chunk_size": 8},
    # two groups (2 heads each), D per channel, and a dt_limit that clamps on both sides
    "mamba2_g2": {"layer": "Mamba2", "d_state": 8, "d_conv": 4, "expand": 2, "headdim": 16, "ngroups": 2,
                  "chunk_size": 8, "D_has_hdim": True, "dt_limit": [0.4, 2.5]},
}


def make_config(family: str = "mamba1", d_model: int = 32, n_layer: int = 2, vocab_size: int = VOCAB,
                tie_embeddings: bool = True, **ssm) -> MambaConfig:
    return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size,
                       ssm_cfg={**SSM_CFGS[family], **ssm}, tie_embeddings=tie_embeddings)


@torch.no_grad()
def randomize_(model: MambaLMHeadModel, seed: int = 0) -> MambaLMHeadModel:
    """Non-trivial weights everywhere (norm scales, D, biases, a wide spread of decays and step
    sizes) so that every part of the model visibly shapes the output."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(t.shape, generator=g) * scale

    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            p.copy_(1.0 + rnd(p, 0.2))
        elif name.endswith("A_log"):  # A in [-4, -0.05], log-uniform: fast and slow decays
            p.copy_(torch.empty(p.shape).uniform_(math.log(0.05), math.log(4.0), generator=g))
        elif name.endswith(".D"):
            p.copy_(rnd(p))
        elif name.endswith("dt_bias") or name.endswith("dt_proj.bias"):
            p.copy_(rnd(p, 1.5) - 1.0)  # softplus spreads over ~[0.03, 3]
        elif name.endswith("conv1d.bias"):
            p.copy_(rnd(p, 0.2))
        elif name.endswith("conv1d.weight"):
            p.copy_(rnd(p, 0.5))
    return model.eval()


def make_model(config: MambaConfig, seed: int = 0) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    return randomize_(MambaLMHeadModel(config), seed)


@pytest.fixture(params=list(SSM_CFGS))
def family(request) -> str:
    """Each tiny family in turn: mamba1, mamba2 (ngroups 1), mamba2_g2 (ngroups 2, D_has_hdim, dt_limit)."""
    return request.param


@pytest.fixture
def tiny_config(family) -> MambaConfig:
    return make_config(family)


@pytest.fixture
def tiny_model(tiny_config) -> MambaLMHeadModel:
    return make_model(tiny_config)


@pytest.fixture
def config_factory():
    """`config_factory(family, **overrides)`: a tiny config (see make_config)."""
    return make_config


@pytest.fixture
def model_factory():
    """`model_factory(config, seed=0)`: a randomly initialised tiny model in eval mode."""
    return make_model


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-tensor tests: faster than two, and far faster when
    the two cores are shared (spinning thread pools). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
