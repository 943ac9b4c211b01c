"""Qwen-Image's training-loss layout: 2x2-patched tokens, edit references and the layered composite as conditions."""

from __future__ import annotations

import torch

from ..models.version import ModelVersion
from . import latents as L
from .denoise import predict_velocity
from .versions import is_edit, is_layered


def split_layered(latents: torch.Tensor, remove_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Layered caches hold composite + layers as frames; the composite is also the condition image."""
    cond = latents[:, :, :1]
    return (latents[:, :, 1:] if remove_first else latents), cond


def target_latents(batch: dict, version: ModelVersion, args) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(x0 the model learns to denoise (B, 16, F, h, w), reference latents it is conditioned on)."""
    x0 = batch["latents"]
    refs: list[torch.Tensor] = list(batch.get("controls") or []) if is_edit(version) else []
    if is_layered(version):
        x0, cond = split_layered(x0, args.remove_first_image_from_target)
        refs = [cond]
    return x0, refs


def per_sample_loss(model, batch: dict, version: ModelVersion, args, t: torch.Tensor, noise: torch.Tensor,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B,) unweighted flow-matching losses at the given t and noise."""
    x0, refs = target_latents(batch, version, args)
    b, _, frames, h, w = x0.shape
    tt = t.view(b, 1, 1, 1, 1)
    noisy = L.pack((1 - tt) * x0 + tt * noise).to(device)
    target = L.pack(noise - x0).to(device)
    img_shapes = [(1, h // 2, w // 2)] * frames + [(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in refs]
    reference = torch.cat([L.pack(r) for r in refs], dim=1).to(device) if refs else None
    extra = torch.zeros(b, dtype=torch.long, device=device) if version.additional_t_cond else None
    mask = batch["text_mask"].to(device) if batch.get("text_mask") is not None else None
    pred = predict_velocity(model, noisy.to(dtype), t.to(device), batch["text"].to(device, dtype), mask, img_shapes,
                            reference.to(dtype) if reference is not None else None, extra)
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2))
