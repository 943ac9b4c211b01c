"""Edit and Layered specifics of generation: control-image sizing, the inpainting mask and the Reference
Consistency Mask (RCM), which both re-anchor "keep" regions to the noised first control latent before each step."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..dataset.buckets import crop_to_multiple
from ..dataset.items import load_image
from ..errors import UserError
from ..fileio import save_image
from .latents import unpack
from ..models.version import ModelVersion
from .versions import is_edit, is_layered

logger = logging.getLogger(__name__)

OFFICIAL_AREA = 1024 * 1024
LAYERED_AREA = 640 * 640
MAX_OFFICIAL_CONTROLS = 3


def area_dimensions(area: int, size: tuple[int, int], multiple: int = 32) -> tuple[int, int]:
    """(W, H) with about `area` pixels and the aspect of `size`, rounded to `multiple` (the reference pipelines')."""
    ratio = size[0] / size[1]
    w = math.sqrt(area * ratio)
    return round(w / multiple) * multiple, round(w / ratio / multiple) * multiple


def control_mode(args) -> str:
    if args.resize_control_to_official_size and args.resize_control_to_image_size:
        raise UserError("--resize_control_to_official_size and --resize_control_to_image_size are mutually exclusive")
    if args.resize_control_to_official_size:
        return "official"
    if args.resize_control_to_image_size:
        return "image"
    return "native"


def control_size(size: tuple[int, int], mode: str, image_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(W, H) a control image of `size` gets for the VAE."""
    if mode == "official":
        return area_dimensions(OFFICIAL_AREA, size)
    if mode == "image":
        return image_hw[1], image_hw[0]
    return max(16, size[0] // 16 * 16), max(16, size[1] // 16 * 16)


def prepare_control(image: Image.Image, mode: str, image_hw: tuple[int, int] | None) -> Image.Image:
    w, h = control_size(image.size, mode, image_hw)
    if mode == "native":
        return crop_to_multiple(image)
    return image if image.size == (w, h) else image.resize((w, h), Image.LANCZOS)


def load_controls(paths: list[str], version: ModelVersion) -> list[Image.Image]:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"--control_image_path: file not found: {missing[0]}")
    return [load_image(Path(p), "RGBA" if is_layered(version) else "RGB") for p in paths]


def default_output_hw(version: ModelVersion, first: Image.Image, mode: str) -> tuple[int, int]:
    """Output (H, W) when --image_size is not given: from the first control image."""
    if is_layered(version):
        w, h = area_dimensions(LAYERED_AREA, first.size)
    elif mode == "native":
        w, h = control_size(first.size, "native", None)
    else:
        w, h = area_dimensions(OFFICIAL_AREA, first.size)
    return h // 16 * 16, w // 16 * 16


def check_controls(version: ModelVersion, n: int, mode: str, where: str = "--control_image_path",
                   advise: bool = True) -> None:
    """Control-image counts per version; `advise`: warn when Edit-2511 controls are not at the official size (off
    when the DiT file recommends its own sizing)."""
    if (is_edit(version) or is_layered(version)) and n == 0:
        raise UserError(f"{where}: --model_version {version.name} needs a control image")
    if version.template == "edit" and n != 1:
        raise UserError(f"{where}: --model_version edit takes exactly one control image, got {n}")
    if is_layered(version) and n != 1:
        raise UserError(f"{where}: --model_version layered takes exactly one image to decompose, got {n}")
    if version.template == "edit_plus" and n > MAX_OFFICIAL_CONTROLS:
        logger.warning("%d control images: the official maximum is %d; results beyond that are unverified", n,
                       MAX_OFFICIAL_CONTROLS)
    if version.name == "edit-2511" and mode != "official" and advise:
        logger.warning("Edit-2511 was trained with control images at about 1M pixels: pass "
                       "--resize_control_to_official_size (musubi-tuner's Qwen-Image guide calls it mandatory)")


def load_mask(path: str, latent_h: int, latent_w: int) -> torch.Tensor:
    """White = change (1), black = keep (0), as a (1, tokens, 1) weight per packed latent token."""
    img = load_image(Path(path), "L")
    m = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]
    m = F.interpolate(m, size=(latent_h // 2, latent_w // 2), mode="area")
    return (m > 0.5).float().reshape(1, -1, 1)


@dataclass
class Anchor:
    """Keeps regions of the generation on the noised path of the first control latent.

    Either a fixed mask (inpainting, --mask_path) or the RCM mask computed each step from the difference between the
    current latents and the noised control latent. `__call__` is the sampler's before_step hook; `finish` applies the
    same rule at sigma 0 after the last step, so kept regions end exactly on the control latent."""

    control: torch.Tensor  # packed first control latent (1, N, 64)
    noise: torch.Tensor  # packed initial noise (1, N, 64)
    sigmas: torch.Tensor
    latent_hw: tuple[int, int]
    change_mask: torch.Tensor | None = None  # inpainting: (1, N, 1), 1 = change
    rcm_threshold: float | None = None
    rcm_relative: bool = False
    rcm_kernel_size: int = 3
    rcm_dilate_size: int = 0
    debug_stem: Path | None = None

    def noisy_control(self, sigma: torch.Tensor) -> torch.Tensor:
        return (1 - sigma) * self.control + sigma * self.noise

    def rcm_change_mask(self, latents: torch.Tensor, ref: torch.Tensor, step: int, save: bool = True) -> torch.Tensor:
        h, w = self.latent_hw
        diff = (unpack(latents.float(), h, w) - unpack(ref.float(), h, w)).abs().mean(dim=1)[:, 0]  # (1, h, w)
        k = self.rcm_kernel_size
        if k and k > 1:
            k = k | 1
            x = torch.arange(k, dtype=torch.float32) - k // 2
            g = torch.exp(-x**2 / (2 * (0.3 * ((k - 1) * 0.5 - 1) + 0.8) ** 2))
            g = (g / g.sum()).to(diff)
            d = diff[:, None]
            d = F.conv2d(F.pad(d, (k // 2, k // 2, 0, 0), mode="replicate"), g.view(1, 1, 1, k))
            d = F.conv2d(F.pad(d, (0, 0, k // 2, k // 2), mode="replicate"), g.view(1, 1, k, 1))
            diff = d[:, 0]
        thr = self.rcm_threshold * diff.max() if self.rcm_relative else self.rcm_threshold
        change = (diff >= thr).float()[:, None]  # (1, 1, h, w)
        if self.rcm_dilate_size:
            r = self.rcm_dilate_size
            change = F.max_pool2d(change, 2 * r + 1, stride=1, padding=r)
        if self.debug_stem is not None and save:
            img = Image.fromarray((change[0, 0].cpu().numpy() * 255).astype("uint8"), mode="L")
            save_image(img, self.debug_stem.with_name(f"{self.debug_stem.name}_rcm_step{step:03d}.png"))
        # per packed token (2x2 latent pixels): change when most of its pixels change
        tok = (F.avg_pool2d(change, 2) >= 0.5).float()
        return tok.reshape(1, -1, 1)

    def blend(self, latents: torch.Tensor, sigma: torch.Tensor, step: int, save: bool = True) -> torch.Tensor:
        ref = self.noisy_control(sigma).to(latents)
        target = latents
        if self.change_mask is not None:
            m = self.change_mask.to(latents)
        else:
            m = self.rcm_change_mask(target, ref, step, save).to(latents)
        return m * target + (1 - m) * ref

    def __call__(self, i: int, latents: torch.Tensor, _velocity: torch.Tensor) -> torch.Tensor:
        return self.blend(latents, self.sigmas[i], i)

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        return self.blend(latents, self.sigmas[-1], len(self.sigmas) - 1, save=False)
