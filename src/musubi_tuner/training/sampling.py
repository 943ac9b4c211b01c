"""Sample images during training with the inference code (same sampler, dynamic shift by default)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import save_image
from ..qwen_image.generate import Encoded, denoise, encode_all, to_pil
from ..qwen_image.prompts import GenerationSpec, read_prompt_file
from ..qwen_image.vae import decode, load_vae
from ..qwen_image.versions import ModelVersion

logger = logging.getLogger(__name__)


class TrainingSampler:
    """Prompts are encoded once before training (the text encoder is then released); images go to
    <output_dir>/sample/ and to the trackers."""

    def __init__(self, args, version: ModelVersion, device: torch.device, dtype: torch.dtype):
        if version.name != "original":
            raise UserError(f"--sample_prompts: sampling during training is not available yet for --model_version "
                            f"{version.name}; remove --sample_prompts")
        defaults = GenerationSpec(prompt="", height=256, width=256, steps=20, guidance_scale=4.0, seed=42)
        self.specs = read_prompt_file(args.sample_prompts, defaults)
        self.args, self.version, self.device, self.dtype = args, version, device, dtype
        self.encoded: list[Encoded] = encode_all(self.specs, _te_args(args), version, device, dtype)
        self.vae = None
        self.folder = Path(args.output_dir) / "sample"

    @torch.no_grad()
    def __call__(self, model, epoch: int, step: int, accelerator=None) -> list[Path]:
        was_training = model.training
        model.eval()
        if self.vae is None:
            self.vae = load_vae(self.args.vae, torch.float32 if self.device.type == "cpu" else self.dtype, self.device,
                                self.version.vae_channels)
        saved = []
        for i, (spec, enc) in enumerate(zip(self.specs, self.encoded)):
            lat = denoise(model, spec, enc, self.device, self.dtype, self.version, progress=False)
            image = to_pil(decode(self.vae, lat)[0, :, 0])
            path = self.folder / f"{self.args.output_name}_e{epoch:06d}_s{step:06d}_{i:02d}_{spec.seed}.png"
            saved.append(save_image(image, path))
            if accelerator is not None:
                for tracker in accelerator.trackers:
                    if tracker.name == "tensorboard":
                        import numpy as np

                        tracker.writer.add_image(f"sample/{i}", np.asarray(image), step, dataformats="HWC")
        logger.info("saved %d sample image(s) to %s", len(saved), self.folder)
        model.train(was_training)
        return saved


def _te_args(args):
    import argparse

    return argparse.Namespace(tokenizer=args.tokenizer, text_encoder=args.text_encoder,
                              text_encoder_cpu=getattr(args, "text_encoder_cpu", False))
