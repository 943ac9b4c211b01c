"""The flow-matching training loss for every model version (one function: target, edit and layered layouts)."""

from __future__ import annotations

import torch

from ..qwen_image import latents as L
from ..qwen_image.denoise import predict_velocity
from ..qwen_image.versions import ModelVersion
from .timesteps import loss_weight, sample_t, stratum, timestep_options


def split_layered(latents: torch.Tensor, remove_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Layered caches hold composite + layers as frames; the composite is also the condition image."""
    cond = latents[:, :, :1]
    return (latents[:, :, 1:] if remove_first else latents), cond


def sample_generators(seed: int, keys) -> list[torch.Generator]:
    """One generator per sample, from the run seed and the sample's (epoch, global batch, position) key: noise and
    timesteps are then independent of how batches are split across processes or resumed."""
    out = []
    for key in keys:
        s = seed
        for k in key:
            s = (s * 1_000_003 + int(k) + 1) % (2**63)
        out.append(torch.Generator().manual_seed(s))
    return out


def target_latents(batch: dict, version: ModelVersion, args) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(x0 the model learns to denoise (B, 16, F, h, w), reference latents it is conditioned on)."""
    x0 = batch["latents"]
    refs: list[torch.Tensor] = list(batch.get("controls") or []) if version.is_edit else []
    if version.is_layered:
        x0, cond = split_layered(x0, args.remove_first_image_from_target)
        refs = [cond]
    return x0, refs


def flow_matching_loss(model, batch: dict, version: ModelVersion, args, generators: list[torch.Generator],
                       device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The training loss of a batch: noise and t drawn from each sample's generator."""
    x0, _ = target_latents(batch, version, args)
    b, _, _, h, w = x0.shape
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators])
    buckets = getattr(args, "num_timestep_buckets", None)
    ordinals = batch.get("ordinals") or [None] * b
    options = timestep_options(args, version.image_tokens(h, w))
    t = torch.cat([sample_t(args.timestep_sampling, 1, g, **options,
                            strata=[stratum(args.seed, o, buckets)] if buckets and buckets > 1 and o is not None
                            else None) for g, o in zip(generators, ordinals)])
    return per_sample_loss(model, batch, version, args, t, noise, device, dtype).mean()


def per_sample_loss(model, batch: dict, version: ModelVersion, args, t: torch.Tensor, noise: torch.Tensor,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B,) weighted flow-matching losses at the given t and noise (training and validation share it)."""
    if version.is_v21:
        return v21_per_sample_loss(model, batch, args, t, noise, device, dtype)
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
    per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2))
    return per_sample * loss_weight(args.weighting_scheme, t).to(device)


def v21_per_sample_loss(model, batch: dict, args, t: torch.Tensor, noise: torch.Tensor, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
    """Qwen-Image-2.1: the same flow-matching target (noise - x0, which its Euler sampler integrates) on unpatched
    tokens, condition images first. The DiT lays out every sample of a call by the first sample's image slots, and a
    padded prompt shifts the target's positions, so prompts of different lengths run one sample per call: each sample
    sees exactly what inference shows the model."""
    from ..qwen_image import v21

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
    return torch.cat(losses) * loss_weight(args.weighting_scheme, t).to(device)
