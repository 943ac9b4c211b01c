"""The compute device and dtype of a run, and releasing memory between models."""

from __future__ import annotations

import gc

import torch


def compute_setup(device: str | None) -> tuple[torch.device, torch.dtype]:
    """--device (default: CUDA when present) and its compute dtype: bfloat16 on a GPU, float32 on the CPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
