"""Latent geometry: 2x2 patch packing, image <-> latent sizes, initial noise with the reference convention."""

from __future__ import annotations

import torch

from ..errors import UserError

VAE_SCALE = 8
PATCH = 2
LATENT_CHANNELS = 16


def check_image_size(height: int, width: int, option: str = "--image_size") -> None:
    m = VAE_SCALE * PATCH
    if height <= 0 or width <= 0 or height % m or width % m:
        raise UserError(
            f"{option} {height} {width}: height and width must be positive multiples of {m}; "
            f"try {max(m, round(height / m) * m)} {max(m, round(width / m) * m)}"
        )


def latent_hw(height: int, width: int) -> tuple[int, int]:
    return height // VAE_SCALE, width // VAE_SCALE


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F*H/2*W/2, 4C): 2x2 patches, frame-major (F=1 for ordinary images)."""
    b, c, f, h, w = latents.shape
    x = latents.view(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, f * (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int, frames: int = 1) -> torch.Tensor:
    """(B, F*H/2*W/2, 4C) -> (B, C, F, H, W) where H, W are latent sizes."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, frames, height // 2, width // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
    return x.reshape(b, c, frames, height, width)


def initial_noise(seed: int, latent_h: int, latent_w: int, frames: int = 1, channels: int = LATENT_CHANNELS) -> torch.Tensor:
    """Reference convention: CPU generator seeded with `seed`, randn (1, C, F, H, W) in float32 (frame axis after
    channel for our pack), identical to the pipeline's (1, F, C, H, W) draw when F == 1."""
    g = torch.Generator("cpu").manual_seed(seed)
    if frames == 1:
        return torch.randn((1, 1, channels, latent_h, latent_w), generator=g, dtype=torch.float32).transpose(1, 2)
    return torch.randn((1, frames, channels, latent_h, latent_w), generator=g, dtype=torch.float32).transpose(1, 2)
