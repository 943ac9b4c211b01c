"""The two caching jobs: VAE latents and text-encoder outputs, for every model version.

Both skip fresh caches with --skip_existing (without loading any model when nothing is to do), rebuild stale ones,
write atomically and remove orphaned caches of their own unless --keep_cache. Caches written by musubi-tuner are
used as they are when they fit, and never overwritten or deleted.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..fileio import check_writable_folder, save_safetensors
from ..memory.budget import check_vae_encode_fits
from ..memory.device import compute_setup
from ..models.registry import family_of
from ..qwen_image.model_files import expect
from ..models.version import ModelVersion
from .cache import (
    dtype_name, latent_cache_path, latent_file_metadata, latent_metadata, latent_status, latent_tensors, model_id,
    remove_orphans,
    text_cache_path, text_file_metadata, text_metadata, text_status,
)
from .config import load_dataset_config
from .items import ImageItem, collect_items
from .prepare import prepare_item, target_bucket

logger = logging.getLogger(__name__)
CACHE_TEXT_DTYPE = torch.bfloat16  # as musubi-tuner writes text-encoder outputs (half the disk of float32)


def check_cache_folders(items: list[ImageItem]) -> None:
    for d in sorted({Path(i.config.cache_directory) for i in items}):
        check_writable_folder(d, "cache_directory")


def _plan(items, path_fn, meta_fn, status_fn, skip_existing: bool, kind: str):
    """Which items to (re)cache. Fresh caches of ours are skipped with --skip_existing; musubi-tuner caches that fit
    are always used as they are (never overwritten); one that does not fit is an error (it is not ours to replace)."""
    produced, todo, skipped, foreign = set(), [], 0, 0
    for item in items:
        path, meta = path_fn(item), meta_fn(item)
        produced.add(path)
        status = status_fn(path, item, meta)
        if status.state == "foreign_mismatch":
            raise UserError(f"{path} was not written by this tool (musubi-tuner format?) and does not fit "
                            f"{item.targets[0]}: {status.reason}. It is not overwritten: delete it or set another "
                            "cache_directory, then run this again")
        if status.state == "foreign":
            foreign += 1
            continue
        if skip_existing and status.state == "fresh":
            skipped += 1
            continue
        if status.state == "stale":
            logger.info("re-caching %s: %s", path.name, status.reason)
        todo.append((item, path, meta))
    if foreign:
        logger.info("%s: %d musubi-tuner cache(s) fit their items and are used as they are", kind, foreign)
    return produced, todo, skipped, foreign


def _finish(items: list[ImageItem], produced: set[Path], version: ModelVersion, kind: str, keep_cache: bool,
            done: int, skipped: int, foreign: int) -> dict:
    removed = 0
    if not keep_cache:
        removed, _ = remove_orphans({Path(i.config.cache_directory) for i in items}, produced, version, kind)
    logger.info("%s: %d cached, %d fresh caches skipped, %d musubi-tuner caches used, %d orphans removed", kind, done,
                skipped, foreign, removed)
    return {"cached": done, "skipped": skipped, "foreign": foreign, "removed": removed}


def _prepared(entries, version: ModelVersion, workers: int, with_targets: bool = True):
    """Prepared items (images loaded, resized, cropped) in order, read ahead by `workers` threads."""
    if workers <= 1:
        for entry in entries:
            yield entry, prepare_item(entry[0], version, with_targets)
        return
    with ThreadPoolExecutor(workers) as pool:
        futures = [(entry, pool.submit(prepare_item, entry[0], version, with_targets)) for entry in entries]
        for entry, fut in futures:
            yield entry, fut.result()


def cache_latents(args: argparse.Namespace, version: ModelVersion) -> dict:
    from ..qwen_image.vae import encode

    if getattr(args, "vae_dtype", None):
        raise UserError("--vae_dtype is not supported for Qwen-Image (as in musubi-tuner): the VAE runs in the compute "
                        "dtype; leave it out")
    if getattr(args, "disable_cudnn_backend", False):
        logger.info("--disable_cudnn_backend: cuDNN is off")
        torch.backends.cudnn.enabled = False
    items = collect_items(load_dataset_config(args.dataset_config), version)
    if getattr(args, "debug_mode", None):
        from .debug import show_dataset

        return show_dataset(items, version, args.debug_mode, args)
    expect(args.vae, "--vae", "vae", version)
    check_cache_folders(items)
    vae_id = model_id(args.vae)
    buckets = {id(it): target_bucket(it, version.bucket_step) for it in items}
    produced, todo, skipped, foreign = _plan(
        items, lambda it: latent_cache_path(it, version), lambda it: latent_metadata(it, version, buckets[id(it)], vae_id),
        latent_status, args.skip_existing, "latents")

    groups: dict[tuple, list] = defaultdict(list)
    for entry in todo:
        groups[(buckets[id(entry[0])], len(entry[0].targets))].append(entry)
    batches = [g[i:i + args.batch_size] for g in groups.values() for i in range(0, len(g), args.batch_size)]

    vae = None
    device, dtype = compute_setup(args.device)
    if batches:  # the largest encode (one batch of one bucket, every frame) must fit this machine
        def images(batch) -> int:
            return len(batch) * len(batch[0][0].targets)

        largest = max(batches, key=lambda b: buckets[id(b[0][0])][0] * buckets[id(b[0][0])][1] * images(b))
        w, h = buckets[id(largest[0][0])]
        check_vae_encode_fits(w, h, images(largest), dtype, device, largest[0][0].config.where, args.vae_enable_tiling)
    workers = getattr(args, "num_workers", None) or 1
    with tqdm(total=len(todo), desc="caching latents", unit="item") as bar:
        for batch in batches:
            if vae is None:
                vae = family_of(version).load_vae(args.vae, version, dtype, device)
                if args.vae_enable_tiling:
                    vae.enable_tiling()
            prepared = [p for _, p in _prepared(batch, version, workers)]
            pixels = torch.stack([p.targets for p in prepared])  # (B, C, F, H, W)
            # every frame (layered: composite and each layer) is an independent image for the VAE
            latents = torch.cat([encode(vae, pixels[:, :, f]) for f in range(pixels.shape[2])], dim=2).cpu()
            for (item, path, meta), prep, lat in zip(batch, prepared, latents):
                controls = [encode(vae, c.unsqueeze(0))[0].cpu() for c in prep.controls] if version.uses_controls \
                    else []
                save_safetensors(latent_tensors(lat, controls), path, latent_file_metadata(item, version, meta))
                bar.update(1)
    return _finish(items, produced, version, "latents", args.keep_cache, len(todo), skipped, foreign)


def cache_text_encoder_outputs(args: argparse.Namespace, version: ModelVersion) -> dict:
    """Items whose prompt reads their control images are encoded one at a time, the others in batches."""
    items = collect_items(load_dataset_config(args.dataset_config), version)
    expect(args.text_encoder, "--text_encoder", "text_encoder", version)
    check_cache_folders(items)
    te_id = model_id(args.text_encoder)
    produced, todo, skipped, foreign = _plan(items, lambda it: text_cache_path(it, version),
                                             lambda it: text_metadata(it, version, te_id), text_status,
                                             args.skip_existing, "text")
    device, dtype = compute_setup(args.device)
    workers = getattr(args, "num_workers", None) or 1
    def reads_images(entry) -> bool:  # the prompt shows the item's control images to the text encoder
        return version.uses_controls and bool(entry[0].controls)

    plain = [e for e in todo if not reads_images(e)]
    batches = [plain[i:i + args.batch_size] for i in range(0, len(plain), args.batch_size)]
    batches += [[e] for e in todo if reads_images(e)]
    encode = None
    with tqdm(total=len(todo), desc="caching text encoder outputs", unit="item") as bar:
        for batch in batches:
            if encode is None:
                encode = family_of(version).cache_text_encoder(args, version, device, dtype)
            images = None
            if reads_images(batch[0]):  # a batch of one
                images = next(_prepared(batch, version, workers, with_targets=False))[1].control_images
            encoded = encode([it.caption for it, _, _ in batch], images)
            for (item, path, meta), (e, extra) in zip(batch, encoded):
                e = e.to("cpu", CACHE_TEXT_DTYPE).contiguous()
                save_safetensors({f"varlen_vl_embed_{dtype_name(e)}": e, **extra}, path,
                                 text_file_metadata(item, version, meta))
                bar.update(1)
    return _finish(items, produced, version, "text", args.keep_cache, len(todo), skipped, foreign)
