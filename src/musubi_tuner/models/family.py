"""The interface of a model family: what the trainer, caching, sampling during training, generation, metadata and the
converters ask of a model. Each family package defines one object with these members (`FAMILY` in its family.py);
models/registry.py finds it from a ModelVersion's `family`. What differs between versions of one family is data on
the version (models/version.py), which the shared code may read directly."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .version import ModelVersion


class PromptEncoder(Protocol):
    """A loaded text encoder for generation and sampling: `te` can be moved between devices (--interactive keeps it
    in CPU memory while the DiT runs); encode_job fills a job's prompt embeddings (cached per text and images)."""

    te: torch.nn.Module
    device: torch.device

    def encode_job(self, job: Any) -> None: ...


class ModelFamily(Protocol):
    name: str
    attention_options: dict  # keyword arguments of memory.attention.set_attention for its DiT
    comfy_single_file: bool  # merged single-file DiTs are written with ComfyUI's prefix (and can be scaled fp8)
    memory_estimate: bool  # memory/estimate.py can build its DiT (the web UI's memory plan)

    # loaders
    def load_dit(self, path, version: ModelVersion, dtype: torch.dtype, device, **options) -> torch.nn.Module: ...
    def load_vae(self, path, version: ModelVersion, dtype: torch.dtype, device) -> torch.nn.Module: ...
    def prompt_encoder(self, args, version: ModelVersion, device, dtype, keep_on=None) -> PromptEncoder: ...
    def cache_text_encoder(self, args, version: ModelVersion, device, dtype):
        """-> encode(captions, images or None) -> [(embedding (L, D), {extra cache tensors})]; `images` are one
        item's control images (items whose prompt reads images are encoded one at a time)."""

    # training
    def target_latents(self, batch: dict, version: ModelVersion, args) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(x0 the model learns to denoise (B, C, F, h, w), the latents it is conditioned on)."""

    def per_sample_loss(self, model, batch: dict, version: ModelVersion, args, t: torch.Tensor, noise: torch.Tensor,
                        device, dtype) -> torch.Tensor:
        """(B,) flow-matching losses (before the weighting scheme) at the given t and noise."""

    def plan_samples(self, args, version: ModelVersion, specs: list, cfg) -> list:
        """Jobs of --sample_prompts sized like the training data of the dataset config `cfg`."""

    # generation (generation/pipeline.py)
    def check_generation_options(self, args, version: ModelVersion) -> None: ...
    def default_steps(self, args, version: ModelVersion) -> int: ...
    def check_spec(self, spec, version: ModelVersion) -> None:
        """The family's rules on one GenerationSpec (sizes, layer counts, which options apply); may fill defaults."""

    def resolve_jobs(self, specs: list, args, version: ModelVersion) -> list:
        """Jobs (with `spec` and `has_conditions`), condition images loaded and sized, before any model loads."""

    def encode_conditions(self, vae, jobs: list, version: ModelVersion) -> None: ...
    def denoise(self, model, job, args, version: ModelVersion, device, dtype, progress: bool = True,
                debug_stem=None) -> torch.Tensor:
        """One job -> normalised latents (1, C, F, h, w), float32 on the CPU."""

    def accepts_file(self, info) -> bool:
        """Whether a DiT, VAE or text-encoder file (qwen_image/model_files.py's ModelFile, read from its header) is one
        of this family's."""

    # LoRA files
    def linear_names(self, num_layers: int) -> list[str]: ...
    def recognizes_lora(self, metadata: dict, keys) -> bool:
        """Whether a LoRA file's metadata or key names say it was trained on this family."""
