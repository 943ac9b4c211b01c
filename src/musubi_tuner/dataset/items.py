"""Dataset items: which image files, caption and control images make one training example.

Image directory: `<base>.ext` + `<base><caption_extension>`; controls `<base>.ext` or `<base>_0.ext, <base>_1.ext ...`
in control_directory; layered (multiple_target): `<base>.png` (composite) + `<base>_1.png ...` (RGBA layers).
JSONL: {"image_path": ..., "caption": ..., "control_path" | "control_path_0".., "image_path_0".. (layered)}.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError, plural
from ..fileio import read_text
from ..models.registry import VERSIONS
from ..models.version import ModelVersion
from .config import DatasetConfig

logger = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_INDEXED = re.compile(r"^(?P<base>.+)_(?P<idx>\d+)$")


@dataclass
class ImageItem:
    key: str  # unique name inside the cache directory
    targets: list[Path]  # one image; layered: composite then layers
    caption: str
    controls: list[Path] = field(default_factory=list)
    config: DatasetConfig | None = None


def _to_8bit(im: Image.Image, path: Path) -> Image.Image:
    """16-bit grayscale (PNG "I;16", TIFF "I") scaled to 8 bits; Pillow's own conversion clips it to white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "F":
        raise UserError(f"cannot read image {path}: floating-point images are not supported; save it as an 8- or "
                        "16-bit PNG")
    return im


def load_image(path: Path, mode: str) -> Image.Image:
    """Open and fully decode an image; a corrupt, unreadable or oversized file is one clear error naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            im = _to_8bit(im, path)
            if mode == "RGB" and im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, im).convert("RGB")  # alpha dropped onto white
            return im.convert(mode)
    except Image.DecompressionBombError as e:
        raise UserError(f"image {path} is too large to decode safely ({e}); resize it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}; replace or remove the file") from None


def images_in(folder: Path) -> list[Path]:
    """The images of a folder's top level (as a dataset's image_directory lists them), sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def _claim_controls(stems: list[str], control_dir: Path | None, where: str) -> dict[str, list[Path]]:
    """Control images of each item: `<base>.ext` first, then `<base>_<n>.ext` by n. Longer item names claim their
    files first (as musubi-tuner does), so item `photo` never takes `photo_1.png` when `photo_1` is an item itself."""
    if control_dir is None:
        return {}
    files = images_in(control_dir)
    claimed: dict[str, list[Path]] = {}
    free = set(files)
    for base in sorted(stems, key=len, reverse=True):
        exact, indexed = [], []
        for p in sorted(free):
            if p.stem == base:
                exact.append(p)
            elif p.stem.startswith(base + "_") and p.stem[len(base) + 1:].isdigit():
                indexed.append((int(p.stem[len(base) + 1:]), p))
        mine = exact[:1] + [p for _, p in sorted(indexed)]
        free.difference_update(exact + [p for _, p in indexed])
        claimed[base] = mine
    if free:
        names = ", ".join(p.name for p in sorted(free)[:3])
        logger.warning("%s: %d control image(s) in %s match no item (<base>.ext or <base>_<n>.ext) and are not used: "
                       "%s%s", where, len(free), control_dir, names, "..." if len(free) > 3 else "")
    return claimed


def _read_caption(image: Path, cfg: DatasetConfig) -> str:
    cap = image.with_name(image.stem + cfg.caption_extension)
    if not cap.is_file():
        raise UserError(f"{cfg.where}: image {image} has no caption file {cap.name}; add it or set caption_extension")
    return read_text(cap, "caption file").strip()


def _from_directory(cfg: DatasetConfig) -> list[ImageItem]:
    folder = Path(cfg.image_directory)
    images = images_in(folder)
    control_dir = Path(cfg.control_directory) if cfg.control_directory else None
    stems = {p.stem for p in images}
    targets_of = {}
    for img in images:
        m = _INDEXED.match(img.stem)
        if cfg.multiple_target and m and m["base"] in stems:
            continue  # a layer of another item
        targets = [img]
        if cfg.multiple_target:
            layers = sorted((int(mm["idx"]), p) for p in images if (mm := _INDEXED.match(p.stem)) and mm["base"] == img.stem)
            targets += [p for _, p in layers]
        targets_of[img.stem] = targets
    controls = _claim_controls(list(targets_of), control_dir, cfg.where)
    return [ImageItem(stem, targets, _read_caption(targets[0], cfg), controls.get(stem, []), cfg)
            for stem, targets in targets_of.items()]


