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

from ..dataset.config import DatasetConfig
from ..errors import UserError
from ..fileio import DTYPE_NAMES
from ..generation.pipeline import encode_prompts
from ..generation.prompts import GenerationSpec, read_prompt_file
from ..generation.saving import decode_and_save, frame_names, spec_metadata
from ..generation.specs import check_captioning
from ..models.registry import family_of
from ..models.version import ModelVersion

logger = logging.getLogger(__name__)


def _generation_args(args) -> argparse.Namespace:
    return argparse.Namespace(tokenizer=args.tokenizer, text_encoder=args.text_encoder, text_encoder_cpu=False,
                              fp8_vl=getattr(args, "fp8_vl", False),
                              automatic_prompt_lang_for_layered=getattr(args, "automatic_prompt_lang_for_layered", None))


def plan_samples(args, version: ModelVersion, cfg: DatasetConfig) -> list:
    """Read and check --sample_prompts (every line's values and control images) and size every sample like the
    training data of `cfg`, before any model loads, so a bad line is an error at the start, not at the first
    sampling step hours later."""
    from ..generation.recommended import sample_defaults

    defaults = GenerationSpec(prompt="", height=None, width=None, steps=20, guidance_scale=version.default_guidance,
                              seed=42)
    for attr, value in sample_defaults(args).items():  # what the DiT file recommends (nano models: CFG 1)
        setattr(defaults, attr, value)
    specs = read_prompt_file(args.sample_prompts, defaults, training=True, allow_empty=version.layer_targets)
    check_captioning(args, specs)
    return family_of(version).plan_samples(args, version, specs, cfg)


def vae_dtype(args, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """--vae_dtype, else the training dtype on a GPU and float32 on the CPU."""
    if getattr(args, "vae_dtype", None):
        return DTYPE_NAMES[args.vae_dtype]
    return torch.float32 if device.type == "cpu" else dtype


class TrainingSampler:
    """Prompts (and control images) are encoded once before training and the text encoder is released; images go
    to <output_dir>/sample/ and to the trackers."""

    def __init__(self, args, version: ModelVersion, device: torch.device, dtype: torch.dtype, jobs: list):
        self.args, self.version, self.device, self.dtype, self.jobs = args, version, device, dtype, jobs
        self.family = family_of(version)
        encode_prompts(jobs, _generation_args(args), version, device, dtype)
        self.vae = self.family.load_vae(args.vae, version, vae_dtype(args, device, dtype), device)
        if any(j.has_conditions for j in jobs):
            self.family.encode_conditions(self.vae, jobs, version)
        self.folder = Path(args.output_dir) / "sample"

    @torch.no_grad()
    def __call__(self, model, epoch: int, step: int, accelerator=None) -> list[Path]:
        was_training = model.training
        model.eval()
        saved = []
        for i, job in enumerate(self.jobs):
            spec = job.spec
            lat = self.family.denoise(model, job, self.args, self.version, self.device, self.dtype, progress=False)
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
