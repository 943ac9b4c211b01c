"""The Qwen-Image family's versions: their differences are data (controls, layers, zero-t conditions, RGBA)."""

from __future__ import annotations

from ..models.version import ModelVersion

_EDIT = dict(family="qwen_image", arch_tag="qie", architecture="qwen_image_edit", controls="required")

VERSIONS: tuple[ModelVersion, ...] = (
    ModelVersion("original", "qwen_image", "t2i", "qi", "qwen_image", "Qwen-Image"),
    ModelVersion("edit", template="edit", modelspec_arch="Qwen-Image-Edit", max_controls=1, **_EDIT),
    ModelVersion("edit-2509", template="edit_plus", modelspec_arch="Qwen-Image-Edit-Plus", **_EDIT),
    ModelVersion("edit-2511", template="edit_plus", modelspec_arch="Qwen-Image-Edit-2511", zero_cond_t=True, **_EDIT),
    ModelVersion("layered", "qwen_image", "t2i", "qil", "qwen_image_layered", "Qwen-Image-Layered",
                 implementation="https://github.com/QwenLM/Qwen-Image-Layered", layer_targets=True,
                 additional_t_cond=True, layer3d_rope=True, vae_channels=4),
)


def is_edit(version: ModelVersion) -> bool:
    """Edit, Edit-2509, Edit-2511: the prompt reads the control images, which are reference latents of the DiT."""
    return version.template in ("edit", "edit_plus")


def is_layered(version: ModelVersion) -> bool:
    """Layered: an RGBA image decomposed into layers."""
    return version.layer_targets
