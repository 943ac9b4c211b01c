"""Image generation with Qwen-Image-2.1 (text-to-image, and with condition images): the same command line, prompt
files, LoRA merging, fp8, block swap and outputs as the other versions, with 2.1's models and pipeline rules
(qwen_image/v21.py)."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import UserError
from ..dataset.items import load_image
from ..fileio import check_writable_folder
from ..memory.attention import check_attention, set_attention
from ..memory.placement import check_compile, load_dit_with_options
from . import v21
from .generate import (
    build_specs, check_models, compute_setup, decode_and_save, free_memory, generate_and_save, image_key,
    load_latent_files, negative_of, output_stem, quantize_text_encoder, save_merged_model, save_results,
)
from .model_files import expect
from .prompts import GenerationSpec
from .vae import encode
from .versions import ModelVersion

logger = logging.getLogger(__name__)

UNSUPPORTED = {"mask_path": "--mask_path", "rcm_threshold": "--rcm_threshold", "output_layers": "--output_layers",
               "split_attn": "--split_attn",
               "remove_first_image_from_target": "--remove_first_image_from_target"}


@dataclass
class Job21:
    spec: GenerationSpec
    conditions: list[Image.Image] = field(default_factory=list)  # RGBA, at their generation size
    cond: tuple | None = None
    uncond: tuple | None = None
    latents: list[torch.Tensor] = field(default_factory=list)


def check_options(args) -> None:
    for attr, option in UNSUPPORTED.items():
        if getattr(args, attr, None):
            raise UserError(f"{option} does not apply to --model_version 2.1 (not supported for it yet); leave it out")
    if args.output_resolution < 32 or args.output_resolution % 32:
        raise UserError(f"--output_resolution {args.output_resolution}: give a positive multiple of 32 (e.g. 1024)")


def resolve_jobs(specs: list[GenerationSpec], args) -> list[Job21]:
    """Condition images loaded and sized, every output size fixed, before any model loads."""
    jobs = []
    for s in specs:
        missing = [p for p in s.control_images if not Path(p).is_file()]
        if missing:
            raise UserError(f"--control_image_path: file not found: {missing[0]}")
        images = [load_image(Path(p), "RGBA") for p in s.control_images]
        given = (s.height, s.width) if s.height is not None else None
        s.height, s.width = v21.output_size(images, args.output_resolution, given)
        jobs.append(Job21(s, [v21.prepare_condition(im, args.output_resolution) for im in images]))
    return jobs


class TextEncoder21:
    """The Qwen3-VL encoder with its processor, loaded once (optionally kept in CPU memory between prompts);
    (embeddings, image-slot mask) cached per (text, condition images)."""

    def __init__(self, args, device, dtype, keep_on: torch.device | None = None):
        self.device = torch.device("cpu") if args.text_encoder_cpu else device
        self.processor = v21.load_processor(args.tokenizer, args.text_encoder)
        self.te = v21.load_text_encoder(args.text_encoder, torch.float32 if self.device.type == "cpu" else dtype,
                                        keep_on or self.device, tokenizer=self.processor.tokenizer)
        if getattr(args, "fp8_vl", False):
            quantize_text_encoder(self.te, self.device)
        self.cache: dict = {}

    def encode(self, text: str, images: list[Image.Image]):
        key = (text, tuple(image_key(im) for im in images))
        if key not in self.cache:
            e, m = v21.encode_prompts(self.te, self.processor, [text], images or None, self.device)[0]
            self.cache[key] = (e.float().cpu(), m.cpu())
        return self.cache[key]

    def encode_job(self, job: Job21) -> None:
        job.cond = self.encode(job.spec.prompt, job.conditions)
        if job.spec.guidance_scale > 1:
            job.uncond = self.encode(negative_of(job.spec), job.conditions)


def encode_jobs(jobs: list[Job21], args, device, dtype) -> None:
    """Each distinct (text, condition images) once; the text encoder is released before the DiT loads."""
    session = TextEncoder21(args, device, dtype)
    for job in jobs:
        session.encode_job(job)
    del session
    free_memory()


def encode_conditions(vae, jobs: list[Job21]) -> None:
    for job in jobs:
        job.latents = [encode(vae, v21.to_pixels(im)).float().cpu() for im in job.conditions]


def denoise_job(model, job: Job21, config: dict, sample_sigmas: list[float] | None, kv_cache: bool, device, dtype,
                progress: bool = True) -> torch.Tensor:
    """-> normalised latents (1, C, 1, h, w); the checkpoint's sample_sigmas when the steps are theirs."""
    s = job.spec
    steps = None if sample_sigmas and s.steps == len(sample_sigmas) else s.steps
    sigmas = v21.sigmas_for(steps, (s.height // v21.VAE_SCALE) * (s.width // v21.VAE_SCALE), config, sample_sigmas,
                            s.flow_shift)
    return v21.denoise(model, job.cond, s.height, s.width, s.resolved_seed(), sigmas, job.uncond, s.guidance_scale,
                       job.latents, kv_cache=kv_cache, device=device, dtype=dtype, progress=progress)


def run(args: argparse.Namespace, version: ModelVersion) -> list[Path]:
    check_options(args)
    if args.save_merged_model:
        return [save_merged_model(args, version)]
    device, dtype = compute_setup(args.device)
    vae_dtype = torch.float32 if device.type == "cpu" else dtype
    if not args.save_path:
        raise UserError("missing required option --save_path (the folder for the images / latents)")
    save_path = Path(args.save_path)
    check_writable_folder(save_path, "--save_path")
    if args.latent_path:
        if not args.vae:
            raise UserError("--latent_path needs --vae to decode")
        expect(args.vae, "--vae", "vae", version)
        latents = load_latent_files(args.latent_path)
        vae = v21.load_vae(args.vae, vae_dtype, device)
        return decode_and_save(vae, [(lat, save_path / Path(p).stem.removesuffix("_latent"))
                                     for (lat, _), p in zip(latents, args.latent_path)], args.vae_enable_tiling)
    check_attention(args.attn_mode)
    check_compile(args)
    if args.interactive:
        if args.from_file:
            raise UserError("--interactive and --from_file cannot be used together")
        return interactive(args, version, device, dtype)
    specs = build_specs(args, version)
    jobs = resolve_jobs(specs, args)
    check_models(args, version, True)
    config, sample_sigmas = v21.scheduler_settings(args.dit)

    encode_jobs(jobs, args, device, dtype)
    vae = v21.load_vae(args.vae, vae_dtype, device)
    encode_conditions(vae, jobs)

    model, _ = load_dit_with_options(args, version, dtype, device)  # LoRAs merged, fp8, block swap
    set_attention(model, args.attn_mode, split_masked=False)

    def generate(i: int, job: Job21):
        s, t0 = job.spec, time.perf_counter()
        lat = denoise_job(model, job, config, sample_sigmas, not args.no_kv_cache, device, dtype)
        suffix = f"_{Path(s.control_images[0]).stem}" if args.append_original_name and s.control_images else ""
        logger.info("sample %d/%d: seed %d, %dx%d, %.2fs", i + 1, len(jobs), s.seed, s.width, s.height,
                    time.perf_counter() - t0)
        return lat[0], output_stem(save_path, s.seed, i, len(jobs), suffix), s

    return generate_and_save(jobs, generate, args, version, vae)


def interactive(args, version: ModelVersion, device, dtype, read_line=None) -> list[Path]:
    """--interactive for 2.1: prompt lines (the --from_file syntax, --ci for condition images) generated one by one
    with the models loaded once; the text encoder waits in CPU memory while the DiT runs. Ctrl-D ends; a bad line is
    reported and the next one read."""
    from .generate import build_specs_from, console, console_defaults
    from .prompts import LINE_NAMES, check_spec, parse_prompt_line

    defaults = console_defaults(args, version)
    check_models(args, version, True)
    config, sample_sigmas = v21.scheduler_settings(args.dit)
    session = TextEncoder21(args, device, dtype, keep_on=torch.device("cpu"))
    vae = v21.load_vae(args.vae, torch.float32 if device.type == "cpu" else dtype, device)
    model, _ = load_dit_with_options(args, version, dtype, device)
    set_attention(model, args.attn_mode, split_masked=False)

    def generate_line(line: str) -> list[Path]:
        spec = parse_prompt_line(line, defaults, "prompt")
        check_spec(spec, "prompt", LINE_NAMES)
        job = resolve_jobs(build_specs_from(args, version, [spec]), args)[0]
        session.te.to(session.device)
        session.encode_job(job)
        session.te.to("cpu")
        free_memory()
        encode_conditions(vae, [job])
        lat = denoise_job(model, job, config, sample_sigmas, not args.no_kv_cache, device, dtype)
        return save_results([(lat[0], output_stem(Path(args.save_path), spec.seed, 0, 1), spec)], args, version, vae)

    return console(generate_line, read_line, args.bell)
