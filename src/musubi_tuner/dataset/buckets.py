"""Aspect-ratio buckets and the resize-then-centre-crop that maps an image onto its bucket, exactly as musubi-tuner
does (its BucketSelector and resize_image_to_bucket), so that the same image gets the same bucket, the same pixels and
the same cache file name in both tools. Target and control images of the same size get the identical transform, so
they stay aligned.

- The buckets at a resolution (area A = W * H): for each width w from floor16(sqrt(A) / 2) to sqrt(A) in steps of 16,
  (w, floor16(A // w)) and its transpose.
- An image goes to the bucket of nearest aspect ratio w / h (linear distance; the first of the sorted buckets on a
  tie). With bucket_no_upscale an image of at most that area keeps its size, rounded down to multiples of 16.
- Resizing scales the image to cover the bucket (sides rounded half up), with Lanczos when enlarging and OpenCV's
  area averaging when shrinking, then crops the centre.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

STEP = 16


def floor_to(value: int, step: int) -> int:
    return value - value % step


def bucket_resolutions(resolution: tuple[int, int], step: int = STEP) -> list[tuple[int, int]]:
    """The sorted (W, H) buckets of a resolution (W, H); each side a multiple of `step`."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))
    out = set()
    for w in range(max(step, floor_to(side // 2, step)), side + step, step):
        h = floor_to(area // w, step)
        if h >= step:
            out.update({(w, h), (h, w)})
    return sorted(out)


def _buckets_and_ratios(resolution: tuple[int, int], step: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    key = (resolution[0], resolution[1], step)
    if key not in _CACHE:
        buckets = bucket_resolutions(resolution, step)
        _CACHE[key] = (buckets, np.array([w / h for w, h in buckets]))
    return _CACHE[key]


_CACHE: dict = {}


def select_bucket(size: tuple[int, int], resolution: tuple[int, int], enable_bucket: bool = True,
                  no_upscale: bool = False, step: int = STEP) -> tuple[int, int]:
    """The (W, H) bucket of an image of `size` (W, H)."""
    if not enable_bucket:
        return tuple(resolution)
    iw, ih = size
    if no_upscale and iw * ih <= resolution[0] * resolution[1]:
        return max(step, floor_to(iw, step)), max(step, floor_to(ih, step))
    buckets, ratios = _buckets_and_ratios(tuple(resolution), step)
    return buckets[int(np.abs(ratios - iw / ih).argmin())]


def area_bucket(size: tuple[int, int], resolution: tuple[int, int], step: int = STEP) -> tuple[int, int]:
    """The bucket of one image alone at an area (musubi-tuner's rule for control images with control_resolution):
    the width of that area at the image's aspect ratio, rounded down to `step`, and of its four neighbours the one
    whose aspect ratio is nearest."""
    area = resolution[0] * resolution[1]
    ratio = size[0] / size[1]
    width = floor_to(int(math.sqrt(area * ratio)), step)
    best, best_diff = None, float("inf")
    for i in range(-2, 3):
        w = width + i * step
        h = floor_to(area // w, step) if w > 0 else 0
        if h <= 0:
            continue
        if abs(w / h - ratio) < best_diff:
            best, best_diff = (w, h), abs(w / h - ratio)
    return best or (max(step, width), max(step, floor_to(int(math.sqrt(area / ratio)), step)))


def resize_crop(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale to cover the bucket (keeping aspect, sides rounded half up), then centre-crop to exactly (W, H):
    Lanczos when enlarging, OpenCV's area averaging when shrinking (musubi-tuner's resize)."""
    bw, bh = bucket
    iw, ih = image.size
    if (iw, ih) == (bw, bh):
        return image
    scale = max(bw / iw, bh / ih)
    nw, nh = int(iw * scale + 0.5), int(ih * scale + 0.5)
    if scale > 1:
        image = image.resize((nw, nh), Image.LANCZOS)
    elif (nw, nh) != (iw, ih):
        import cv2

        arr = cv2.resize(np.asarray(image), (nw, nh), interpolation=cv2.INTER_AREA)
        image = Image.fromarray(arr)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


def crop_to_multiple(image: Image.Image, multiple: int = STEP) -> Image.Image:
    """Native size, cut down to multiples of `multiple` (musubi-tuner's no_resize_control)."""
    w, h = image.size
    return resize_crop(image, (max(multiple, floor_to(w, multiple)), max(multiple, floor_to(h, multiple))))


def to_tensor(image: Image.Image):
    """PIL -> float tensor (C, H, W) in [-1, 1]."""
    import torch

    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
