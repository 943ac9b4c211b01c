"""The flow-matching training loss of every model family (the family lays out tokens and conditions)."""

from __future__ import annotations

import torch

from ..models.registry import family_of
from ..models.version import ModelVersion
from .timesteps import loss_weight, sample_t, stratum, timestep_options


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


def flow_matching_loss(model, batch: dict, version: ModelVersion, args, generators: list[torch.Generator],
                       device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The training loss of a batch: noise and t drawn from each sample's generator."""
    x0, _ = family_of(version).target_latents(batch, version, args)
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
    """(B,) weighted flow-matching losses at the given t and noise (training and validation share it); the family
    lays out the tokens."""
    per_sample = family_of(version).per_sample_loss(model, batch, version, args, t, noise, device, dtype)
    return per_sample * loss_weight(args.weighting_scheme, t).to(device)
