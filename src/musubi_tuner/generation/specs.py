"""From the command line (or a prompt line) to checked GenerationSpecs: defaults, prompt files, each family's rules on
sizes and options, and the captioning check of prompts left empty."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..models.registry import family_of
from ..models.version import ModelVersion
from .prompts import GenerationSpec, check_spec, read_prompt_file


def negative_of(spec: GenerationSpec) -> str:
    return spec.negative_prompt if spec.negative_prompt else " "


def build_specs(args: argparse.Namespace, version: ModelVersion) -> list[GenerationSpec]:
    h, w = args.image_size if args.image_size else (None, None)
    defaults = GenerationSpec(
        prompt=args.prompt or "", negative_prompt=args.negative_prompt, height=h, width=w,
        steps=args.infer_steps if args.infer_steps is not None else family_of(version).default_steps(args, version),
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else version.default_guidance,
        flow_shift=args.flow_shift, seed=args.seed,
        control_images=list(args.control_image_path or []), output_layers=args.output_layers,
        mask_path=args.mask_path, rcm_threshold=args.rcm_threshold, rcm_relative=args.rcm_relative_threshold,
        rcm_kernel_size=args.rcm_kernel_size, rcm_dilate_size=args.rcm_dilate_size,
    )
    check_spec(defaults)
    if args.from_file:
        specs = read_prompt_file(args.from_file, defaults, allow_empty=version.layer_targets)
    elif args.prompt or (version.layer_targets and args.control_image_path):  # layered: an empty prompt is captioned
        specs = [defaults]
    else:
        raise UserError("give --prompt TEXT, --from_file FILE or --interactive (or --latent_path to decode saved "
                        "latents)")
    specs = build_specs_from(args, version, specs)
    check_captioning(args, specs)
    return specs


def check_captioning(args, specs: list[GenerationSpec], option: str = "--text_encoder") -> None:
    """Prompts left empty (layered) are captioned by the text encoder: its file must hold the language-model head."""
    from ..qwen_image.captioning import check_caption_model

    if any(not s.prompt.strip() for s in specs) and args.text_encoder:
        check_caption_model(args.text_encoder, option)


def build_specs_from(args: argparse.Namespace, version: ModelVersion, specs: list[GenerationSpec]
                     ) -> list[GenerationSpec]:
    """The family's rules on each spec (sizes, layer counts, which options apply)."""
    family = family_of(version)
    for s in specs:
        family.check_spec(s, version)
    return specs


def check_anchor_options(s: GenerationSpec, supported: bool) -> None:
    """--mask_path / --rcm_threshold (inpainting and RCM anchoring of the first control image): one or the other, and
    only where the family's version supports them."""
    if s.rcm_threshold is not None or s.mask_path:
        if not supported:
            raise UserError("--mask_path / --rcm_threshold work only with an edit --model_version "
                            "(edit, edit-2509, edit-2511)")
        if s.rcm_threshold is not None and s.mask_path:
            raise UserError("--mask_path and --rcm_threshold cannot be used together; choose one")


def console_defaults(args, version: ModelVersion) -> GenerationSpec:
    """The spec that --interactive lines start from: the command line's settings and --prompt (a line that starts
    with a switch keeps that text; empty: layered captions the image)."""
    defaults = build_specs(argparse.Namespace(**{**vars(args), "prompt": args.prompt or "-", "from_file": None}),
                           version)[0]
    defaults.prompt = args.prompt or ""
    return defaults
