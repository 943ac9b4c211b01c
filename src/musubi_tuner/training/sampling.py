"""Sample images during training with the inference code (same sampler, dynamic shift by default), for every model
version: edit prompts take control images with --ci (resized to the official ~1M-pixel size), layered prompts take
the image to decompose with --ci and the layer count with --f."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..errors import UserError
from ..qwen_image.generate import Job, decode_and_save, denoise, encode_all, encode_controls, resolve_controls
from ..qwen_image.prompts import GenerationSpec, read_prompt_file
from ..qwen_image.vae import load_vae
from ..qwen_image.versions import ModelVersion

logger = logging.getLogger(__name__)


def _generation_args(args, version: ModelVersion) -> argparse.Namespace:
    return argparse.Namespace(
        resize_control_to_official_size=version.is_edit, resize_control_to_image_size=False, mask_path=None,
        image_size=None, tokenizer=args.tokenizer, text_encoder=args.text_encoder, text_encoder_cpu=False)


def plan_samples(args, version: ModelVersion) -> list[Job]:
    """Read and check --sample_prompts (every line's values and control images) before any model loads, so a bad
    line is an error at the start, not at the first sampling step hours later."""
    defaults = GenerationSpec(prompt="", height=None if (version.is_edit or version.is_layered) else 256,
                              width=None if (version.is_edit or version.is_layered) else 256, steps=20,
                              guidance_scale=4.0, seed=42)
    specs = read_prompt_file(args.sample_prompts, defaults, training=True)
    for s in specs:
        if version.is_layered and not s.output_layers:
            s.output_layers = 4
        if s.height is None and not (version.is_edit or version.is_layered):
            s.height, s.width = 256, 256
        if s.control_images and not (version.is_edit or version.is_layered):
            raise UserError(f"--sample_prompts {args.sample_prompts}: --ci needs an edit or layered --model_version")
    return resolve_controls(specs, _generation_args(args, version), version)


class TrainingSampler:
    """Prompts (and control images) are encoded once before training and the text encoder is released; images go
    to <output_dir>/sample/ and to the trackers."""

    def __init__(self, args, version: ModelVersion, device: torch.device, dtype: torch.dtype, jobs: list[Job]):
        self.args, self.version, self.device, self.dtype, self.jobs = args, version, device, dtype, jobs
        self.specs = [j.spec for j in jobs]
        has_controls = any(j.prepared for j in self.jobs)
        encoded = encode_all(self.specs, _generation_args(args, version), version, device, dtype,
                             [j.controls for j in self.jobs] if has_controls else None)
        for job, enc in zip(self.jobs, encoded):
            job.encoded = enc
        self.vae = load_vae(args.vae, torch.float32 if device.type == "cpu" else dtype, device, version.vae_channels)
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
            lat = denoise(model, spec, job.encoded, self.device, self.dtype, self.version, job, progress=False)
            stem = self.folder / f"{self.args.output_name}_e{epoch:06d}_s{step:06d}_{i:02d}_{spec.seed}"
            paths = decode_and_save(self.vae, [(lat[0], stem)], tiling=False)
            saved += paths
            if accelerator is not None:
                for tracker in accelerator.trackers:
                    if tracker.name == "tensorboard":
                        import numpy as np
                        from PIL import Image

                        for k, p in enumerate(paths):
                            tracker.writer.add_image(f"sample/{i}" + (f"_layer{k}" if len(paths) > 1 else ""),
                                                     np.asarray(Image.open(p)), step, dataformats="HWC")
        logger.info("saved %d sample image(s) to %s", len(saved), self.folder)
        model.train(was_training)
        return saved
