"""Qwen-Image-2.1's training-loss layout."""

from __future__ import annotations

import torch

from . import modeling as v21


def per_sample_loss(model, batch: dict, args, t: torch.Tensor, noise: torch.Tensor, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """(B,) unweighted losses: the same flow-matching target (noise - x0, which its Euler sampler integrates) on
    unpatched tokens, condition images first. The DiT lays out every sample of a call by the first sample's image
    slots, and a padded prompt shifts the target's positions, so prompts of different lengths run one sample per call:
    each sample sees exactly what inference shows the model."""
    x0, controls = batch["latents"], list(batch.get("controls") or [])
    b, _, _, h, w = x0.shape
    tt = t.view(b, 1, 1, 1, 1)
    noisy = v21.pack((1 - tt) * x0 + tt * noise).to(device, dtype)
    target = v21.pack(noise - x0).to(device)
    shapes = [(1, c.shape[-2], c.shape[-1]) for c in controls] + [(1, h, w)]
    condition = torch.cat([v21.pack(c) for c in controls], dim=1).to(device, dtype) if controls else None
    text, slots = batch["text"].to(device, dtype), batch["image_slots"]
    img_mask = v21.slot_mask(slots, h * w).to(device)
    lengths = (batch["text_mask"].sum(1).tolist() if batch.get("text_mask") is not None else [text.shape[1]] * b)
    groups = [list(range(b))] if len(set(lengths)) == 1 else [[i] for i in range(b)]
    losses = []
    for idx in groups:  # in sample order: one group of all, or one per sample
        n = int(lengths[idx[0]])
        keep = torch.cat([torch.arange(n), torch.arange(text.shape[1], img_mask.shape[1])]).to(device)
        pred = v21.predict_velocity(model, noisy[idx], t[idx].to(device), text[idx, :n], None, img_mask[idx][:, keep],
                                    shapes, condition[idx] if condition is not None else None)
        losses.append(torch.nn.functional.mse_loss(pred.float(), target[idx].float(), reduction="none").mean(dim=(1, 2)))
    return torch.cat(losses)
