"""Training batches from the caches: grouped by bucket and control layout, shuffled deterministically per epoch,
sharded across processes, loadable in DataLoader workers.

Indices are (epoch, batch) pairs, so persistent workers need no notification of a new epoch and a resumed run can
start in the middle of an epoch at exactly the batch where it stopped.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..qwen_image.text_encoder import pad_embeds
from ..models.version import ModelVersion
from .cache import (
    cache_shapes, latent_cache_path, latent_metadata, latent_status, model_id, read_image_slots, read_latent_cache,
    read_text_cache,
    text_cache_path, text_metadata, text_status,
)
from .items import ImageItem
from .prepare import target_bucket

logger = logging.getLogger(__name__)


@dataclass
class CachedItem:
    latent_path: Path
    text_path: Path
    layout: tuple  # (latent shape, control shapes): items in one batch share it
    dataset: int
    batch_size: int
    num_repeats: int


def check_caches(items: list[ImageItem], version: ModelVersion, vae: str | None = None,
                 text_encoder: str | None = None) -> list[CachedItem]:
    """Every item needs usable latent and text caches (fresh ones of ours, or musubi-tuner's that fit); otherwise one
    error that says which and how to rebuild."""
    out = []
    vae_id = model_id(vae) if vae and Path(vae).exists() else None
    te_id = model_id(text_encoder) if text_encoder and Path(text_encoder).exists() else None
    foreign = 0
    for it in items:
        lat, txt = latent_cache_path(it, version), text_cache_path(it, version)
        for path, status, script in (
            (lat, latent_status(lat, it, latent_metadata(it, version, target_bucket(it, version.bucket_step), vae_id or ""),
                                () if vae_id else ("vae",)), "qwen_image_cache_latents.py"),
            (txt, text_status(txt, it, text_metadata(it, version, te_id or ""), () if te_id else ("text_encoder",)),
             "qwen_image_cache_text_encoder_outputs.py"),
        ):
            what = "latent" if path == lat else "text-encoder"
            if status.state == "foreign_mismatch":
                raise UserError(f"{what} cache {path} (not written by this tool) does not fit {it.targets[0]}: "
                                f"{status.reason}; delete it, then run {script} with --model_version {version.name}")
            if not status.usable:
                state = f"out of date ({status.reason})" if status.reason else "missing"
                raise UserError(f"{what} cache {path} for {it.targets[0]} is {state}; run {script} with "
                                f"--model_version {version.name} first")
            foreign += status.state == "foreign"
        out.append(CachedItem(lat, txt, cache_shapes(lat), it.config.index, it.config.batch_size, it.config.num_repeats))
    if foreign:
        logger.info("using %d musubi-tuner cache file(s) as they are (they record no source, so changes to images or "
                    "models are not detected)", foreign)
    return out


class CachedBatches(torch.utils.data.Dataset):
    """Index (epoch, i) -> this process's part of the i-th global batch of that epoch.

    Global batches hold batch_size x num_processes samples of one dataset and one layout; each process takes its
    batch_size slice, so a run on N processes sees exactly the batches of a 1-process run with N times the batch size.
    Every sample carries a key (epoch, global batch, position) from which its noise and timestep are drawn.
    """

    def __init__(self, items: list[CachedItem], seed: int, num_processes: int = 1, process_index: int = 0):
        self.items, self.seed = items, seed
        self.num_processes, self.process_index = num_processes, process_index
        self._epoch_cache: dict[int, list[list[tuple[int, int]]]] = {}
        self.batches_per_epoch = len(self.epoch_batches(0))

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This process's batches of `epoch`: lists of (item index, position in the global batch)."""
        if epoch not in self._epoch_cache:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            groups: dict[tuple, list[int]] = {}
            for i, it in enumerate(self.items):
                groups.setdefault((it.dataset, it.layout), []).extend([i] * it.num_repeats)
            batches = []
            for (_, _), idx in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
                rng.shuffle(idx)
                bs = self.items[idx[0]].batch_size * self.num_processes
                full = [idx[j:j + bs] for j in range(0, len(idx), bs)]
                # with several processes, a last partial global batch cannot be split evenly: it is dropped
                batches += [b for b in full if len(b) == bs or self.num_processes == 1]
            rng.shuffle(batches)
            if not batches:
                raise UserError(f"no complete global batch (batch_size x {self.num_processes} processes) per epoch; "
                                "add images, num_repeats or lower batch_size")
            mine = []
            for g in batches:
                per = len(g) // self.num_processes
                lo = self.process_index * per
                mine.append([(g[k], k) for k in range(lo, lo + per)])
            self._epoch_cache = {epoch: mine}
        return self._epoch_cache[epoch]

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __getitem__(self, index: tuple[int, int]) -> dict:
        epoch, i = index
        members = self.epoch_batches(epoch)[i]
        batch = load_items([self.items[j] for j, _ in members])
        width = max(it.batch_size for it in self.items) * self.num_processes  # widest global batch
        return {**batch, "sample_keys": [(epoch, i, pos) for _, pos in members], "items": [j for j, _ in members],
                "ordinals": [(epoch * len(self) + i) * width + pos for _, pos in members]}


def load_items(items: list[CachedItem], copies: int = 1) -> dict:
    """A batch of cached items (of one layout), each repeated `copies` times in a row: latents, control latents,
    padded text embeddings and mask."""
    lat, ctrls, texts, slots = [], [], [], []
    for it in items:
        latents, controls = read_latent_cache(it.latent_path)
        text = read_text_cache(it.text_path)
        image_slots = read_image_slots(it.text_path)
        for _ in range(copies):
            lat.append(latents)
            ctrls.append(controls)
            texts.append(text)
            slots.append(image_slots)
    text, mask = pad_embeds(texts)
    controls = [torch.stack([c[k] for c in ctrls]) for k in range(len(ctrls[0]))]
    batch = {"latents": torch.stack(lat), "controls": controls, "text": text, "text_mask": mask}
    if slots[0] is not None:  # 2.1: image-slot masks, right-padded like the text
        batch["image_slots"] = torch.stack([torch.cat([s, s.new_zeros(text.shape[1] - s.shape[0])]) for s in slots])
    return batch


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, i) for i from `start` on; the trainer sets epoch/start before each epoch."""

    def __init__(self, dataset: CachedBatches):
        self.dataset, self.epoch, self.start = dataset, 0, 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.start, len(self.dataset))])

    def __len__(self) -> int:
        return len(self.dataset) - self.start


def make_loader(dataset: CachedBatches, workers: int, persistent: bool) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    sampler = EpochSampler(dataset)
    from ..training.interrupt import ignore_signals_in_worker

    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers,
                                         persistent_workers=persistent and workers > 0,
                                         worker_init_fn=ignore_signals_in_worker if workers > 0 else None)
    return loader, sampler
