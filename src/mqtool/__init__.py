"""mqtool: post-training quantization for Mamba-1 and Mamba-2 language models."""

__version__ = "0.1.0"
