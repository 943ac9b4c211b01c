"""Qwen-Image's part of the generation pipeline (generation/pipeline.py): jobs with their control images, the prompt
encoder (Qwen2.5-VL with the version's template; layered prompts left empty are captioned), reference latents and
the denoising loop with CFG, the layered schedule and inpainting / RCM anchoring for edit versions."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import UserError
from ..generation.encoding import image_key
from ..generation.prompts import GenerationSpec
from ..generation.specs import check_anchor_options, negative_of
from ..memory.fp8 import quantize_text_encoder
from ..models.version import ModelVersion
from . import edit as E
from . import latents as L
from .captioning import caption_image, caption_language, no_lm_head
from .denoise import predict_velocity
from .sampler import cfg_combine, flow_sigmas, layered_sigmas, sample
from .text_encoder import encode_prompts, load_processor, load_text_encoder, load_tokenizer
from .vae import encode
from .versions import is_edit, is_layered

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 25


@dataclass
class Encoded:
    cond: torch.Tensor
    uncond: torch.Tensor | None


@dataclass
class Job:
    """One generation with its resolved inputs."""

    spec: GenerationSpec
    controls: list[Image.Image] = field(default_factory=list)  # as loaded (the VL model sees these)
    prepared: list[Image.Image] = field(default_factory=list)  # sized for the VAE
    encoded: Encoded | None = None
    reference: torch.Tensor | None = None  # packed reference latents (1, N, 64)
    ref_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    first_control: torch.Tensor | None = None  # packed first control latent (inpainting / RCM)

    @property
    def has_conditions(self) -> bool:
        return bool(self.prepared)

    def vl_images(self, version: ModelVersion) -> list[Image.Image]:
        """What the text encoder sees: edit prompts read the control images as loaded; a layered prompt left empty is
        captioned from the image to decompose at its generation size (as the reference pipeline does)."""
        return self.prepared if is_layered(version) else self.controls


class TextEncoderSession:
    """The text encoder with its processor, loaded once; prompt embeddings are cached per (text, images)."""

    def __init__(self, args, version: ModelVersion, device, dtype, keep_on: torch.device | None = None):
        self.device = torch.device("cpu") if args.text_encoder_cpu else device
        te_dtype = torch.float32 if self.device.type == "cpu" else dtype
        self.version = version
        self.processor = load_processor(load_tokenizer(args.tokenizer, args.text_encoder), args.tokenizer,
                                        args.text_encoder)
        self.te = load_text_encoder(args.text_encoder, te_dtype, keep_on or self.device)
        if getattr(args, "fp8_vl", False):
            quantize_text_encoder(self.te, self.device)
        self.caption_language = getattr(args, "automatic_prompt_lang_for_layered", None)
        self.text_encoder_path = args.text_encoder
        self.cache: dict = {}

    def encode(self, text: str, imgs: list) -> torch.Tensor:
        key = (text, tuple(image_key(im) for im in imgs))
        if key not in self.cache:
            self.cache[key] = encode_prompts(self.te, self.processor, [text], self.version.template, self.device,
                                             [imgs] if imgs and is_edit(self.version) else None)[0].to("cpu",
                                                                                                       torch.float32)
        return self.cache[key]

    def caption(self, spec: GenerationSpec, image: Image.Image) -> None:
        """A layered prompt left empty becomes the caption of the image to decompose (once per image)."""
        lang = caption_language(self.caption_language)
        key = ("caption", image_key(image), lang)
        if key not in self.cache:
            if not self.te.has_lm_head:  # what the loader found (no second read of the file)
                raise no_lm_head(self.text_encoder_path)
            self.cache[key] = caption_image(self.te, self.processor, image, lang, self.device)
        spec.prompt, spec.caption_language = self.cache[key], lang
        print(f"automatic caption ({lang}) of {spec.control_images[0] if spec.control_images else 'the image'}: "
              f"{spec.prompt}")

    def encode_spec(self, spec: GenerationSpec, imgs: list) -> Encoded:
        if is_layered(self.version) and not spec.prompt.strip():
            if not imgs:
                raise UserError("a layered prompt without text needs the image to decompose (--control_image_path / "
                                "--ci) to caption")
            self.caption(spec, imgs[0])
        neg = self.encode(negative_of(spec), imgs) if spec.guidance_scale != 1 else None
        return Encoded(self.encode(spec.prompt, imgs), neg)

    def encode_job(self, job: Job) -> None:
        job.encoded = self.encode_spec(job.spec, job.vl_images(self.version))


@torch.no_grad()
def denoise(model, spec: GenerationSpec, enc: Encoded, device, dtype, version: ModelVersion | None = None,
            job: Job | None = None, anchor_args=None, progress: bool = True, debug_stem: Path | None = None
            ) -> torch.Tensor:
    """One sample -> normalised latents (1, 16, F, h, w) in float32 (F = layers + 1 for layered, else 1)."""
    layered = version is not None and is_layered(version)
    frames = (spec.output_layers or 1) + 1 if layered else 1
    lh, lw = L.latent_hw(spec.height, spec.width)
    noise = L.pack(L.initial_noise(spec.resolved_seed(), lh, lw, frames)).to(device, torch.float32)
    x = noise.to(dtype)
    img_shapes = [(1, lh // 2, lw // 2)] * frames + (job.ref_shapes if job else [])
    reference = job.reference.to(device, dtype) if job is not None and job.reference is not None else None
    if layered:
        sigmas = layered_sigmas(spec.steps, job.reference.shape[1])
    else:
        sigmas = flow_sigmas(spec.steps, x.shape[1], spec.flow_shift)
    extra = torch.zeros(1, dtype=torch.long, device=device) if version is not None and version.additional_t_cond else None
    cond = enc.cond.unsqueeze(0).to(device)
    uncond = None if enc.uncond is None else enc.uncond.unsqueeze(0).to(device)

    def velocity(latents, sigma, _i):
        v = predict_velocity(model, latents, sigma, cond, None, img_shapes, reference, extra)
        if uncond is None:
            return v
        v_neg = predict_velocity(model, latents, sigma, uncond, None, img_shapes, reference, extra)
        return cfg_combine(v, v_neg, spec.guidance_scale, rescale=not layered)

    anchor = make_anchor(spec, job, anchor_args, noise, sigmas, (lh, lw), debug_stem)
    x = sample(velocity, x, sigmas, progress=progress, before_step=anchor)
    if anchor is not None:
        x = anchor.finish(x)
    return L.unpack(x.float().cpu(), lh, lw, frames)


def make_anchor(spec, job, a, noise, sigmas, latent_hw, debug_stem) -> E.Anchor | None:
    if a is None or job is None or job.first_control is None:
        return None
    rcm = spec.rcm_threshold
    if not spec.mask_path and rcm is None:
        return None
    mask = E.load_mask(spec.mask_path, *latent_hw) if spec.mask_path else None
    return E.Anchor(job.first_control.float(), noise.cpu(), sigmas, latent_hw, change_mask=mask,
                    rcm_threshold=rcm, rcm_relative=spec.rcm_relative, rcm_kernel_size=spec.rcm_kernel_size,
                    rcm_dilate_size=spec.rcm_dilate_size, debug_stem=debug_stem if a.rcm_debug_save else None)


def check_spec(s: GenerationSpec, version: ModelVersion) -> None:
    """Version rules on a spec: sizes, layer counts, mask / RCM only for edit versions."""
    if not (is_edit(version) or is_layered(version)):
        if s.control_images:
            raise UserError(f"--control_image_path needs an edit or layered --model_version (got {version.name})")
        if s.height is None:
            s.height, s.width = 1024, 1024
        L.check_image_size(s.height, s.width)
    if is_layered(version) and not s.output_layers:
        s.output_layers = 4
    check_anchor_options(s, is_edit(version))


def resolve_controls(specs: list[GenerationSpec], args, version: ModelVersion) -> list[Job]:
    """Load and size every control image and fix each output size, before any model is loaded."""
    mode = E.control_mode(args)
    jobs = []
    for s in specs:
        job = Job(s)
        if is_edit(version) or is_layered(version):
            E.check_controls(version, len(s.control_images), mode,
                             advise=not getattr(args, "control_sizing_recommended", False))
            job.controls = E.load_controls(s.control_images, version)
            if s.height is None:
                if mode == "image":
                    raise UserError("--resize_control_to_image_size needs --image_size")
                s.height, s.width = E.default_output_hw(version, job.controls[0], mode)
            L.check_image_size(s.height, s.width)
            cmode = "image" if is_layered(version) and mode == "native" and args.image_size is None else mode
            job.prepared = [E.prepare_control(c, cmode, (s.height, s.width)) for c in job.controls]
            if (s.mask_path or s.rcm_threshold is not None) and job.prepared[0].size != (s.width, s.height):
                raise UserError(
                    f"--mask_path / RCM need the first control image at the output size {s.width}x{s.height}, but "
                    f"{s.control_images[0]} becomes {job.prepared[0].size[0]}x{job.prepared[0].size[1]}; pass "
                    "--resize_control_to_image_size or a matching --image_size")
        jobs.append(job)
    return jobs


def encode_controls(vae, jobs: list[Job], version: ModelVersion) -> None:
    for job in jobs:
        if not job.prepared:
            continue
        from ..dataset.buckets import to_tensor

        lats = [encode(vae, to_tensor(im).unsqueeze(0)).float().cpu() for im in job.prepared]
        job.reference = torch.cat([L.pack(x) for x in lats], dim=1)
        job.ref_shapes = [(1, x.shape[-2] // 2, x.shape[-1] // 2) for x in lats]
        job.first_control = L.pack(lats[0])


def plan_training_samples(args, version: ModelVersion, specs: list[GenerationSpec], cfg) -> list[Job]:
    """--sample_prompts jobs sized like the training data: text-to-image at the dataset's resolution; edit and
    layered at the bucket of the first --ci image, controls prepared as the dataset prepares them."""
    from ..dataset.buckets import resize_crop, select_bucket
    from ..dataset.prepare import prepare_control

    jobs = []
    for i, s in enumerate(specs, 1):
        where = f"--sample_prompts {args.sample_prompts}: prompt {i}"
        if is_layered(version) and not s.output_layers:
            s.output_layers = 4
        job = Job(s)
        if is_edit(version) or is_layered(version):
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
        if is_layered(version):  # the image to decompose, as a layered dataset prepares its composite
            job.prepared = [resize_crop(job.controls[0], bucket)]
        elif is_edit(version):
            job.prepared = [prepare_control(c, cfg, bucket) for c in job.controls]
        jobs.append(job)
    return jobs
