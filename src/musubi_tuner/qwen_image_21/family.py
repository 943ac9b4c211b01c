"""The Qwen-Image-2.1 family object (models/family.py's interface)."""

from __future__ import annotations

import torch

from ..models.version import ModelVersion


def _schedule(dit: str | None):
    """(scheduler config, the checkpoint's sample_sigmas or None), read from the DiT's files."""
    from .modeling import scheduler_settings

    return scheduler_settings(dit)


class QwenImage21Family:
    name = "qwen_image_21"
    attention_options = {"split_masked": False}  # its processors pass block-causal masks to SDPA themselves
    comfy_single_file = False  # its model holds diffusers names (its ComfyUI files fuse gate_up)
    memory_estimate = False  # memory/estimate.py builds Qwen-Image's DiT only

    # loaders
    def load_dit(self, path, version: ModelVersion, dtype, device, **options):
        from .modeling import load_dit

        return load_dit(path, dtype, device, **options)

    def load_vae(self, path, version: ModelVersion, dtype, device):
        from .modeling import load_vae

        return load_vae(path, dtype, device)

    def prompt_encoder(self, args, version: ModelVersion, device, dtype, keep_on=None):
        from .generation import TextEncoder21

        return TextEncoder21(args, device, dtype, keep_on)

    def cache_text_encoder(self, args, version: ModelVersion, device, dtype):
        from ..dataset.cache import IMAGE_SLOTS_KEY
        from ..memory.fp8 import quantize_text_encoder
        from . import modeling as v21

        processor = v21.load_processor(args.tokenizer, args.text_encoder)
        te = v21.load_text_encoder(args.text_encoder, dtype, device, tokenizer=processor.tokenizer)
        if args.fp8_vl:
            quantize_text_encoder(te, device)

        def encode(captions: list[str], images=None):
            encoded = v21.encode_prompts(te, processor, captions, images, device)
            return [(e, {IMAGE_SLOTS_KEY: slots.cpu().to(torch.uint8)}) for e, slots in encoded]

        return encode

    # training
    def target_latents(self, batch: dict, version: ModelVersion, args):
        return batch["latents"], list(batch.get("controls") or [])

    def per_sample_loss(self, model, batch: dict, version: ModelVersion, args, t, noise, device, dtype):
        from .loss import per_sample_loss

        return per_sample_loss(model, batch, args, t, noise, device, dtype)

    def plan_samples(self, args, version: ModelVersion, specs: list, cfg) -> list:
        from .generation import plan_training_samples

        return plan_training_samples(args, specs, cfg)

    # generation
    def check_generation_options(self, args, version: ModelVersion) -> None:
        from .generation import check_options

        check_options(args)

    def default_steps(self, args, version: ModelVersion) -> int:
        """As many as the checkpoint's sample_sigmas (which are then used), else the pipeline's 40."""
        from .modeling import DEFAULT_STEPS

        sample_sigmas = _schedule(args.dit)[1]
        return len(sample_sigmas) if sample_sigmas else DEFAULT_STEPS

    def check_spec(self, spec, version: ModelVersion) -> None:
        from .generation import check_spec

        check_spec(spec)

    def resolve_jobs(self, specs: list, args, version: ModelVersion) -> list:
        from .generation import resolve_jobs

        return resolve_jobs(specs, args)

    def encode_conditions(self, vae, jobs: list, version: ModelVersion) -> None:
        from .generation import encode_conditions

        encode_conditions(vae, jobs)

    def denoise(self, model, job, args, version: ModelVersion, device, dtype, progress: bool = True, debug_stem=None):
        from .generation import denoise_job

        config, sample_sigmas = _schedule(args.dit)
        return denoise_job(model, job, config, sample_sigmas, not getattr(args, "no_kv_cache", False), device, dtype,
                           progress=progress)

    def accepts_file(self, info) -> bool:
        """A DiT, VAE or text-encoder file (qwen_image/model_files.py's ModelFile) of this family."""
        from ..qwen_image.model_files import V21

        return info.family == V21

    # LoRA files
    def linear_names(self, num_layers: int) -> list[str]:
        from .modeling import linear_names

        return linear_names(num_layers)

    def recognizes_lora(self, metadata: dict, keys) -> bool:
        return metadata.get("ss_model_version") == "2.1" or any("gate_layer" in k for k in keys)


FAMILY = QwenImage21Family()
