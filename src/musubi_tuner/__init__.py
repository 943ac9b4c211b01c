"""Training and inference for the Qwen-Image family of diffusion models."""

__version__ = "0.1.0"
