"""Aspect-ratio buckets (multiples of 16 at the configured area) and the resize-then-centre-crop that maps an image
onto its bucket. Target and control images of the same size get the identical transform, so they stay aligned."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

STEP = 16
MAX_ASPECT = 4.0


def bucket_resolutions(resolution: tuple[int, int], step: int = STEP) -> list[tuple[int, int]]:
    """(W, H) buckets with W*H <= area of `resolution`, each side a multiple of `step`, aspect within 1:4..4:1."""
    area = resolution[0] * resolution[1]
    out = set()
    w = step
    while w * step <= area:
        h = (area // w) // step * step
        if h >= step and 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
            out.add((w, h))
        w += step
    if resolution[0] % step == 0 and resolution[1] % step == 0:
        out.add(tuple(resolution))
    return sorted(out)


def select_bucket(size: tuple[int, int], resolution: tuple[int, int], enable_bucket: bool = True,
                  no_upscale: bool = False, step: int = STEP) -> tuple[int, int]:
    """The (W, H) bucket of an image of `size` (W, H): nearest aspect ratio (log distance), then largest area."""
    if not enable_bucket:
        return tuple(resolution)
    iw, ih = size
    if no_upscale and iw * ih <= resolution[0] * resolution[1]:
        area = iw * ih
        target = (max(step, iw // step * step), max(step, ih // step * step))
        if target[0] * target[1] <= area:
            return target
    ar = math.log(iw / ih)
    return min(bucket_resolutions(resolution, step), key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def resize_crop(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale to cover the bucket (keeping aspect), then centre-crop to exactly (W, H)."""
    bw, bh = bucket
    iw, ih = image.size
    if (iw, ih) == (bw, bh):
        return image
    scale = max(bw / iw, bh / ih)
    nw, nh = max(bw, round(iw * scale)), max(bh, round(ih * scale))
    if (nw, nh) != (iw, ih):
        image = image.resize((nw, nh), Image.LANCZOS if scale < 1 else Image.BICUBIC)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


def crop_to_multiple(image: Image.Image, multiple: int = STEP) -> Image.Image:
    """Native size, centre-cropped down to multiples of `multiple` (no resampling)."""
    w, h = image.size
    return resize_crop(image, (max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)))


def to_tensor(image: Image.Image):
    """PIL -> float tensor (C, H, W) in [-1, 1]."""
    import torch

    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
