"""Plain-PyTorch Mamba-1 and Mamba-2 language models with mamba-ssm's parameter names."""

from mqtool.models.config import MambaConfig
from mqtool.models.lm import MODES, InferenceCache, MambaLMHeadModel, generate

__all__ = ["MODES", "InferenceCache", "MambaConfig", "MambaLMHeadModel", "generate"]
