"""Training the nano VAEs (diffusers' AutoencoderKLQwenImage, RGB and RGBA) on the shapes world.

The Qwen-Image VAE is a causal 3D VAE; for single images every causal convolution sees its frame only through the
last temporal slice of its kernel (the earlier slices meet the zero padding). `single_frame_convolutions` runs those
convolutions as 2D ones on that slice: exactly the same numbers, a third of the work, so the VAE trains on a CPU in
minutes. The trained weights are the plain 3D model's (the unused slices stay as initialised and multiply zeros).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qvae

from ..dataset.synthetic import PALETTE, random_scene, render, render_layers

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def single_frame_convolutions():
    """Within the block, causal 3D convolutions of single-frame inputs run as 2D convolutions (identical output)."""
    original = qvae.QwenImageCausalConv3d.forward

    def forward(self, x, cache_x=None):
        kt = self.weight.shape[2]
        if x.shape[2] == 1 and cache_x is None and self._padding[4] == kt - 1 and self.stride[0] == 1:
            y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:],
                         (self._padding[2], self._padding[0]))
            return y.unsqueeze(2)
        return original(self, x, cache_x)

    qvae.QwenImageCausalConv3d.forward = forward
    try:
        yield
    finally:
        qvae.QwenImageCausalConv3d.forward = original


def rgb_batch(rng: random.Random, n: int, size: int) -> torch.Tensor:
    """(n, 3, 1, size, size) in [-1, 1]: scenes of 1-3 shapes in every colour, shape kind and background."""
    imgs = [render(random_scene(rng, rng.randint(1, 3), colours=PALETTE, shapes=("circle", "square", "triangle",
                                                                                "diamond")), size) for _ in range(n)]
    return to_pixels(imgs)


def rgba_batch(rng: random.Random, n: int, size: int) -> torch.Tensor:
    """(n, 4, 1, size, size): what a layered VAE sees: composites, backgrounds and single shapes on transparency."""
    imgs = []
    while len(imgs) < n:
        comp, layers = render_layers(random_scene(rng, rng.randint(1, 3), colours=PALETTE,
                                                  shapes=("circle", "square", "triangle", "diamond")), size)
        imgs += [comp, *layers]
    rng.shuffle(imgs)
    return to_pixels(imgs[:n])


def to_pixels(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).unsqueeze(2).contiguous()


def train_vae(vae: AutoencoderKLQwenImage, steps: int, batch: int, size: int, seed: int, lr: float = 2e-4,
              kl_weight: float = 1e-6, log_every: int = 100) -> list[float]:
    """Reconstruction (L1 + MSE on a posterior sample) with a small KL term; AdamW with cosine decay."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    rgba = vae.config.input_channels == 4
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    vae.train()
    losses, t0 = [], time.time()
    with single_frame_convolutions():
        for step in range(steps):
            x = rgba_batch(rng, batch, size) if rgba else rgb_batch(rng, batch, size)
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            kl = post.kl().mean()
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                logger.info("vae step %d/%d: loss %.4f (%.1f s)", step + 1, steps, np.mean(losses[-log_every:]),
                            time.time() - t0)
    vae.eval()
    return losses


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLQwenImage, size: int, seed: int, n: int = 256) -> tuple[list, list]:
    """Per-channel mean and std of the posterior modes over n scenes: the normalisation the pipelines apply."""
    rng = random.Random(seed)
    rgba = vae.config.input_channels == 4
    with single_frame_convolutions():
        zs = [vae.encode(rgba_batch(rng, 32, size) if rgba else rgb_batch(rng, 32, size)).latent_dist.mode()
              for _ in range(max(1, n // 32))]
    z = torch.cat(zs).transpose(0, 1).reshape(vae.config.z_dim, -1)
    return z.mean(1).tolist(), z.std(1).tolist()


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKLQwenImage, size: int, seed: int, n: int = 128) -> dict[str, float]:
    """Held-out PSNR (dB, on [0, 1] pixels) through the plain 3D model; RGBA: also the alpha IoU (alpha > 0.5)."""
    rng = random.Random(seed)
    rgba = vae.config.input_channels == 4
    x = rgba_batch(rng, n, size) if rgba else rgb_batch(rng, n, size)
    mse, ious = [], []
    for i in range(0, n, 16):
        part = x[i:i + 16]
        rec = vae.decode(vae.encode(part).latent_dist.mode()).sample.clamp(-1, 1)
        mse.append(((rec - part) / 2).pow(2).flatten(1).mean(1))
        if rgba:
            a, b = part[:, 3] > 0, rec[:, 3] > 0
            inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
            ious.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)))
    mse = torch.cat(mse)
    out = {"psnr": float((10 * torch.log10(1 / mse.clamp(min=1e-10))).mean())}
    if rgba:
        out["alpha_iou"] = float(torch.cat(ious).mean())
    return out
