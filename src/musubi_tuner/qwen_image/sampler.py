"""Flow-matching Euler sampler with the Qwen-Image schedule: dynamic (resolution-dependent) shift, shift_terminal
stretch, and norm-rescaled classifier-free guidance."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

# scheduler config of the released Qwen-Image models
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 8192
BASE_SHIFT, MAX_SHIFT = 0.5, 0.9
SHIFT_TERMINAL = 0.02


def dynamic_mu(image_seq_len: int) -> float:
    """mu linear in the target token count, from (256, 0.5) to (8192, 0.9)."""
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return image_seq_len * m + (BASE_SHIFT - m * BASE_SEQ_LEN)


def exponential_shift(mu: float, sigmas):
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def static_shift(shift: float, sigmas):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def stretch_to_terminal(sigmas, terminal: float = SHIFT_TERMINAL):
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def _terminate(sigmas, shift_terminal: float | None) -> torch.Tensor:
    """Stretch so the last sigma is shift_terminal (when set), then append the final 0; float32 tensor."""
    if shift_terminal:
        sigmas = stretch_to_terminal(sigmas, shift_terminal)
    return torch.cat([torch.from_numpy(np.asarray(sigmas, dtype=np.float32)), torch.zeros(1)])


def flow_sigmas(steps: int, image_seq_len: int, flow_shift: float | None = None,
                shift_terminal: float | None = SHIFT_TERMINAL) -> torch.Tensor:
    """steps+1 float32 sigmas from ~1 down to shift_terminal, then 0.

    Default: linspace(1, 1/N, N) shifted by the dynamic mu of the token count; with flow_shift S the static shift
    S*s/(1+(S-1)*s) is used instead. Both are stretched so that the last sigma is shift_terminal.
    """
    s = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    s = exponential_shift(dynamic_mu(image_seq_len), s) if flow_shift is None else static_shift(flow_shift, s)
    return _terminate(s, shift_terminal)


def layered_sigmas(steps: int, condition_tokens: int, shift_terminal: float | None = SHIFT_TERMINAL) -> torch.Tensor:
    """Qwen-Image-Layered: linspace(1, 0, N+1)[:-1] shifted with mu = sqrt(condition tokens / 256), then stretched
    to shift_terminal like the other versions (same scheduler config), then 0."""
    s = np.linspace(1.0, 0.0, steps + 1)[:-1].astype(np.float32)
    s = exponential_shift(math.sqrt(condition_tokens / 256), s)
    return _terminate(s, shift_terminal)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: bool = True) -> torch.Tensor:
    """neg + s*(cond - neg); with rescale, each token's prediction is scaled back to the norm of cond."""
    comb = uncond + scale * (cond - uncond)
    if not rescale:
        return comb
    return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    return (latents.float() + (sigma_next - sigma) * velocity.float()).to(velocity.dtype)


@torch.no_grad()
def sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    progress: bool = True,
    before_step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    desc: str = "denoising",
) -> torch.Tensor:
    """Euler integration of dx/dsigma = velocity_fn(x, sigma, step) over `sigmas`.

    before_step(i, latents, velocity) may return replacement latents just before the step (inpainting, RCM).
    """
    sigmas = sigmas.to(latents.device)
    for i in tqdm(range(len(sigmas) - 1), desc=desc, disable=not progress, unit="step"):
        v = velocity_fn(latents, sigmas[i], i)
        if before_step is not None:
            latents = before_step(i, latents, v)
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
    return latents
