"""Image generation for every model version: encode prompts (with control images for edit), encode control images
with the VAE, denoise with the DiT, decode, save.

The text encoder runs first and is released before the DiT loads, so peak memory is about one large model at a
time; the (small) VAE encodes the controls, then stays loaded beside the DiT and decodes each image as soon as it is
denoised, so an interrupted prompt file keeps every finished image.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from ..errors import UserError
from ..fileio import check_writable_folder, save_image, save_safetensors
from ..memory.attention import check_attention, set_attention
from ..memory.placement import check_compile, load_dit_with_options
from ..networks.lora_files import check_multipliers
from . import edit as E
from . import latents as L
from .denoise import predict_velocity
from .model_files import expect
from .prompts import GenerationSpec, check_spec, read_prompt_file
from .sampler import cfg_combine, flow_sigmas, layered_sigmas, sample
from .captioning import caption_image, caption_language, check_caption_model, no_lm_head
from .text_encoder import encode_prompts, load_processor, load_text_encoder, load_tokenizer
from .vae import decode, encode, load_vae
from .versions import ModelVersion

logger = logging.getLogger(__name__)


def compute_setup(device: str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


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

    def vl_images(self, version: ModelVersion) -> list[Image.Image]:
        """What the text encoder sees: edit prompts read the control images as loaded; a layered prompt left empty is
        captioned from the image to decompose at its generation size (as the reference pipeline does)."""
        return self.prepared if version.is_layered else self.controls


def quantize_text_encoder(te, device) -> None:
    """--fp8_vl: fp8 (per-channel scaled) weights for the Linear layers of the language model and vision tower
    (Qwen2.5-VL, or 2.1's Qwen3-VL model whose names have no `model.`)."""
    from ..memory.fp8 import quantize_linears

    root = "model." if hasattr(te, "model") else ""
    errors = quantize_linears(te, prefix=root + "language_model.layers.", device=device)
    errors.update(quantize_linears(te, prefix=root + "visual.blocks.", device=device))
    logger.info("fp8_vl: %d Linear layers quantised (worst relative RMS error %.4f)", len(errors),
                max(errors.values(), default=0.0))


def negative_of(spec: GenerationSpec) -> str:
    return spec.negative_prompt if spec.negative_prompt else " "


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def image_key(image: Image.Image) -> tuple:
    """What identifies an image's content in the embedding caches. Not id(): a freed image's id is reused by the next
    one, which then got the cached embedding of another picture (the judge's edit scores changed between runs)."""
    import hashlib

    return image.mode, image.size, hashlib.sha1(image.tobytes()).hexdigest()


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
                                             [imgs] if imgs and self.version.is_edit else None)[0].to("cpu",
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
        if self.version.is_layered and not spec.prompt.strip():
            if not imgs:
                raise UserError("a layered prompt without text needs the image to decompose (--control_image_path / "
                                "--ci) to caption")
            self.caption(spec, imgs[0])
        neg = self.encode(negative_of(spec), imgs) if spec.guidance_scale != 1 else None
        return Encoded(self.encode(spec.prompt, imgs), neg)


def encode_all(specs: list[GenerationSpec], args, version: ModelVersion, device, dtype,
               images: list[list[Image.Image]] | None = None) -> list[Encoded]:
    """Prompt (and negative prompt, when CFG is on) embeddings of every spec; each distinct text+images once; the
    text encoder is released before the DiT loads."""
    session = TextEncoderSession(args, version, device, dtype)
    out = [session.encode_spec(s, images[i] if images else []) for i, s in enumerate(specs)]
    del session
    free_memory()
    return out


@torch.no_grad()
def denoise(model, spec: GenerationSpec, enc: Encoded, device, dtype, version: ModelVersion | None = None,
            job: Job | None = None, anchor_args=None, progress: bool = True, debug_stem: Path | None = None
            ) -> torch.Tensor:
    """One sample -> normalised latents (1, 16, F, h, w) in float32 (F = layers + 1 for layered, else 1)."""
    layered = version is not None and version.is_layered
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


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(C, H, W) in [-1, 1] -> 8-bit RGB(A) image."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGBA" if arr.shape[2] == 4 else "RGB")


def output_stem(save_path: Path, seed: int, index: int, total: int, suffix: str = "") -> Path:
    ts = time.strftime("%Y%m%d-%H%M%S")
    return save_path / ((f"{ts}_{seed}" if total == 1 else f"{ts}_{index:03d}_{seed}") + suffix)


