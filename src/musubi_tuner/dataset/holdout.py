"""Which items are held out for the validation loss: whole datasets (`validation = true`) or a seeded fraction of each
dataset (`validation_split` in the config, else --validation_split). Held-out items are cached like the others and
never reach a training batch."""

from __future__ import annotations

import random

from ..errors import UserError
from .items import ImageItem


def split_items(items: list[ImageItem], default_split: float = 0.0, default_seed: int = 0
                ) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training items, validation items). A split picks round(n x fraction) items of each dataset (at least one,
    never all), by a seeded draw over the items sorted by name, so it does not depend on listing order."""
    by_dataset: dict[int, list[ImageItem]] = {}
    for it in items:
        by_dataset.setdefault(it.config.index, []).append(it)
    train, held = [], []
    for index, group in by_dataset.items():
        cfg = group[0].config
        if cfg.validation:
            held += group
            continue
        fraction = cfg.validation_split if cfg.validation_split is not None else default_split
        count = min(len(group) - 1, max(1, round(len(group) * fraction))) if fraction else 0
        if count <= 0:
            train += group
            continue
        seed = cfg.validation_seed if cfg.validation_seed is not None else default_seed
        names = sorted(it.key for it in group)
        chosen = set(random.Random(seed * 1_000_003 + index).sample(names, count))
        train += [it for it in group if it.key not in chosen]
        held += [it for it in group if it.key in chosen]
    if not train:
        raise UserError("every dataset is held out for validation (validation = true); leave at least one dataset "
                        "for training")
    return train, held
