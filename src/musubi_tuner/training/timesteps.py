"""Flow-matching timestep sampling for training and the loss weighting.

x_t = (1 - t) * x0 + t * noise, target = noise - x0, t in [0, 1] (the model gets t).
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ..qwen_image.sampler import dynamic_mu, exponential_shift, static_shift

METHODS = ("uniform", "sigmoid", "shift", "qwen_shift", "logsnr", "sigma")
WEIGHTING = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")


def sample_t(method: str, batch: int, generator: torch.Generator, *, shift: float = 2.2, sigmoid_scale: float = 1.0,
             logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29, weighting_scheme: str = "none",
             image_seq_len: int = 4096, min_timestep: float = 0.0, max_timestep: float = 1000.0,
             num_train_timesteps: int = 1000) -> torch.Tensor:
    """(batch,) float32 flow times t in [0, 1]."""
    if method == "uniform":
        t = torch.rand(batch, generator=generator)
    elif method in ("sigmoid", "shift", "qwen_shift"):
        t = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator))
        if method == "shift":
            t = static_shift(shift, t)
        elif method == "qwen_shift":
            t = exponential_shift(dynamic_mu(image_seq_len), t)
    elif method == "logsnr":
        logsnr = logit_mean + logit_std * torch.randn(batch, generator=generator)
        t = torch.sigmoid(-logsnr / 2)
    elif method == "sigma":
        u = compute_density_for_timestep_sampling(weighting_scheme, batch, logit_mean, logit_std, mode_scale,
                                                  device="cpu", generator=generator)
        idx = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
        sigmas = static_shift(shift, torch.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps))
        t = sigmas[idx]
    else:
        raise ValueError(f"unknown timestep sampling {method!r}; choose from {', '.join(METHODS)}")
    if min_timestep > 0 or max_timestep < num_train_timesteps:
        t = t * (max_timestep - min_timestep) / num_train_timesteps + min_timestep / num_train_timesteps
    return t.float()


def loss_weight(weighting_scheme: str, t: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (1 for none / logit_normal / mode, which act through the sampling density)."""
    if weighting_scheme in ("sigma_sqrt", "cosmap"):
        return compute_loss_weighting_for_sd3(weighting_scheme, t)
    return torch.ones_like(t)