def spec_metadata(spec: GenerationSpec, version: ModelVersion) -> dict[str, str]:
    md = {
        "prompt": spec.prompt, "negative_prompt": spec.negative_prompt or "", "seed": str(spec.seed),
        "height": str(spec.height), "width": str(spec.width), "infer_steps": str(spec.steps),
        "guidance_scale": str(spec.guidance_scale), "model_version": version.name,
        "flow_shift": "dynamic" if spec.flow_shift is None else str(spec.flow_shift),
    }
    if spec.control_images:
        md["control_images"] = "|".join(spec.control_images)
    if spec.caption_language:
        md["automatic_caption"] = spec.caption_language
    return md


def result_metadata(spec: GenerationSpec, version: ModelVersion, args) -> dict[str, str]:
    """What a latent file or PNG records of its generation; nothing with --no_metadata."""
    if args.no_metadata:
        return {}
    md = spec_metadata(spec, version)
    if version.is_layered:
        md["remove_first_image_from_target"] = str(trained_without_composite(args))
    return md


def load_latent_files(paths: list[str]) -> list[tuple[torch.Tensor, dict[str, str]]]:
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"--latent_path: file not found: {p}")
        try:
            with safe_open(p, framework="pt") as f:
                out.append((f.get_tensor("latent").float(), f.metadata() or {}))
        except Exception as e:
            raise UserError(f"--latent_path: {p} is not a latent file written by this tool ({type(e).__name__})") from None
    return out


def frame_names(frames: int, composite_first: bool = True) -> list[str]:
    """File-name suffixes of the frames of a layered generation: `_composite`, `_layer1` ... `_layerN`; a model trained
    with --remove_first_image_from_target generates layers only (`_layer1` ...)."""
    if frames == 1:
        return [""]
    if composite_first:
        return ["_composite"] + [f"_layer{k}" for k in range(1, frames)]
    return [f"_layer{k}" for k in range(1, frames + 1)]


LATENT_LIMIT = 1e4  # normalised latents are about N(0, 1); beyond this the image can only be black, white or noise


def check_latents(lat: torch.Tensor, what: str) -> None:
    """Denoised latents must be finite and of a sane size before they are decoded: otherwise the image would be
    silently black (NaN) or saturated noise. One line naming the likely causes."""
    finite = torch.isfinite(lat)
    if not bool(finite.all()):
        problem = "not finite (NaN or inf)"
    else:
        peak = float(lat.abs().max())
        if peak <= LATENT_LIMIT:
            return
        problem = f"absurdly large (max |value| {peak:.3g}, normally below 10)"
    raise UserError(f"{what}: the denoised latents are {problem}, so no image was written for it; likely causes: a "
                    "--lora_multiplier far too large, a LoRA file with broken (huge) weights, or a guidance scale far "
                    "too high")


def decode_and_save(vae, items: list[tuple[torch.Tensor, Path]], tiling: bool, composite_first: bool = True,
                    metadata: list[dict[str, str]] | None = None) -> list[Path]:
    """Latents (16, F, h, w) -> one PNG, or one RGBA PNG per frame named by what it holds (frame_names); `metadata`
    (one dict per item, e.g. the prompt and seed) goes into each PNG's text chunks. Latents that are not finite or
    absurdly large are refused (check_latents) instead of becoming a black image."""
    if tiling:
        vae.enable_tiling()
    saved = []
    for i, (lat, stem) in enumerate(items):
        check_latents(lat, stem.name)
        lat = lat.unsqueeze(0) if lat.ndim == 4 else lat
        names = frame_names(lat.shape[2], composite_first)
        for f, suffix in enumerate(names):
            pixels = decode(vae, lat[:, :, f:f + 1])[0, :, 0]
            saved.append(save_image(to_pil(pixels), stem.with_name(stem.name + suffix + ".png"),
                                    text=metadata[i] if metadata else None))
            logger.info("saved %s", saved[-1])
    return saved


def trained_without_composite(args) -> bool:
    """--remove_first_image_from_target, or a --lora_weight whose metadata records it."""
    if getattr(args, "remove_first_image_from_target", False):
        return True
    for lw in getattr(args, "lora_weight", None) or []:
        try:
            with safe_open(str(lw), framework="pt") as f:
                if (f.metadata() or {}).get("ss_remove_first_image_from_target") == "True":
                    logger.info("%s was trained with --remove_first_image_from_target: every output frame is a "
                                "layer", lw)
                    return True
        except Exception:
            continue
    return False


def default_steps(args, version: ModelVersion) -> int:
    """25; 2.1: as many as the checkpoint's sample_sigmas (which are then used), else the pipeline's 40."""
    if not version.is_v21:
        return 25
    from .v21 import DEFAULT_STEPS, scheduler_settings

    sample_sigmas = scheduler_settings(args.dit)[1]
    return len(sample_sigmas) if sample_sigmas else DEFAULT_STEPS


