"""The Qwen-Image family object (models/family.py's interface): Qwen-Image, Edit, Edit-2509, Edit-2511 and Layered,
whose differences are data on their versions (versions.py)."""

from __future__ import annotations

from ..models.version import ModelVersion


class QwenImageFamily:
    name = "qwen_image"
    attention_options: dict = {}
    comfy_single_file = True
    memory_estimate = True  # memory/estimate.py builds its DiT

    # loaders
    def load_dit(self, path, version: ModelVersion, dtype, device, **options):
        from .dit import load_dit

        return load_dit(path, version, dtype, device, **options)

    def load_vae(self, path, version: ModelVersion, dtype, device):
        from .vae import load_vae

        return load_vae(path, dtype, device, version.vae_channels)

    def prompt_encoder(self, args, version: ModelVersion, device, dtype, keep_on=None):
        from .generation import TextEncoderSession

        return TextEncoderSession(args, version, device, dtype, keep_on)

    def cache_text_encoder(self, args, version: ModelVersion, device, dtype):
        from ..memory.fp8 import quantize_text_encoder
        from .text_encoder import encode_prompts, load_processor, load_text_encoder, load_tokenizer

        processor = load_processor(load_tokenizer(args.tokenizer, args.text_encoder), args.tokenizer,
                                   args.text_encoder)
        te = load_text_encoder(args.text_encoder, dtype, device)
        if args.fp8_vl:
            quantize_text_encoder(te, device)

        def encode(captions: list[str], images=None):
            embeds = encode_prompts(te, processor, captions, version.template, device, [images] if images else None)
            return [(e, {}) for e in embeds]

        return encode

    # training
    def target_latents(self, batch: dict, version: ModelVersion, args):
        from .loss import target_latents

        return target_latents(batch, version, args)

    def per_sample_loss(self, model, batch: dict, version: ModelVersion, args, t, noise, device, dtype):
        from .loss import per_sample_loss

        return per_sample_loss(model, batch, version, args, t, noise, device, dtype)

    def plan_samples(self, args, version: ModelVersion, specs: list, cfg) -> list:
        from .generation import plan_training_samples

        return plan_training_samples(args, version, specs, cfg)

    # generation
    def check_generation_options(self, args, version: ModelVersion) -> None:
        pass

    def default_steps(self, args, version: ModelVersion) -> int:
        from .generation import DEFAULT_STEPS

        return DEFAULT_STEPS

    def check_spec(self, spec, version: ModelVersion) -> None:
        from .generation import check_spec

        check_spec(spec, version)

    def resolve_jobs(self, specs: list, args, version: ModelVersion) -> list:
        from .generation import resolve_controls

        return resolve_controls(specs, args, version)

    def encode_conditions(self, vae, jobs: list, version: ModelVersion) -> None:
        from .generation import encode_controls

        encode_controls(vae, jobs, version)

    def denoise(self, model, job, args, version: ModelVersion, device, dtype, progress: bool = True, debug_stem=None):
        from .generation import denoise

        return denoise(model, job.spec, job.encoded, device, dtype, version, job, args, progress=progress,
                       debug_stem=debug_stem)

    def accepts_file(self, info) -> bool:
        """A DiT, VAE or text-encoder file (qwen_image/model_files.py's ModelFile) of this family."""
        from ..qwen_image.model_files import QI

        return info.family == QI

    # LoRA files
    def linear_names(self, num_layers: int) -> list[str]:
        from .dit import linear_names

        return linear_names(num_layers)

    def recognizes_lora(self, metadata: dict, keys) -> bool:
        return metadata.get("ss_base_model_version", "").startswith("qwen_image") and \
            metadata.get("ss_base_model_version") != "qwen_image_2_1"


FAMILY = QwenImageFamily()
