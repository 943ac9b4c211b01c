"""What a model version is: data that the shared code reads (no code outside a family asks which model it is)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelVersion:
    name: str  # --model_version
    family: str  # the registry key of the family that implements it (models/registry.py)
    template: str  # the family's prompt template
    arch_tag: str  # cache file-name tag
    architecture: str  # ss_base_model_version, as musubi-tuner names it
    modelspec_arch: str  # modelspec.architecture
    implementation: str = "https://github.com/QwenLM/Qwen-Image"  # modelspec.implementation
    controls: str = "none"  # control (condition) images of a dataset item: "none", "required" or "optional"
    max_controls: int | None = None  # per item (None: no limit)
    layer_targets: bool = False  # a target is a composite followed by its layers (RGBA frames)
    control_pixels: str = "RGB"  # how control images are read
    vae_channels: int = 3  # 4 for an RGBA VAE
    bucket_step: int = 16  # image sides are multiples of this
    patch: int = 2  # latent pixels per token side
    default_guidance: float = 4.0  # CFG scale where none is given
    zero_cond_t: bool = False  # reference tokens modulated at t=0 (Edit-2511)
    additional_t_cond: bool = False  # an extra timestep embedding (Layered: index 0 = RGBA)
    layer3d_rope: bool = False  # per-layer frame rope (Layered)

    @property
    def uses_controls(self) -> bool:
        """Items carry control images; they are encoded as latents and shown to the text encoder."""
        return self.controls != "none"

    def image_tokens(self, latent_h: int, latent_w: int) -> int:
        """Tokens of one image in the DiT."""
        return (latent_h // self.patch) * (latent_w // self.patch)