def build_specs(args: argparse.Namespace, version: ModelVersion) -> list[GenerationSpec]:
    h, w = args.image_size if args.image_size else (None, None)
    defaults = GenerationSpec(
        prompt=args.prompt or "", negative_prompt=args.negative_prompt, height=h, width=w,
        steps=args.infer_steps if args.infer_steps is not None else default_steps(args, version),
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else 1.0 if version.is_v21 else 4.0,
        flow_shift=args.flow_shift, seed=args.seed,
        control_images=list(args.control_image_path or []), output_layers=args.output_layers,
        mask_path=args.mask_path, rcm_threshold=args.rcm_threshold, rcm_relative=args.rcm_relative_threshold,
        rcm_kernel_size=args.rcm_kernel_size, rcm_dilate_size=args.rcm_dilate_size,
    )
    check_spec(defaults)
    if args.from_file:
        specs = read_prompt_file(args.from_file, defaults, allow_empty=version.is_layered)
    elif args.prompt or (version.is_layered and args.control_image_path):  # layered: an empty prompt is captioned
        specs = [defaults]
    else:
        raise UserError("give --prompt TEXT, --from_file FILE or --interactive (or --latent_path to decode saved "
                        "latents)")
    specs = build_specs_from(args, version, specs)
    check_captioning(args, specs)
    return specs


def check_captioning(args, specs: list[GenerationSpec], option: str = "--text_encoder") -> None:
    """Prompts left empty (layered) are captioned by the text encoder: its file must hold the language-model head."""
    if any(not s.prompt.strip() for s in specs) and args.text_encoder:
        check_caption_model(args.text_encoder, option)


def build_specs_from(args: argparse.Namespace, version: ModelVersion, specs: list[GenerationSpec]
                     ) -> list[GenerationSpec]:
    """Version rules on each spec: sizes, layer counts, mask / RCM only for edit versions."""
    for s in specs:
        if version.is_v21:
            if s.height is not None and (s.height % 32 or s.width % 32):
                raise UserError(f"--image_size / --h --w {s.height} {s.width}: Qwen-Image-2.1 needs multiples of 32; "
                                f"try {max(32, round(s.height / 32) * 32)} {max(32, round(s.width / 32) * 32)}")
        elif not (version.is_edit or version.is_layered):
            if s.control_images:
                raise UserError(f"--control_image_path needs an edit or layered --model_version (got {version.name})")
            if s.height is None:
                s.height, s.width = 1024, 1024
            L.check_image_size(s.height, s.width)
        if version.is_layered and not s.output_layers:
            s.output_layers = 4
        if s.rcm_threshold is not None or s.mask_path:
            if not version.is_edit:
                raise UserError("--mask_path / --rcm_threshold work only with an edit --model_version "
                                "(edit, edit-2509, edit-2511)")
            if s.rcm_threshold is not None and s.mask_path:
                raise UserError("--mask_path and --rcm_threshold cannot be used together; choose one")
    return specs


def resolve_controls(specs: list[GenerationSpec], args, version: ModelVersion) -> list[Job]:
    """Load and size every control image and fix each output size, before any model is loaded."""
    mode = E.control_mode(args)
    jobs = []
    for s in specs:
        job = Job(s)
        if version.is_edit or version.is_layered:
            E.check_controls(version, len(s.control_images), mode,
                             advise=not getattr(args, "control_sizing_recommended", False))
            job.controls = E.load_controls(s.control_images, version)
            if s.height is None:
                if mode == "image":
                    raise UserError("--resize_control_to_image_size needs --image_size")
                s.height, s.width = E.default_output_hw(version, job.controls[0], mode)
            L.check_image_size(s.height, s.width)
            cmode = "image" if version.is_layered and mode == "native" and args.image_size is None else mode
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


def check_models(args, version: ModelVersion, needs_vae: bool) -> None:
    """Every model file is the right kind for its option (read from the headers), before any model loads."""
    from .model_files import expect

    for n in ("dit", "text_encoder") + (("vae",) if needs_vae else ()):
        if not getattr(args, n):
            raise UserError(f"missing required option --{n}")
    expect(args.dit, "--dit", "dit", version, num_layers=args.num_layers)
    expect(args.text_encoder, "--text_encoder", "text_encoder", version)
    if needs_vae:
        expect(args.vae, "--vae", "vae", version)
    for lw in args.lora_weight or []:
        expect(lw, "--lora_weight", "lora", version)
    check_multipliers(args.lora_multiplier, "--lora_multiplier")
    if args.lora_weight and len(args.lora_multiplier or [1.0]) not in (1, len(args.lora_weight)):
        raise UserError(f"--lora_multiplier: give one value or one per --lora_weight ({len(args.lora_weight)})")


