"""Sample images during training with the inference code (same sampler, dynamic shift by default), for every model
version, with the training data's sizes: a prompt without --w/--h gets the size its training images get (text-to-
image: the dataset's resolution; edit and layered: the bucket of the first --ci image at that resolution), and edit
controls are prepared as the dataset prepares them (the target's size, control_resolution or no_resize_control).
Layered prompts take the image to decompose with --ci and the layer count with --f; a layered line without text is
captioned by the text encoder once, before training, and that caption is used at every sampling step."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..dataset.buckets import resize_crop, select_bucket
from ..dataset.config import DatasetConfig
from ..dataset.prepare import prepare_control
from ..errors import UserError
from ..fileio import DTYPE_NAMES
from ..qwen_image import edit as E
from ..qwen_image.generate import (Job, check_captioning, decode_and_save, denoise, encode_all, encode_controls,
                                   frame_names, spec_metadata)
from ..qwen_image.prompts import GenerationSpec, read_prompt_file
from ..qwen_image.vae import load_vae
from ..qwen_image.versions import ModelVersion

logger = logging.getLogger(__name__)


def _generation_args(args) -> argparse.Namespace:
    return argparse.Namespace(tokenizer=args.tokenizer, text_encoder=args.text_encoder, text_encoder_cpu=False,
                              fp8_vl=getattr(args, "fp8_vl", False),
                              automatic_prompt_lang_for_layered=getattr(args, "automatic_prompt_lang_for_layered", None))


def plan_samples(args, version: ModelVersion, cfg: DatasetConfig) -> list[Job]:
    """Read and check --sample_prompts (every line's values and control images) and size every sample like the
    training data of `cfg`, before any model loads, so a bad line is an error at the start, not at the first
    sampling step hours later."""
    from ..qwen_image.recommended import sample_defaults

    defaults = GenerationSpec(prompt="", height=None, width=None, steps=20,
                              guidance_scale=1.0 if version.is_v21 else 4.0, seed=42)
    for attr, value in sample_defaults(args).items():  # what the DiT file recommends (nano models: CFG 1)
        setattr(defaults, attr, value)
    specs = read_prompt_file(args.sample_prompts, defaults, training=True, allow_empty=version.is_layered)
    check_captioning(args, specs)
    if version.is_v21:
        return plan_v21_samples(args, specs, cfg)
    jobs = []
    for i, s in enumerate(specs, 1):
        where = f"--sample_prompts {args.sample_prompts}: prompt {i}"
        if version.is_layered and not s.output_layers:
            s.output_layers = 4
        job = Job(s)
        if version.is_edit or version.is_layered:
            E.check_controls(version, len(s.control_images), "official", where=where)
            job.controls = E.load_controls(s.control_images, version)
            first = job.controls[0].size
        elif s.control_images:
            raise UserError(f"{where}: --ci needs an edit or layered --model_version")
        else:
            first = cfg.resolution
        if s.height is None or s.width is None:
            w, h = select_bucket(first, cfg.resolution, cfg.enable_bucket, cfg.bucket_no_upscale)
            s.width, s.height = s.width or w, s.height or h
        bucket = (s.width, s.height)
        if version.is_layered:  # the image to decompose, as a layered dataset prepares its composite
            job.prepared = [resize_crop(job.controls[0], bucket)]
        elif version.is_edit:
            job.prepared = [prepare_control(c, cfg, bucket) for c in job.controls]
        jobs.append(job)
    return jobs


def plan_v21_samples(args, specs: list[GenerationSpec], cfg: DatasetConfig) -> list:
    """2.1: condition images (--ci, optional) prepared as the dataset prepares controls; sizes in multiples of 32."""
    from ..dataset.items import load_image
    from ..qwen_image.generate_v21 import Job21

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


def vae_dtype(args, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """--vae_dtype, else the training dtype on a GPU and float32 on the CPU."""
    if getattr(args, "vae_dtype", None):
        return DTYPE_NAMES[args.vae_dtype]
    return torch.float32 if device.type == "cpu" else dtype


class TrainingSampler:
    """Prompts (and control images) are encoded once before training and the text encoder is released; images go
    to <output_dir>/sample/ and to the trackers."""

    def __init__(self, args, version: ModelVersion, device: torch.device, dtype: torch.dtype, jobs: list[Job]):
        self.args, self.version, self.device, self.dtype, self.jobs = args, version, device, dtype, jobs
        self.specs = [j.spec for j in jobs]
        if version.is_v21:
            from ..qwen_image import generate_v21, v21

            generate_v21.encode_jobs(jobs, _generation_args(args), device, dtype)
            self.vae = v21.load_vae(args.vae, vae_dtype(args, device, dtype), device)
            generate_v21.encode_conditions(self.vae, jobs)
            self.schedule = v21.scheduler_settings(args.dit)
            self.folder = Path(args.output_dir) / "sample"
            return
        has_controls = any(j.prepared for j in self.jobs)
        encoded = encode_all(self.specs, _generation_args(args), version, device, dtype,
                             [j.vl_images(version) for j in self.jobs] if has_controls else None)
        for job, enc in zip(self.jobs, encoded):
            job.encoded = enc
        self.vae = load_vae(args.vae, vae_dtype(args, device, dtype), device, version.vae_channels)
        if has_controls:
            encode_controls(self.vae, self.jobs, version)
        self.folder = Path(args.output_dir) / "sample"

    @torch.no_grad()
    def __call__(self, model, epoch: int, step: int, accelerator=None) -> list[Path]:
        was_training = model.training
        model.eval()
        saved = []
        for i, job in enumerate(self.jobs):
            spec = job.spec
            if self.version.is_v21:
                from ..qwen_image.generate_v21 import denoise_job

                lat = denoise_job(model, job, *self.schedule, True, self.device, self.dtype, progress=False)
            else:
                lat = denoise(model, spec, job.encoded, self.device, self.dtype, self.version, job, progress=False)
            stem = self.folder / f"{self.args.output_name}_e{epoch:06d}_s{step:06d}_{i:02d}_{spec.seed}"
            composite_first = not self.args.remove_first_image_from_target
            try:
                paths = decode_and_save(self.vae, [(lat[0], stem)], tiling=False, composite_first=composite_first,
                                        metadata=[{**spec_metadata(spec, self.version), "step": str(step)}])
            except UserError as e:  # a broken sample must not stop the training run
                logger.warning("sample %d at step %d: %s", i, step, e)
                continue
            saved += paths
            if accelerator is not None:
                for tracker in accelerator.trackers:
                    if tracker.name == "tensorboard":
                        import numpy as np
                        from PIL import Image

                        for suffix, p in zip(frame_names(len(paths), composite_first), paths):
                            tracker.writer.add_image(f"sample/{i}{suffix}", np.asarray(Image.open(p)), step,
                                                     dataformats="HWC")
        logger.info("saved %d sample image(s) to %s", len(saved), self.folder)
        model.train(was_training)
        return saved
