"""Flow-matching timestep sampling for training and the loss weighting.

x_t = (1 - t) * x0 + t * noise, target = noise - x0, t in [0, 1] (the model gets t).

Every method draws from its distribution either directly or, with --num_timestep_buckets, through the inverse CDF of a
stratified uniform value (each sample's stratum comes from its position in the run, so strata cycle evenly); min/max
timesteps either rescale [0, 1] or, with --preserve_distribution_shape, reject samples outside the range.
"""

from __future__ import annotations

import math
import random

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ..qwen_image.sampler import dynamic_mu, exponential_shift, static_shift

METHODS = ("uniform", "sigmoid", "shift", "qwen_shift", "flux_shift", "flux2_shift", "krea2_shift", "ideogram4_shift",
           "qinglong_qwen", "qinglong_flux", "logsnr", "sigma")
WEIGHTING = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
QINGLONG_LOGSNR = (5.36, 1.0)  # the low-noise branch of the qinglong mixtures
# qinglong: (share of the resolution-shifted sigmoid, share of logsnr(logit_mean, logit_std)); the rest is low-noise
QINGLONG_SHARES = {"qinglong_qwen": (0.95, 0.0), "qinglong_flux": (0.79, 0.11)}


def lin(x: float, x1: float, y1: float, x2: float, y2: float) -> float:
    """The line through (x1, y1) and (x2, y2) at x (musubi-tuner's get_lin_function)."""
    return (y2 - y1) / (x2 - x1) * (x - x1) + y1


def shift_mu(method: str, image_seq_len: int) -> float:
    """mu of the resolution-dependent shifts, from the packed token count (latent h * w / 4), as musubi-tuner."""
    if method in ("qwen_shift", "qinglong_qwen"):
        return dynamic_mu(image_seq_len)
    if method in ("flux_shift", "qinglong_flux"):
        return lin(image_seq_len, 256, 0.5, 4096, 1.15)
    if method == "flux2_shift":  # musubi-tuner counts the unpacked latent h * w here
        return lin(4 * image_seq_len, 256, 0.5, 4096, 1.15)
    if method == "krea2_shift":
        return lin(image_seq_len, 256, 0.5, 6400, 1.15)
    raise ValueError(method)


def ideogram4_t(z: torch.Tensor, image_seq_len: int) -> torch.Tensor:
    """Ideogram 4's resolution-aware logit-normal: sigmoid(0.5 log(pixels / 512^2) + 1.5 z), clamped; musubi-tuner
    counts pixels as latent h * w * 16^2."""
    pixels = 4 * image_seq_len * 16 * 16
    t = torch.sigmoid(0.5 * math.log(pixels / (512 * 512)) + 1.5 * z.double())
    lo, hi = 1.0 / (1 + math.exp(9.0)), 1.0 / (1 + math.exp(-7.5))
    return t.clamp(1.0 - hi, 1.0 - lo).float()


def _normal(n: int, generator: torch.Generator, u: torch.Tensor | None) -> torch.Tensor:
    """Standard normal samples, or the normal quantiles of the uniform values u."""
    if u is None:
        return torch.randn(n, generator=generator)
    return math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(1e-7, 1 - 1e-7) - 1.0)


def _draw(method: str, n: int, generator: torch.Generator, u: torch.Tensor | None, *, shift: float,
          sigmoid_scale: float, logit_mean: float, logit_std: float, mode_scale: float, weighting_scheme: str,
          image_seq_len: int, num_train_timesteps: int) -> torch.Tensor:
    if method == "uniform":
        return torch.rand(n, generator=generator) if u is None else u
    if method == "ideogram4_shift":
        return ideogram4_t(_normal(n, generator, u), image_seq_len)
    if method in ("sigmoid", "shift") or method.endswith("_shift"):
        t = torch.sigmoid(sigmoid_scale * _normal(n, generator, u))
        if method == "shift":
            t = static_shift(shift, t)
        elif method != "sigmoid":
            t = exponential_shift(shift_mu(method, image_seq_len), t)
        return t
    if method in QINGLONG_SHARES:
        mid_share, logsnr_share = QINGLONG_SHARES[method]
        pick = torch.rand(n, generator=generator)
        z = _normal(n, generator, u)
        t_mid = exponential_shift(shift_mu(method, image_seq_len), torch.sigmoid(sigmoid_scale * z))
        t_logsnr = torch.sigmoid(-(logit_mean + logit_std * z) / 2)
        mean, std = QINGLONG_LOGSNR
        t_low = torch.sigmoid(-(mean + std * z) / 2)
        return torch.where(pick < mid_share, t_mid, torch.where(pick < mid_share + logsnr_share, t_logsnr, t_low))
    if method == "logsnr":
        return torch.sigmoid(-(logit_mean + logit_std * _normal(n, generator, u)) / 2)
    if method == "sigma":
        dens = compute_density_for_timestep_sampling(weighting_scheme, n, logit_mean, logit_std, mode_scale,
                                                     device="cpu", generator=generator)
        idx = (dens * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
        return static_shift(shift, torch.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps))[idx]
    raise ValueError(f"unknown timestep sampling {method!r}; choose from {', '.join(METHODS)}")


