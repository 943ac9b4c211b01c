"""Will it fit? Free memory of a device and the memory a VAE encode of a given size takes, so that a resolution too
large for this machine is refused (or warned) with the estimate before any model loads, instead of swapping for hours
or being killed.

VAE_BYTES_PER_PIXEL: peak memory growth of one Qwen-Image VAE encode per input pixel in float32, measured on the CPU
(resource.ru_maxrss) at 256², 512² and 1024²: 6.3, 4.8 and 4.7 GB per megapixel (activations of the 96-channel
full-resolution stages). Half of that in bf16 / fp16.
"""

from __future__ import annotations

import logging

import torch

from ..errors import UserError

logger = logging.getLogger(__name__)

VAE_BYTES_PER_PIXEL = 4.8e9 / 1e6  # float32
GB = 1e9


def free_bytes(device: torch.device) -> int | None:
    """Memory that can still be used on `device`: CUDA's free memory, or the kernel's MemAvailable; None if unknown."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except Exception:  # noqa: BLE001 - no estimate then
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def vae_encode_bytes(pixels: int, dtype: torch.dtype) -> float:
    return pixels * VAE_BYTES_PER_PIXEL * (0.5 if dtype in (torch.bfloat16, torch.float16) else 1.0)


def check_vae_encode_fits(width: int, height: int, images: int, dtype: torch.dtype, device: torch.device,
                          where: str, tiling: bool, available: int | None = None) -> None:
    """Refuse a batch of `images` W x H encodes that cannot fit the free memory; warn above 70% of it. Tiled
    encoding (--vae_enable_tiling) works tile by tile and is not limited this way."""
    if tiling:
        return
    need = vae_encode_bytes(width * height, dtype) * images
    free = free_bytes(device) if available is None else available
    if free is None:
        return
    if need > free:
        raise UserError(f"{where}: encoding {images} x {width}x{height} needs about {need / GB:.1f} GB on the "
                        f"{device.type}, but {free / GB:.1f} GB are free; lower the resolution or batch_size, or pass "
                        "--vae_enable_tiling")
    if need > 0.7 * free:
        logger.warning("%s: encoding %d x %dx%d needs about %.1f GB of the %.1f GB free on the %s", where, images,
                       width, height, need / GB, free / GB, device.type)
