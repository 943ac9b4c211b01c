"""The table of Qwen-Image model versions and what each one switches."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class ModelVersion:
    name: str
    template: str  # "t2i" | "edit" | "edit_plus"
    arch_tag: str  # cache file tag
    zero_cond_t: bool = False  # reference tokens modulated at t=0 (Edit-2511)
    additional_t_cond: bool = False  # Layered: extra timestep embedding (index 0 = RGBA)
    layer3d_rope: bool = False  # Layered: per-layer frame rope
    vae_channels: int = 3  # 4 for the RGBA (layered, 2.1) VAE

    @property
    def is_edit(self) -> bool:
        return self.template in ("edit", "edit_plus")

    @property
    def is_layered(self) -> bool:
        return self.name == "layered"

    @property
    def uses_controls(self) -> bool:
        """Control (condition) images are read: required by the edit versions, optional for 2.1."""
        return self.is_edit or self.is_v21

    @property
    def bucket_step(self) -> int:
        """Image sides are multiples of this: 16 (8x VAE, 2x2 patches); 2.1: 32 (16x VAE, one text-encoder slot per
        2x2 latent tokens)."""
        return 32 if self.is_v21 else 16

    def image_tokens(self, latent_h: int, latent_w: int) -> int:
        """Tokens of one image in the DiT: 2x2 patches; 2.1 reads latents unpatched."""
        return latent_h * latent_w if self.is_v21 else (latent_h // 2) * (latent_w // 2)

    @property
    def is_v21(self) -> bool:
        """Qwen-Image-2.1: its own DiT, VAE and Qwen3-VL text encoder (see qwen_image/v21.py)."""
        return self.template == "v21"


VERSIONS: dict[str, ModelVersion] = {
    v.name: v
    for v in (
        ModelVersion("original", "t2i", "qi"),
        ModelVersion("edit", "edit", "qie"),
        ModelVersion("edit-2509", "edit_plus", "qie"),
        ModelVersion("edit-2511", "edit_plus", "qie", zero_cond_t=True),
        ModelVersion("layered", "t2i", "qil", additional_t_cond=True, layer3d_rope=True, vae_channels=4),
        ModelVersion("2.1", "v21", "qi21", vae_channels=4),
    )
}


def resolve_version(model_version: str | None = None, edit: bool = False, edit_plus: bool = False) -> ModelVersion:
    """--model_version wins; --edit / --edit_plus are the backward-compatible spellings."""
    if edit and edit_plus:
        raise UserError("--edit and --edit_plus are mutually exclusive; use --model_version edit|edit-2509|edit-2511")
    legacy = "edit" if edit else "edit-2509" if edit_plus else None
    name = model_version or legacy or "original"
    if legacy and model_version and model_version not in ("original", legacy):
        raise UserError(f"--model_version {model_version} contradicts --{'edit' if edit else 'edit_plus'}; pass only one")
    if legacy and model_version == "original":
        name = legacy
    if name not in VERSIONS:
        raise UserError(f"unknown --model_version {name!r}; choose one of {', '.join(VERSIONS)}")
    return VERSIONS[name]
