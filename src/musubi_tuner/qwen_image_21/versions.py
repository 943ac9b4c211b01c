"""Qwen-Image-2.1's version."""

from __future__ import annotations

from ..models.version import ModelVersion

VERSIONS: tuple[ModelVersion, ...] = (
    ModelVersion("2.1", "qwen_image_21", "v21", "qi21", "qwen_image_2_1", "Qwen-Image-2.1", controls="optional",
                 control_pixels="RGBA", vae_channels=4, bucket_step=32, patch=1, default_guidance=1.0),
)