def run(args: argparse.Namespace, version: ModelVersion) -> list[Path]:
    """The generation run of --model_version (2.1 has its own); --bell rings when it is done. Options left unset
    take the settings the DiT file recommends (recommended.py), then the tools' defaults."""
    from .recommended import apply_to_generation, read

    apply_to_generation(args, read(args.dit))
    if version.is_v21:
        from .generate_v21 import run as run_v21

        saved = run_v21(args, version)
    else:
        saved = run_qwen_image(args, version)
    ring(args.bell)
    return saved


def ring(bell: bool) -> None:
    if bell:
        print("\a", end="", flush=True)


def run_qwen_image(args: argparse.Namespace, version: ModelVersion) -> list[Path]:
    device, dtype = compute_setup(args.device)
    vae_dtype = torch.float32 if device.type == "cpu" else dtype
    if args.save_merged_model:
        return [save_merged_model(args, version)]
    if not args.save_path:
        raise UserError("missing required option --save_path (the folder for the images / latents)")
    save_path = Path(args.save_path)
    check_writable_folder(save_path, "--save_path")
    if args.latent_path:
        if not args.vae:
            raise UserError("--latent_path needs --vae to decode")
        expect(args.vae, "--vae", "vae", version)
        latents = load_latent_files(args.latent_path)
        vae = load_vae(args.vae, vae_dtype, device, version.vae_channels)
        items = [(lat, save_path / Path(p).stem.removesuffix("_latent")) for (lat, _), p in zip(latents, args.latent_path)]
        no_composite = any(md.get("remove_first_image_from_target") == "True" for _, md in latents)
        return decode_and_save(vae, items, args.vae_enable_tiling, composite_first=not no_composite)

    check_attention(args.attn_mode)
    check_compile(args)
    if args.interactive:
        if args.from_file:
            raise UserError("--interactive and --from_file cannot be used together")
        return interactive(args, version, device, dtype)
    specs = build_specs(args, version)
    jobs = resolve_controls(specs, args, version)
    has_controls = any(j.prepared for j in jobs)
    decode_images = args.output_type in ("images", "latent_images")
    check_models(args, version, decode_images or has_controls)

    encoded = encode_all(specs, args, version, device, dtype, [j.vl_images(version) for j in jobs] if has_controls
                         else None)
    for job, enc in zip(jobs, encoded):
        job.encoded = enc
    vae = None
    if has_controls:
        vae = load_vae(args.vae, vae_dtype, device, version.vae_channels)
        encode_controls(vae, jobs, version)

    if decode_images:  # loaded before the DiT (it is small) so that each image is written as soon as it is ready
        vae = vae or load_vae(args.vae, vae_dtype, device, version.vae_channels)
    model, _ = load_dit_with_options(args, version, dtype, device)  # merges --lora_weight as it loads
    set_attention(model, args.attn_mode)
    return generate_and_save(jobs, lambda i, job: generate_job(model, job, i, len(jobs), args, version, device, dtype),
                             args, version, vae)


