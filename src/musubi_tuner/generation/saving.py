"""Saving what generation produces: PNGs (one per layer for layered), latent files, their metadata, and the loop that
saves each generation as soon as it is done (an interrupted prompt file keeps every finished image)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from ..errors import UserError
from ..fileio import save_image, save_safetensors
from ..models.version import ModelVersion
from ..qwen_image.vae import decode
from .prompts import GenerationSpec

logger = logging.getLogger(__name__)


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
    if version.layer_targets:
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


def save_results(results, args, version: ModelVersion, vae) -> list[Path]:
    saved = []
    if args.output_type in ("latent", "latent_images"):
        for lat, stem, spec in results:
            saved.append(save_safetensors({"latent": lat.contiguous()}, stem.with_name(stem.name + "_latent.safetensors"),
                                          result_metadata(spec, version, args)))
            logger.info("saved %s", saved[-1])
    if args.output_type in ("images", "latent_images"):
        saved += decode_and_save(vae, [(lat, stem) for lat, stem, _ in results], args.vae_enable_tiling,
                                 composite_first=not (version.layer_targets and trained_without_composite(args)),
                                 metadata=[result_metadata(spec, version, args) for _, _, spec in results])
    return saved


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
