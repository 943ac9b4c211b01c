"""Command-line option groups shared by the five qwen_image_* scripts: each option is defined once, here."""

from __future__ import annotations

import argparse

from .errors import UserError
from .qwen_image.versions import VERSIONS, ModelVersion, resolve_version


def add_model_args(p: argparse.ArgumentParser, dit: bool = True, vae: bool = True, text_encoder: bool = True) -> None:
    g = p.add_argument_group("models")
    if dit:
        g.add_argument("--dit", help="DiT weights: diffusers file/folder/first shard or ComfyUI single file (bf16)")
    if vae:
        g.add_argument("--vae", help="VAE weights: diffusers or ComfyUI/Wan layout (the layered VAE for layered)")
    if text_encoder:
        g.add_argument("--text_encoder", help="Qwen2.5-VL weights: ComfyUI single file or transformers folder")
        g.add_argument("--tokenizer", help="folder with the Qwen tokenizer/processor files (default: beside the text "
                                           "encoder, else the Hugging Face hub)")
    add_version_args(p)


def add_version_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model version")
    g.add_argument("--model_version", choices=list(VERSIONS), default=None,
                   help="original (default), edit, edit-2509, edit-2511, layered")
    g.add_argument("--edit", action="store_true", help="same as --model_version edit (backward compatibility)")
    g.add_argument("--edit_plus", action="store_true", help="same as --model_version edit-2509 (backward compatibility)")


def version_from_args(args: argparse.Namespace) -> ModelVersion:
    return resolve_version(args.model_version, args.edit, args.edit_plus)


def add_memory_args(p: argparse.ArgumentParser, training: bool = False) -> None:
    g = p.add_argument_group("memory")
    if training:
        g.add_argument("--fp8_base", action="store_true", help="keep DiT weights in float8_e4m3fn, compute in bf16")
    g.add_argument("--fp8_scaled", action="store_true", help="quantise DiT Linear weights to fp8 with scales at load")
    g.add_argument("--fp8_vl", action="store_true", help="run the Qwen2.5-VL text encoder in fp8")
    g.add_argument("--blocks_to_swap", type=int, default=0, help="keep this many DiT blocks in CPU memory")
    g.add_argument("--disable_numpy_memmap", action="store_true",
                   help="read weight files with plain reads instead of memory mapping (more RAM, sometimes faster)")


def add_vae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae_enable_tiling", action="store_true", help="encode/decode the VAE in tiles (large images)")


def require(args: argparse.Namespace, *names: str) -> None:
    missing = [n for n in names if not getattr(args, n, None)]
    if missing:
        raise UserError(f"missing required option(s): {', '.join('--' + n for n in missing)}")


def refuse_unavailable(args: argparse.Namespace, options: dict[str, str]) -> None:
    """Options parsed for compatibility but not working yet fail loudly instead of being silently ignored."""
    for name, why in options.items():
        v = getattr(args, name, None)
        if v not in (None, False, 0, [], ""):
            raise UserError(f"--{name} is not available yet: {why}")


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """Options of the two caching scripts."""
    g = p.add_argument_group("dataset / caching")
    g.add_argument("--dataset_config", help="dataset TOML")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--batch_size", type=int, default=1, help="items per model call")
    g.add_argument("--skip_existing", action="store_true", help="keep caches that are still fresh")
    g.add_argument("--keep_cache", action="store_true", help="do not delete orphaned cache files")