def generate_and_save(jobs: list, generate: Callable, args, version: ModelVersion, vae) -> list[Path]:
    """Generate each job and save its latent / images at once, so that an interrupted prompt file (Ctrl-C, SIGTERM,
    a time limit, an error in a later prompt) keeps every finished image; one line says how many were saved."""
    import signal
    import sys
    import threading

    saved: list[Path] = []
    done, signum = 0, [signal.SIGINT]

    def on_sigterm(_signum, _frame):
        signum[0] = signal.SIGTERM
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for i, job in enumerate(jobs):
            saved += save_results([generate(i, job)], args, version, vae)
            done += 1
    except (KeyboardInterrupt, UserError) as e:
        kept = f"{done} of {len(jobs)} generations finished and saved" + (f" in {args.save_path}" if done else "")
        if isinstance(e, UserError):
            raise UserError(f"{e} ({kept})") from None
        print(f"interrupted: {kept}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum[0]) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return saved


def generate_job(model, job: Job, index: int, total: int, args, version: ModelVersion, device, dtype):
    """Denoise one job -> (latent (16, F, h, w), output stem, spec)."""
    spec = job.spec
    t0 = time.perf_counter()
    suffix = f"_{Path(spec.control_images[0]).stem}" if args.append_original_name and spec.control_images else ""
    stem = output_stem(Path(args.save_path), spec.resolved_seed(), index, total, suffix)
    lat = denoise(model, spec, job.encoded, device, dtype, version, job, args, debug_stem=stem)
    logger.info("sample %d/%d: seed %d, %dx%d, %d steps, %.2fs", index + 1, total, spec.seed, spec.width,
                spec.height, spec.steps, time.perf_counter() - t0)
    return lat[0], stem, spec


def save_results(results, args, version: ModelVersion, vae) -> list[Path]:
    saved = []
    if args.output_type in ("latent", "latent_images"):
        for lat, stem, spec in results:
            saved.append(save_safetensors({"latent": lat.contiguous()}, stem.with_name(stem.name + "_latent.safetensors"),
                                          result_metadata(spec, version, args)))
            logger.info("saved %s", saved[-1])
    if args.output_type in ("images", "latent_images"):
        saved += decode_and_save(vae, [(lat, stem) for lat, stem, _ in results], args.vae_enable_tiling,
                                 composite_first=not (version.is_layered and trained_without_composite(args)),
                                 metadata=[result_metadata(spec, version, args) for _, _, spec in results])
    return saved


def save_merged_model(args, version: ModelVersion) -> Path:
    """--save_merged_model: the DiT with the --lora_weight files merged, in the DiT file's layout and precision (as
    merge_lora.py writes it); nothing is generated."""
    from ..tools.merge import merge_into_dit

    if not args.dit:
        raise UserError("missing required option --dit")
    return merge_into_dit(args.dit, args.lora_weight or [], args.lora_multiplier, args.save_merged_model, version,
                          None, getattr(args, "include_patterns", None), getattr(args, "exclude_patterns", None))


def interactive(args, version: ModelVersion, device, dtype, read_line=None) -> list[Path]:
    """--interactive: prompt lines from the console (the --from_file syntax), each generated and saved at once; the
    models stay loaded (the text encoder waits in CPU memory while the DiT runs). Ctrl-D (EOF) ends; Ctrl-C stops
    the current image only."""
    from .prompts import LINE_NAMES, parse_prompt_line

    defaults = console_defaults(args, version)
    check_models(args, version, True)
    vae_dtype = torch.float32 if device.type == "cpu" else dtype
    session = TextEncoderSession(args, version, device, dtype, keep_on=torch.device("cpu"))
    vae = load_vae(args.vae, vae_dtype, device, version.vae_channels)
    model, _ = load_dit_with_options(args, version, dtype, device)
    set_attention(model, args.attn_mode)

    def generate_line(line: str) -> list[Path]:
        spec = parse_prompt_line(line, defaults, "prompt", allow_empty=version.is_layered)
        check_spec(spec, "prompt", LINE_NAMES)
        one = argparse.Namespace(**{**vars(args), "prompt": spec.prompt, "from_file": None})
        spec = build_specs_from(one, version, [spec])[0]
        job = resolve_controls([spec], one, version)[0]
        session.te.to(session.device)
        job.encoded = session.encode_spec(spec, job.vl_images(version) if job.prepared else [])
        session.te.to("cpu")
        free_memory()
        if job.prepared:
            encode_controls(vae, [job], version)
        result = generate_job(model, job, 0, 1, args, version, device, dtype)
        return save_results([result], args, version, vae)

    return console(generate_line, read_line, args.bell)


def console_defaults(args, version: ModelVersion) -> GenerationSpec:
    """The spec that --interactive lines start from: the command line's settings and --prompt (a line that starts
    with a switch keeps that text; empty: layered captions the image)."""
    defaults = build_specs(argparse.Namespace(**{**vars(args), "prompt": args.prompt or "-", "from_file": None}),
                           version)[0]
    defaults.prompt = args.prompt or ""
    return defaults


def console(generate_line: Callable[[str], list[Path]], read_line=None, bell: bool = False) -> list[Path]:
    """The --interactive loop of every version: each non-empty line is generated and saved at once (--bell rings
    after each); a bad line (UserError) is reported and the next one read; Ctrl-D (EOF) ends; Ctrl-C stops the
    current image only."""
    saved: list[Path] = []
    print("Interactive mode: enter a prompt (with --w --h --d --s --l --n --ci ... switches); Ctrl-D ends.")
    while True:
        try:
            line = (read_line or input)("> ")
        except EOFError:
            print()
            break
        if not line.strip():
            continue
        try:
            saved += generate_line(line)
            ring(bell)
        except UserError as e:
            print(f"error: {e}")
        except KeyboardInterrupt:
            print("\ninterrupted; enter another prompt (Ctrl-D ends)")
    return saved
