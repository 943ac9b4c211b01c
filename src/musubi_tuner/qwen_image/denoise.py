"""One call of the DiT on packed latents: the single place where inference and training meet the model."""

from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel


def predict_velocity(
    model: QwenImageTransformer2DModel,
    noisy: torch.Tensor,
    sigma: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    img_shapes: list[tuple[int, int, int]],
    reference: torch.Tensor | None = None,
    additional_t_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Velocity for the packed target tokens `noisy` (B, N, 64) at flow time `sigma` (scalar or (B,), in [0, 1]).

    img_shapes lists (frames, h/2, w/2) of the target first, then of each reference image; reference tokens (already
    packed, clean) are appended after the target and their predictions are cut away.
    """
    b, n = noisy.shape[:2]
    dtype = model.dtype  # diffusers: the first floating parameter's dtype (img_in, never fp8)
    hidden = noisy if reference is None else torch.cat([noisy, reference.to(noisy)], dim=1)
    timestep = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma
    out = model(
        hidden_states=hidden.to(dtype),
        timestep=timestep.to(dtype),
        encoder_hidden_states=text.to(dtype),
        encoder_hidden_states_mask=text_mask,
        img_shapes=[img_shapes] * b,
        additional_t_cond=additional_t_cond,
        return_dict=False,
    )[0]
    return out[:, :n]
