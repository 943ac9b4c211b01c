"""Qwen-Image-2.1's part of the generation pipeline (generation/pipeline.py): jobs with condition images sized by
--output_resolution, the Qwen3-VL prompt encoder with its image-slot masks, condition latents and the denoising call
with the checkpoint's schedule (modeling.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..dataset.items import load_image
from ..errors import UserError
from ..generation.encoding import image_key
from ..generation.prompts import GenerationSpec
from ..generation.specs import check_anchor_options, negative_of
from ..memory.fp8 import quantize_text_encoder
from ..qwen_image.vae import encode
from . import modeling as v21

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

    @property
    def has_conditions(self) -> bool:
        return bool(self.conditions)


def check_spec(s: GenerationSpec) -> None:
    if s.height is not None and (s.height % 32 or s.width % 32):
        raise UserError(f"--image_size / --h --w {s.height} {s.width}: Qwen-Image-2.1 needs multiples of 32; "
                        f"try {max(32, round(s.height / 32) * 32)} {max(32, round(s.width / 32) * 32)}")
    check_anchor_options(s, False)


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


def plan_training_samples(args, specs: list[GenerationSpec], cfg) -> list[Job21]:
    """--sample_prompts jobs: condition images (--ci, optional) prepared as the dataset prepares controls; sizes in
    multiples of 32, by default the dataset's bucket of the last condition image (or its resolution)."""
    from ..dataset.buckets import select_bucket
    from ..dataset.prepare import prepare_control

    jobs = []
    for i, s in enumerate(specs, 1):
        where = f"--sample_prompts {args.sample_prompts}: prompt {i}"
        missing = [p for p in s.control_images if not Path(p).is_file()]
        if missing:
            raise UserError(f"{where}: control image not found: {missing[0]}")
        images = [load_image(Path(p), "RGBA") for p in s.control_images]
        if s.height is None or s.width is None:
            w, h = select_bucket(images[-1].size if images else cfg.resolution, cfg.resolution, cfg.enable_bucket,
                                 cfg.bucket_no_upscale, 32)
            s.width, s.height = s.width or w, s.height or h
        if s.height % 32 or s.width % 32:
            raise UserError(f"{where}: --w {s.width} --h {s.height}: Qwen-Image-2.1 needs multiples of 32")
        jobs.append(Job21(s, [prepare_control(im, cfg, (s.width, s.height), 32) for im in images]))
    return jobs
