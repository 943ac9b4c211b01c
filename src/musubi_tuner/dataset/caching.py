"""The two caching jobs: VAE latents and text-encoder outputs, for every model version.

Both skip fresh caches with --skip_existing (without loading any model when nothing is to do), rebuild stale
ones, write atomically and remove orphaned caches unless --keep_cache.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..fileio import check_writable_folder, save_safetensors
from ..qwen_image.generate import compute_setup
from ..qwen_image.model_files import expect
from ..qwen_image.versions import ModelVersion
from .cache import (
    latent_cache_path, latent_metadata, model_id, remove_orphans, stale_reason, text_cache_path, text_metadata,
)
from .config import load_dataset_config
from .items import ImageItem, collect_items
from .prepare import prepare_item, target_bucket

logger = logging.getLogger(__name__)


def check_cache_folders(items: list[ImageItem]) -> None:
    for d in sorted({Path(i.config.cache_directory) for i in items}):
        check_writable_folder(d, "cache_directory")


def _plan(items, version, path_fn, meta_fn, skip_existing: bool):
    produced, todo, skipped, stale = set(), [], 0, 0
    for item in items:
        path, meta = path_fn(item), meta_fn(item)
        produced.add(path)
        reason = stale_reason(path, meta) if path.exists() else None
        if skip_existing and path.exists() and reason is None:
            skipped += 1
            continue
        if reason is not None:
            stale += 1
            logger.info("re-caching %s: %s", path.name, reason)
        todo.append((item, path, meta))
    return produced, todo, skipped, stale


def _finish(items: list[ImageItem], produced: set[Path], version: ModelVersion, kind: str, keep_cache: bool,
            done: int, skipped: int) -> dict:
    removed = 0
    if not keep_cache:
        removed = remove_orphans({Path(i.config.cache_directory) for i in items}, produced, version, kind)
    logger.info("%s: %d cached, %d fresh caches skipped, %d orphans removed", kind, done, skipped, removed)
    return {"cached": done, "skipped": skipped, "removed": removed}


def cache_latents(args: argparse.Namespace, version: ModelVersion) -> dict:
    from ..qwen_image.vae import encode, load_vae

    items = collect_items(load_dataset_config(args.dataset_config), version)
    expect(args.vae, "--vae", "vae", version)
    check_cache_folders(items)
    vae_id = model_id(args.vae)
    buckets = {id(it): target_bucket(it) for it in items}
    produced, todo, skipped, _ = _plan(
        items, version, lambda it: latent_cache_path(it, version, buckets[id(it)]),
        lambda it: latent_metadata(it, version, buckets[id(it)], vae_id), args.skip_existing)

    groups: dict[tuple, list] = defaultdict(list)
    for entry in todo:
        groups[(buckets[id(entry[0])], len(entry[0].targets))].append(entry)
    batches = [g[i:i + args.batch_size] for g in groups.values() for i in range(0, len(g), args.batch_size)]

    vae = None
    device, dtype = compute_setup(args.device)
    with tqdm(total=len(todo), desc="caching latents", unit="item") as bar:
        for batch in batches:
            if vae is None:
                vae = load_vae(args.vae, dtype, device,
                               version.vae_channels)
                if args.vae_enable_tiling:
                    vae.enable_tiling()
            prepared = [prepare_item(it, version) for it, _, _ in batch]
            pixels = torch.stack([p.targets for p in prepared])  # (B, C, F, H, W)
            # every frame (layered: composite and each layer) is an independent image for the VAE
            latents = torch.cat([encode(vae, pixels[:, :, f]) for f in range(pixels.shape[2])], dim=2).cpu()
            for (item, path, meta), prep, lat in zip(batch, prepared, latents):
                tensors = {"latents": lat}
                if version.is_edit:
                    for i, c in enumerate(prep.controls):
                        tensors[f"control_{i}"] = encode(vae, c.unsqueeze(0))[0].cpu()
                save_safetensors(tensors, path, meta)
                bar.update(1)
    return _finish(items, produced, version, "latents", args.keep_cache, len(todo), skipped)


def cache_text_encoder_outputs(args: argparse.Namespace, version: ModelVersion) -> dict:
    from ..qwen_image.text_encoder import encode_prompts, load_processor, load_text_encoder, load_tokenizer

    items = collect_items(load_dataset_config(args.dataset_config), version)
    expect(args.text_encoder, "--text_encoder", "text_encoder", version)
    check_cache_folders(items)
    te_id = model_id(args.text_encoder)
    produced, todo, skipped, _ = _plan(items, version, lambda it: text_cache_path(it, version),
                                       lambda it: text_metadata(it, version, te_id), args.skip_existing)
    batch_size = args.batch_size if not version.is_edit else 1  # edit prompts carry their own images
    te = processor = None
    device, dtype = compute_setup(args.device)
    with tqdm(total=len(todo), desc="caching text encoder outputs", unit="item") as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            if te is None:
                processor = load_processor(load_tokenizer(args.tokenizer, args.text_encoder), args.tokenizer)
                te = load_text_encoder(args.text_encoder, dtype, device)
                if args.fp8_vl:
                    from ..qwen_image.generate import quantize_text_encoder

                    quantize_text_encoder(te, device)
            images = None
            if version.is_edit:
                images = [prepare_item(it, version, with_targets=False).control_images for it, _, _ in batch]
            embeds = encode_prompts(te, processor, [it.caption for it, _, _ in batch], version.template, device, images)
            for (item, path, meta), e in zip(batch, embeds):
                save_safetensors({"embed": e.cpu()}, path, meta)
                bar.update(1)
    return _finish(items, produced, version, "text", args.keep_cache, len(todo), skipped)
