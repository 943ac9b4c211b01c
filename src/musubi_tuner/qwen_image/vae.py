"""The Qwen-Image VAE (diffusers `AutoencoderKLQwenImage`, a Wan-2.1-style causal 3D VAE): loading and the latent
normalisation used everywhere (cache, training, sampling)."""

from __future__ import annotations

import logging
import os

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLQwenImage
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from ..errors import UserError
from .model_files import VAE_FILE_HINT, expect, is_wan_vae_layout
from .weights import load_tensors

logger = logging.getLogger(__name__)


def infer_vae_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    base_dim, in_ch = shapes["encoder.conv_in.weight"][:2]
    z_dim = shapes["post_quant_conv.weight"][0]
    return dict(base_dim=base_dim, z_dim=z_dim, input_channels=in_ch)


def load_vae(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    expected_channels: int | None = None,
    option: str = "--vae",
) -> AutoencoderKLQwenImage:
    info = expect(path, option, "vae")
    files, wan = info.files, is_wan_vae_layout(info.shapes)
    if expected_channels is not None and info.vae_channels != expected_channels:
        raise UserError(f"{option}: {files[0]} is {info.describe()} but this model version needs {expected_channels} "
                        f"channels; pass {VAE_FILE_HINT[expected_channels]}")
    state = load_tensors(files, dtype, device)
    if wan:
        state = convert_wan_vae_to_diffusers(state)
    config = infer_vae_config({k: tuple(v.shape) for k, v in state.items()})
    cfg_json = files[0].parent / "config.json"
    if cfg_json.exists():
        import json

        extra = json.loads(cfg_json.read_text())
        for k in ("dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            if k in extra:
                config[k] = extra[k]
    with init_empty_weights():
        vae = AutoencoderKLQwenImage(**config)
    try:
        vae.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:
        raise UserError(f"{option}: {files[0]} does not match the Qwen-Image VAE layout ({str(e).splitlines()[0]})") from None
    vae.to(device)  # buffers created at init follow the weights
    vae.eval().requires_grad_(False)
    logger.info("loaded VAE %s (%s layout, %d channels)", files[0].name, "ComfyUI/Wan" if wan else "diffusers",
                config["input_channels"])
    return vae


def _stats(vae: AutoencoderKLQwenImage, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


@torch.no_grad()
def encode(vae: AutoencoderKLQwenImage, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1], (B, C, H, W) or (B, C, F, H, W) -> normalised latents (B, 16, F, H/8, W/8) (posterior mode)."""
    if pixels.ndim == 4:
        pixels = pixels.unsqueeze(2)
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    mean, std = _stats(vae, z)
    return (z - mean) / std


@torch.no_grad()
def decode(vae: AutoencoderKLQwenImage, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, 16, F, h, w) -> pixels in [-1, 1], (B, C, F, 8h, 8w)."""
    latents = latents.to(vae.device, vae.dtype)
    mean, std = _stats(vae, latents)
    return vae.decode(latents * std + mean, return_dict=False)[0].clamp(-1, 1)
