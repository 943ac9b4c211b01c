"""The generation run of every model family, as one pipeline: specs and jobs are checked before any model loads,
prompts are encoded and the text encoder released, the VAE encodes the condition images, the DiT loads (LoRAs merged,
fp8, block swap) and each job is denoised and saved at once. The family (models/registry.py) fills in its jobs, prompt
encoder, conditions and denoising."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import check_writable_folder
from ..memory.attention import check_attention, set_attention
from ..memory.device import compute_setup, free_memory
from ..memory.placement import check_compile, load_dit_with_options
from ..models.registry import family_of
from ..models.version import ModelVersion
from ..networks.lora_files import check_multipliers
from .console import console, ring
from .prompts import LINE_NAMES, check_spec, parse_prompt_line
from .saving import decode_and_save, generate_and_save, load_latent_files, output_stem, save_results
from .specs import build_specs, build_specs_from, console_defaults

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace, version: ModelVersion) -> list[Path]:
    """--bell rings when it is done. Options left unset take the settings the DiT file recommends (recommended.py),
    then the tools' defaults."""
    from .recommended import apply_to_generation, read

    apply_to_generation(args, read(args.dit))
    family_of(version).check_generation_options(args, version)
    saved = _run(args, version)
    ring(args.bell)
    return saved


def _run(args: argparse.Namespace, version: ModelVersion) -> list[Path]:
    family = family_of(version)
    if args.save_merged_model:
        return [save_merged_model(args, version)]
    device, dtype = compute_setup(args.device)
    if not args.save_path:
        raise UserError("missing required option --save_path (the folder for the images / latents)")
    save_path = Path(args.save_path)
    check_writable_folder(save_path, "--save_path")
    if args.latent_path:
        return decode_latent_files(args, version, device, dtype)
    check_attention(args.attn_mode)
    check_compile(args)
    if args.interactive:
        if args.from_file:
            raise UserError("--interactive and --from_file cannot be used together")
        return interactive(args, version, device, dtype)
    specs = build_specs(args, version)
    jobs = family.resolve_jobs(specs, args, version)
    conditions = any(j.has_conditions for j in jobs)
    decode_images = args.output_type in ("images", "latent_images")
    check_models(args, version, decode_images or conditions)

    encode_prompts(jobs, args, version, device, dtype)
    vae = None
    if decode_images or conditions:  # loaded before the DiT (it is small): each image is written as soon as it is ready
        vae = family.load_vae(args.vae, version, vae_dtype(device, dtype), device)
    if conditions:
        family.encode_conditions(vae, jobs, version)
    model = load_model(args, version, device, dtype)  # merges --lora_weight as it loads
    return generate_and_save(jobs, lambda i, job: generate_one(model, job, i, len(jobs), args, version, device, dtype),
                             args, version, vae)


def vae_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else dtype


def decode_latent_files(args, version: ModelVersion, device, dtype) -> list[Path]:
    """--latent_path: saved latents decoded to PNGs (layered files say whether they hold a composite)."""
    from ..qwen_image.model_files import expect

    if not args.vae:
        raise UserError("--latent_path needs --vae to decode")
    expect(args.vae, "--vae", "vae", version)
    latents = load_latent_files(args.latent_path)
    vae = family_of(version).load_vae(args.vae, version, vae_dtype(device, dtype), device)
    items = [(lat, Path(args.save_path) / Path(p).stem.removesuffix("_latent"))
             for (lat, _), p in zip(latents, args.latent_path)]
    no_composite = any(md.get("remove_first_image_from_target") == "True" for _, md in latents)
    return decode_and_save(vae, items, args.vae_enable_tiling, composite_first=not no_composite)


def encode_prompts(jobs: list, args, version: ModelVersion, device, dtype) -> None:
    """Every job's prompt (and negative prompt when CFG is on) encoded, each distinct text + images once; the text
    encoder is released before the DiT loads."""
    session = family_of(version).prompt_encoder(args, version, device, dtype)
    for job in jobs:
        session.encode_job(job)
    del session
    free_memory()


def load_model(args, version: ModelVersion, device, dtype):
    model, _ = load_dit_with_options(args, version, dtype, device)  # LoRAs merged, fp8, block swap
    set_attention(model, args.attn_mode, **family_of(version).attention_options)
    return model


def generate_one(model, job, index: int, total: int, args, version: ModelVersion, device, dtype):
    """Denoise one job -> (latent (C, F, h, w), output stem, spec)."""
    spec = job.spec
    t0 = time.perf_counter()
    suffix = f"_{Path(spec.control_images[0]).stem}" if args.append_original_name and spec.control_images else ""
    stem = output_stem(Path(args.save_path), spec.resolved_seed(), index, total, suffix)
    lat = family_of(version).denoise(model, job, args, version, device, dtype, debug_stem=stem)
    logger.info("sample %d/%d: seed %d, %dx%d, %d steps, %.2fs", index + 1, total, spec.seed, spec.width,
                spec.height, spec.steps, time.perf_counter() - t0)
    return lat[0], stem, spec


def check_models(args, version: ModelVersion, needs_vae: bool) -> None:
    """Every model file is the right kind for its option (read from the headers), before any model loads."""
    from ..qwen_image.model_files import expect

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
    family = family_of(version)
    defaults = console_defaults(args, version)
    check_models(args, version, True)
    session = family.prompt_encoder(args, version, device, dtype, keep_on=torch.device("cpu"))
    vae = family.load_vae(args.vae, version, vae_dtype(device, dtype), device)
    model = load_model(args, version, device, dtype)

    def generate_line(line: str) -> list[Path]:
        spec = parse_prompt_line(line, defaults, "prompt", allow_empty=version.layer_targets)
        check_spec(spec, "prompt", LINE_NAMES)
        one = argparse.Namespace(**{**vars(args), "prompt": spec.prompt, "from_file": None})
        spec = build_specs_from(one, version, [spec])[0]
        job = family.resolve_jobs([spec], one, version)[0]
        session.te.to(session.device)
        session.encode_job(job)
        session.te.to("cpu")
        free_memory()
        if job.has_conditions:
            family.encode_conditions(vae, [job], version)
        return save_results([generate_one(model, job, 0, 1, args, version, device, dtype)], args, version, vae)

    return console(generate_line, read_line, args.bell)
