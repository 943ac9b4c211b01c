"""From item files to the exact pixels that are cached: bucket choice, resize/crop of targets and controls."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import UserError
from ..models.version import ModelVersion
from .buckets import area_bucket, crop_to_multiple, resize_crop, select_bucket, to_tensor
from .config import DatasetConfig
from .items import ImageItem, load_image


def image_size(path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Image.DecompressionBombError as e:
        raise UserError(f"image {path} is too large to decode safely ({e}); resize it") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}; replace or remove the file") from None


def target_bucket(item: ImageItem, step: int = 16) -> tuple[int, int]:
    cfg = item.config
    return select_bucket(image_size(item.targets[0]), cfg.resolution, cfg.enable_bucket, cfg.bucket_no_upscale, step)


def control_mode(item: ImageItem) -> str:
    cfg = item.config
    if cfg.no_resize_control and cfg.control_resolution:
        return f"native up to {cfg.control_resolution[0]}x{cfg.control_resolution[1]}"
    if cfg.no_resize_control:
        return "native"
    if cfg.control_resolution:
        return f"area {cfg.control_resolution[0]}x{cfg.control_resolution[1]}"
    return "target bucket"


def prepare_control(img: Image.Image, cfg: DatasetConfig, bucket: tuple[int, int], step: int = 16) -> Image.Image:
    """As musubi-tuner: no_resize_control keeps the native size cut down to multiples of 16 (with control_resolution,
    an image larger than that area goes to its own bucket at that area instead); control_resolution alone: the
    control's own bucket at that area (area_bucket); otherwise the target's transform (pixel-aligned when sizes
    match). One difference: musubi-tuner leaves a control within control_resolution at a size that is not a multiple
    of 16, which its VAE step cannot take; here it is cut down to multiples of 16."""
    area = cfg.control_resolution[0] * cfg.control_resolution[1] if cfg.control_resolution else None
    if cfg.no_resize_control and (area is None or img.size[0] * img.size[1] <= area):
        return crop_to_multiple(img, step)
    if cfg.control_resolution:
        return resize_crop(img, area_bucket(img.size, cfg.control_resolution, step))
    return resize_crop(img, bucket)


@dataclass
class PreparedItem:
    bucket: tuple[int, int]  # (W, H)
    targets: torch.Tensor  # (C, F, H, W) in [-1, 1]; F = 1, layered: composite + layers
    controls: list[torch.Tensor]  # each (3, h, w) in [-1, 1] (2.1: RGBA, 4 channels)
    control_images: list[Image.Image]  # the prepared control pictures (for the VL model)


def prepare_item(item: ImageItem, version: ModelVersion, with_targets: bool = True) -> PreparedItem:
    bucket = target_bucket(item, version.bucket_step)
    mode = "RGBA" if version.vae_channels == 4 else "RGB"  # layered; 2.1 reads RGBA (opaque for RGB files)
    targets = None
    if with_targets:
        frames = [to_tensor(resize_crop(load_image(p, mode), bucket)) for p in item.targets]
        targets = torch.stack(frames, dim=1)
    control_images = [prepare_control(load_image(p, version.control_pixels), item.config, bucket,
                                      version.bucket_step) for p in item.controls]
    return PreparedItem(bucket, targets, [to_tensor(c) for c in control_images], control_images)
