"""Image generation: encode prompts, denoise with the DiT, decode with the VAE, save.

Models are used one after another (text encoder, then DiT, then VAE) and released in between, so peak memory is
one model at a time.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from ..errors import UserError
from ..fileio import save_image, save_safetensors
from ..networks.lora_files import linear_module_names, load_lora, merge_lora
from . import latents as L
from .denoise import predict_velocity
from .dit import load_dit
from .prompts import GenerationSpec, read_prompt_file
from .sampler import cfg_combine, flow_sigmas, sample
from .text_encoder import encode_prompts, load_text_encoder, load_tokenizer
from .vae import decode, load_vae
from .versions import ModelVersion

logger = logging.getLogger(__name__)

ATTN_BACKENDS = {"torch": "_native_math", "sdpa": "native", "xformers": "xformers", "flash": "flash", "sageattn": "sage"}


def set_attention(model, attn_mode: str) -> None:
    backend = ATTN_BACKENDS[attn_mode]
    if backend == "native":
        return  # diffusers' default dispatch (torch SDPA)
    try:
        model.set_attention_backend(backend)
    except (ImportError, RuntimeError, ValueError) as e:
        raise UserError(f"--attn_mode {attn_mode}: backend not usable here ({str(e).splitlines()[0]}); "
                        f"install it or use --attn_mode sdpa") from None


def compute_setup(device: str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


@dataclass
class Encoded:
    cond: torch.Tensor
    uncond: torch.Tensor | None


def encode_all(specs: list[GenerationSpec], args, version: ModelVersion, device, dtype) -> list[Encoded]:
    te_device = torch.device("cpu") if args.text_encoder_cpu else device
    te_dtype = torch.float32 if te_device.type == "cpu" else dtype
    tokenizer = load_tokenizer(args.tokenizer, args.text_encoder)
    te = load_text_encoder(args.text_encoder, te_dtype, te_device)
    texts = sorted({s.prompt for s in specs} | {negative_of(s) for s in specs if s.guidance_scale > 1})
    cache = {}
    for t in texts:
        cache[t] = encode_prompts(te, tokenizer, [t], version.template, te_device)[0].to("cpu", torch.float32)
    del te
    free_memory()
    return [Encoded(cache[s.prompt], cache[negative_of(s)] if s.guidance_scale > 1 else None) for s in specs]


def negative_of(spec: GenerationSpec) -> str:
    return spec.negative_prompt if spec.negative_prompt else " "


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def denoise_t2i(model, spec: GenerationSpec, enc: Encoded, device, dtype, progress: bool = True) -> torch.Tensor:
    """One text-to-image sample -> normalised latents (1, 16, 1, h, w) in float32."""
    lh, lw = L.latent_hw(spec.height, spec.width)
    x = L.pack(L.initial_noise(spec.resolved_seed(), lh, lw)).to(device, dtype)
    img_shapes = [(1, lh // 2, lw // 2)]
    sigmas = flow_sigmas(spec.steps, x.shape[1], spec.flow_shift)
    cond = enc.cond.unsqueeze(0).to(device)
    uncond = None if enc.uncond is None else enc.uncond.unsqueeze(0).to(device)

    def velocity(latents, sigma, _i):
        v = predict_velocity(model, latents, sigma, cond, None, img_shapes)
        if uncond is None:
            return v
        v_neg = predict_velocity(model, latents, sigma, uncond, None, img_shapes)
        return cfg_combine(v, v_neg, spec.guidance_scale)

    x = sample(velocity, x, sigmas, progress=progress)
    return L.unpack(x.float().cpu(), lh, lw)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(C, H, W) in [-1, 1] -> 8-bit RGB(A) image."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGBA" if arr.shape[2] == 4 else "RGB")


def output_stem(save_path: Path, seed: int, index: int, total: int) -> Path:
    ts = time.strftime("%Y%m%d-%H%M%S")
    return save_path / (f"{ts}_{seed}" if total == 1 else f"{ts}_{index:03d}_{seed}")


def spec_metadata(spec: GenerationSpec, version: ModelVersion) -> dict[str, str]:
    return {
        "prompt": spec.prompt, "negative_prompt": spec.negative_prompt or "", "seed": str(spec.seed),
        "height": str(spec.height), "width": str(spec.width), "infer_steps": str(spec.steps),
        "guidance_scale": str(spec.guidance_scale), "flow_shift": "dynamic" if spec.flow_shift is None else str(spec.flow_shift),
        "model_version": version.name,
    }


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


def decode_and_save(vae, items: list[tuple[torch.Tensor, Path]], tiling: bool) -> list[Path]:
    if tiling:
        vae.enable_tiling()
    saved = []
    for lat, stem in items:
        pixels = decode(vae, lat.unsqueeze(0) if lat.ndim == 4 else lat)[0, :, 0]
        saved.append(save_image(to_pil(pixels), stem.with_suffix(".png")))
        logger.info("saved %s", saved[-1])
    return saved


def build_specs(args: argparse.Namespace) -> list[GenerationSpec]:
    defaults = GenerationSpec(
        prompt=args.prompt or "", negative_prompt=args.negative_prompt,
        height=args.image_size[0], width=args.image_size[1], steps=args.infer_steps,
        guidance_scale=args.guidance_scale, flow_shift=args.flow_shift, seed=args.seed,
    )
    if args.from_file:
        specs = read_prompt_file(args.from_file, defaults)
    elif args.prompt:
        specs = [defaults]
    else:
        raise UserError("give --prompt TEXT or --from_file FILE (or --latent_path to decode saved latents)")
    for s in specs:
        L.check_image_size(s.height, s.width)
        if s.steps < 1:
            raise UserError(f"--infer_steps must be >= 1, got {s.steps}")
    return specs


def run(args: argparse.Namespace, version: ModelVersion) -> list[Path]:
    device, dtype = compute_setup(args.device)
    save_path = Path(args.save_path)
    vae_needed = args.output_type in ("images", "latent_images")

    if args.latent_path:
        for n in ("vae",):
            if not getattr(args, n):
                raise UserError("--latent_path needs --vae to decode")
        latents = load_latent_files(args.latent_path)
        vae = load_vae(args.vae, torch.float32 if device.type == "cpu" else dtype, device, version.vae_channels)
        items = [(lat, save_path / (Path(p).stem.removesuffix("_latent"))) for (lat, _), p in zip(latents, args.latent_path)]
        return decode_and_save(vae, items, args.vae_enable_tiling)

    specs = build_specs(args)
    for n in ("dit", "text_encoder") + (("vae",) if vae_needed else ()):
        if not getattr(args, n):
            raise UserError(f"missing required option --{n}")
        if not Path(getattr(args, n)).exists():
            raise UserError(f"--{n}: file not found: {getattr(args, n)}")
    for lw in args.lora_weight or []:
        if not Path(lw).exists():
            raise UserError(f"--lora_weight: file not found: {lw}")
    multipliers = list(args.lora_multiplier or [1.0])
    if args.lora_weight and len(multipliers) not in (1, len(args.lora_weight)):
        raise UserError(f"--lora_multiplier: give one value or one per --lora_weight ({len(args.lora_weight)})")

    encoded = encode_all(specs, args, version, device, dtype)

    model = load_dit(args.dit, version, dtype, device, disable_mmap=args.disable_numpy_memmap)
    set_attention(model, args.attn_mode)
    names = linear_module_names(model)
    for i, lw in enumerate(args.lora_weight or []):
        m = multipliers[i] if len(multipliers) > 1 else multipliers[0]
        n = merge_lora(model, load_lora(lw, names), m)
        logger.info("merged LoRA %s (%d modules) x %.3g", lw, n, m)

    results = []
    for i, (spec, enc) in enumerate(zip(specs, encoded)):
        t0 = time.perf_counter()
        lat = denoise_t2i(model, spec, enc, device, dtype)
        logger.info("sample %d/%d: seed %d, %dx%d, %d steps, %.2fs", i + 1, len(specs), spec.seed, spec.width,
                    spec.height, spec.steps, time.perf_counter() - t0)
        results.append((lat[0], output_stem(save_path, spec.seed, i, len(specs)), spec))
    del model
    free_memory()

    saved = []
    if args.output_type in ("latent", "latent_images"):
        for lat, stem, spec in results:
            saved.append(save_safetensors({"latent": lat.contiguous()}, stem.with_name(stem.name + "_latent.safetensors"),
                                          spec_metadata(spec, version)))
            logger.info("saved %s", saved[-1])
    if vae_needed:
        vae = load_vae(args.vae, torch.float32 if device.type == "cpu" else dtype, device, version.vae_channels)
        saved += decode_and_save(vae, [(lat, stem) for lat, stem, _ in results], args.vae_enable_tiling)
    return saved