def _from_jsonl(cfg: DatasetConfig) -> list[ImageItem]:
    path = Path(cfg.image_jsonl_file)
    items = []
    for n, line in enumerate(read_text(path, "image_jsonl_file").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{where}: each line must be a JSON object")
        targets = [rec["image_path"]] if "image_path" in rec else [rec[k] for k in _numbered(rec, "image_path_")]
        if not targets:
            raise UserError(f"{where}: missing image_path (or image_path_0.. for multiple_target)")
        if "caption" not in rec or not isinstance(rec["caption"], str):
            raise UserError(f"{where}: missing caption (a string)")
        controls = ([rec["control_path"]] if "control_path" in rec else []) + [rec[k] for k in _numbered(rec, "control_path_")]
        for v in targets + controls:
            if not isinstance(v, str) or not v:
                raise UserError(f"{where}: image paths must be non-empty strings, got {v!r}")
        base = path.parent
        targets = [_resolve(base, t, where) for t in targets]
        controls = [_resolve(base, c, where) for c in controls]
        items.append(ImageItem(Path(targets[0]).stem, targets, rec["caption"].strip(), controls, cfg))
    return items


def _numbered(rec: dict, prefix: str) -> list[str]:
    keys = [k for k in rec if k.startswith(prefix) and k[len(prefix):].isdigit()]
    return sorted(keys, key=lambda k: int(k[len(prefix):]))


def _resolve(base: Path, p: str, where: str) -> Path:
    q = Path(p) if Path(p).is_absolute() else base / p
    if not q.is_file():
        raise UserError(f"{where}: image file not found: {p}")
    return q


def collect_items(configs: list[DatasetConfig], version: ModelVersion) -> list[ImageItem]:
    """Every item of every dataset, validated against the model version; errors name the file and the fix."""
    all_items: list[ImageItem] = []
    for cfg in configs:
        if version.layer_targets and not cfg.multiple_target:
            raise UserError(f"{cfg.where}: --model_version layered needs multiple_target = true in the dataset config")
        items = _from_directory(cfg) if cfg.image_directory else _from_jsonl(cfg)
        if not items:
            raise UserError(f"{cfg.where}: no images found in {cfg.image_directory or cfg.image_jsonl_file}")
        _validate(items, cfg, version)
        all_items += items
    seen: dict[tuple[str, str], ImageItem] = {}
    for it in all_items:
        k = (str(Path(it.config.cache_directory).resolve()), it.key)
        if k in seen:
            raise UserError(f"{it.config.where}: two items named {it.key!r} share cache_directory {k[0]} "
                            f"({seen[k].targets[0]} and {it.targets[0]}); rename one or use another cache_directory")
        seen[k] = it
    return all_items


def _validate(items: list[ImageItem], cfg: DatasetConfig, version: ModelVersion) -> None:
    w = cfg.where
    if version.uses_controls:
        for it in items:
            if not it.controls and version.controls == "required":
                raise UserError(f"{w}: {it.targets[0]} has no control image (set control_directory or control_path) "
                                f"but --model_version {version.name} needs one")
            if version.max_controls is not None and len(it.controls) > version.max_controls:
                others = [v.name for v in VERSIONS.values() if v.family == version.family and v.uses_controls
                          and (v.max_controls is None or v.max_controls > version.max_controls)]
                raise UserError(f"{w}: {it.targets[0]} has {plural(len(it.controls), 'control image')}; --model_version "
                                f"{version.name} takes {'exactly one' if version.max_controls == 1 else version.max_controls}"
                                + (f" (use {'/'.join(others)} for more)" if others else ""))
        counts = {len(it.controls) for it in items}
        if len(counts) > 1 and cfg.batch_size > 1:
            bad = next(it for it in items if len(it.controls) != len(items[0].controls))
            raise UserError(f"{w}: {bad.targets[0]} has {plural(len(bad.controls), 'control image')} but "
                            f"{items[0].targets[0]} has {len(items[0].controls)}; with batch_size > 1 every item "
                            "needs the same number")
    if version.layer_targets:
        for it in items:
            if len(it.targets) != len(items[0].targets):
                raise UserError(f"{w}: {it.targets[0]} has {plural(len(it.targets) - 1, 'layer')} but {items[0].targets[0]} "
                                f"has {len(items[0].targets) - 1}; every item of a dataset needs the same number")
            if len(it.targets) < 2:
                raise UserError(f"{w}: {it.targets[0]} has no layer images (<base>_1.png ...)")