def sample_t(method: str, batch: int, generator: torch.Generator, *, shift: float = 2.2, sigmoid_scale: float = 1.0,
             logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29, weighting_scheme: str = "none",
             image_seq_len: int = 4096, min_timestep: float = 0.0, max_timestep: float = 1000.0,
             num_train_timesteps: int = 1000, strata: list[tuple[int, int]] | None = None,
             preserve_distribution_shape: bool = False) -> torch.Tensor:
    """(batch,) float32 flow times t in [0, 1].

    strata: one (stratum, number of strata) per sample: its uniform value is drawn inside that stratum
    (--num_timestep_buckets; not for `sigma`). preserve_distribution_shape: keep [min, max] by rejection (up to 1000
    rounds) instead of rescaling [0, 1] onto it."""
    kw = dict(shift=shift, sigmoid_scale=sigmoid_scale, logit_mean=logit_mean, logit_std=logit_std,
              mode_scale=mode_scale, weighting_scheme=weighting_scheme, image_seq_len=image_seq_len,
              num_train_timesteps=num_train_timesteps)

    def uniform() -> torch.Tensor | None:
        if strata is None or method == "sigma":
            return None
        r = torch.rand(batch, generator=generator)
        return torch.tensor([(k + float(x)) / n for (k, n), x in zip(strata, r)])

    lo, hi = min_timestep / num_train_timesteps, max_timestep / num_train_timesteps
    limited = min_timestep > 0 or max_timestep < num_train_timesteps
    if preserve_distribution_shape and limited and method != "sigma":
        t = torch.full((batch,), float("nan"))
        for _ in range(1000):
            fresh = _draw(method, batch, generator, uniform(), **kw)
            take = torch.isnan(t) & (fresh >= lo) & (fresh <= hi)
            t[take] = fresh[take]
            if not torch.isnan(t).any():
                return t.float()
        # the range is (almost) impossible under this distribution: fall back to rescaling, as musubi-tuner does
        return (_draw(method, batch, generator, uniform(), **kw) * (hi - lo) + lo).float()
    t = _draw(method, batch, generator, uniform(), **kw)
    if limited:
        t = t * (hi - lo) + lo
    return t.float()


def stratum(seed: int, ordinal: int, buckets: int) -> tuple[int, int]:
    """The stratum of the ordinal-th sample of a run: every run of `buckets` consecutive samples visits each stratum
    once, in an order shuffled per cycle (seeded, so resumed and multi-process runs agree)."""
    cycle, pos = divmod(ordinal, buckets)
    order = list(range(buckets))
    random.Random(seed * 1_000_003 + cycle).shuffle(order)
    return order[pos], buckets


def loss_weight(weighting_scheme: str, t: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (1 for none / logit_normal / mode, which act through the sampling density)."""
    if weighting_scheme in ("sigma_sqrt", "cosmap"):
        return compute_loss_weighting_for_sd3(weighting_scheme, t)
    return torch.ones_like(t)


def timestep_options(args, image_seq_len: int) -> dict:
    """sample_t's keyword arguments from the training options."""
    return dict(shift=args.discrete_flow_shift, sigmoid_scale=args.sigmoid_scale, logit_mean=args.logit_mean,
                logit_std=args.logit_std, mode_scale=args.mode_scale, weighting_scheme=args.weighting_scheme,
                image_seq_len=image_seq_len, min_timestep=args.min_timestep, max_timestep=args.max_timestep,
                preserve_distribution_shape=getattr(args, "preserve_distribution_shape", False))


def show_timesteps(args, mode: str, out_dir) -> str:
    """--show_timesteps console|image: the distribution of t (and of the loss weight) these options give at the
    resolution of the dataset config (1024x1024 without one; it matters for the resolution-dependent modes), 100k
    samples, as text or a PNG; training does not start."""
    from pathlib import Path

    n = 100_000
    width, height = 1024, 1024
    if getattr(args, "dataset_config", None):
        from ..dataset.config import load_dataset_config

        width, height = load_dataset_config(args.dataset_config)[0].resolution
    size = f"{width}x{height}"
    g = torch.Generator().manual_seed(args.seed)
    buckets = getattr(args, "num_timestep_buckets", None)
    strata = [stratum(args.seed, i, buckets) for i in range(n)] if buckets and buckets > 1 else None
    t = sample_t(args.timestep_sampling, n, g, strata=strata,
                 **timestep_options(args, (width // 16) * (height // 16)))
    counts = torch.histc(t, bins=40, min=0.0, max=1.0)
    centres = (torch.arange(40) + 0.5) / 40
    weights = loss_weight(args.weighting_scheme, centres)
    if mode == "console":
        top = float(counts.max())
        lines = [f"timesteps ({args.timestep_sampling}, {size}, {n} samples; t x 1000, 25 per line):"]
        for i, (c, w) in enumerate(zip(counts.tolist(), weights.tolist())):
            lines.append(f"{i * 25:4d}-{i * 25 + 24:4d} {'#' * int(round(50 * c / top)):<50} {int(c):6d}  w={w:.3f}")
        text = "\n".join(lines)
        print(text)
        return text
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (840, 320), "white")
    d = ImageDraw.Draw(img)
    top = float(counts.max())
    for i, c in enumerate(counts.tolist()):
        h = int(260 * c / top)
        d.rectangle((20 + i * 20, 290 - h, 36 + i * 20, 290), fill=(60, 90, 200))
    d.text((20, 8), f"sampled timesteps: {args.timestep_sampling} at {size} (0 .. 1000), {n} samples", fill="black")
    path = Path(out_dir) / "timesteps.png"
    from ..fileio import save_image

    save_image(img, path)
    print(f"timestep histogram written to {path}")
    return str(path)
