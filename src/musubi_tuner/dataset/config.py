"""The dataset config (TOML, or JSON with the same tables): `[general]` defaults and `[[datasets]]` entries, validated
before any model loads. Keys of musubi-tuner's other architectures (fp_*, video keys) are ignored with a warning and
video datasets skipped, so a config shared with those works here.

    [general]
    resolution = [1024, 1024]        # int or [W, H]
    caption_extension = ".txt"
    batch_size = 1
    enable_bucket = true
    bucket_no_upscale = false

    [[datasets]]
    image_directory = "/data/images"   # or image_jsonl_file = "/data/meta.jsonl"
    cache_directory = "/data/cache"    # default: image_directory (required with image_jsonl_file)
    control_directory = "/data/ctrl"   # edit: <base>.ext or <base>_0.ext, <base>_1.ext ...
    control_resolution = [1024, 1024]  # default: the target's bucket (pixel-aligned)
    no_resize_control = false          # true: controls at native size, cropped to multiples of 16; together with
                                       # control_resolution, that area is the maximum (larger controls shrink to it)
    multiple_target = false            # layered: <base>.png composite + <base>_1.png ... RGBA layers
    num_repeats = 1
    validation = false                 # true: every item of this dataset is held out for the validation loss
    validation_split = 0.0             # hold out this fraction of the items (seeded; [general] or per dataset)
    validation_seed = 0                # which items the split holds out (default: --validation_seed, else --seed)
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import parse_toml, read_text

logger = logging.getLogger(__name__)


@dataclass
class DatasetConfig:
    resolution: tuple[int, int] = (960, 544)  # (W, H)
    caption_extension: str = ".txt"
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    image_directory: str | None = None
    image_jsonl_file: str | None = None
    cache_directory: str | None = None
    control_directory: str | None = None
    control_resolution: tuple[int, int] | None = None
    no_resize_control: bool = False
    multiple_target: bool = False
    validation: bool = False
    validation_split: float | None = None
    validation_seed: int | None = None
    index: int = 0  # position in [[datasets]], for messages
    source: str = ""  # the TOML file, for messages

    @property
    def where(self) -> str:
        return f"{self.source}: [[datasets]] #{self.index + 1}"


MIN_RESOLUTION, MAX_RESOLUTION = 32, 8192  # 32: two 16-pixel steps, the least that buckets need
_TYPES = {
    "resolution": "resolution", "control_resolution": "resolution", "caption_extension": str, "batch_size": int,
    "num_repeats": int, "enable_bucket": bool, "bucket_no_upscale": bool, "image_directory": str,
    "image_jsonl_file": str, "cache_directory": str, "control_directory": str, "no_resize_control": bool,
    "multiple_target": bool, "validation": bool, "validation_split": "fraction", "validation_seed": "seed",
}
# spellings used by earlier versions of the documentation
_ALIASES = {"qwen_image_edit_no_resize_control": "no_resize_control",
            "qwen_image_edit_control_resolution": "control_resolution"}
_GENERAL_ONLY_FORBIDDEN = {"image_directory", "image_jsonl_file", "cache_directory", "control_directory",
                           "validation"}
# keys of musubi-tuner's other architectures: a config shared with them works here, the keys are ignored
_OTHER_ARCH_KEYS = {"fp_latent_window_size", "fp_1f_clean_indices", "fp_1f_target_index", "fp_1f_no_post",
                    "target_frames", "frame_extraction", "frame_stride", "frame_sample", "max_frames", "source_fps",
                    "debug_dataset"}
_VIDEO_KEYS = {"video_directory", "video_jsonl_file"}


def _check_value(key: str, value, where: str):
    kind = _TYPES[key]
    if kind == "resolution":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if not (isinstance(value, list) and len(value) == 2 and
                all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise UserError(f"{where}: {key} must be an int or [width, height] of ints, got {value!r}")
        if not all(MIN_RESOLUTION <= v <= MAX_RESOLUTION for v in value):
            raise UserError(f"{where}: {key} {value} must be between {MIN_RESOLUTION} and {MAX_RESOLUTION} pixels per "
                            "side (Qwen-Image trains at 512 to 1664; e.g. resolution = [1024, 1024])")
        return (value[0], value[1])
    if kind == "fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UserError(f"{where}: {key} must be a number in [0, 1), got {value!r}")
        return float(value)
    if kind == "seed":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{where}: {key} must be a non-negative integer, got {value!r}")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{where}: {key} must be a positive integer, got {value!r}")
    elif not isinstance(value, kind):
        raise UserError(f"{where}: {key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_table(table: dict, where: str, general: bool) -> dict:
    out = {}
    for key, value in table.items():
        key = _ALIASES.get(key, key)
        if key in _OTHER_ARCH_KEYS:
            logger.warning("%s: %s is a key of other architectures (musubi-tuner) and is ignored", where, key)
            continue
        if key not in _TYPES:
            close = difflib.get_close_matches(key, list(_TYPES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(_TYPES))})"
            raise UserError(f"{where}: unknown key {key!r}{hint}")
        if general and key in _GENERAL_ONLY_FORBIDDEN:
            raise UserError(f"{where}: {key} belongs in a [[datasets]] entry, not in [general]")
        out[key] = _check_value(key, value, f"{where} key {key!r}")
    return out


def load_dataset_config(path: str | Path) -> list[DatasetConfig]:
    """Parse and validate; every problem is one UserError naming the file, the table and the key."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--dataset_config: file not found: {p}")
    text = read_text(p, "--dataset_config")
    if p.suffix.lower() == ".json":  # musubi-tuner also reads JSON configs with the same tables
        try:
            data = json.loads(text)
        except ValueError as e:
            raise UserError(f"{p}: invalid JSON ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"{p}: the JSON config must be an object with general / datasets")
    else:
        data = parse_toml(text, str(p))
    unknown = set(data) - {"general", "datasets"}
    if unknown:
        raise UserError(f"{p}: unknown top-level table(s) {sorted(unknown)}; use [general] and [[datasets]]")
    if not isinstance(data.get("general", {}), dict):
        raise UserError(f"{p}: general must be a table ([general] with key = value lines), got "
                        f"{type(data['general']).__name__}")
    general = _check_table(data.get("general", {}), f"{p}: [general]", general=True)
    entries = data.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{p}: no [[datasets]] entries")
    configs = []
    for i, entry in enumerate(entries):
        where = f"{p}: [[datasets]] #{i + 1}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: each dataset must be a [[datasets]] table, got {type(entry).__name__}")
        if _VIDEO_KEYS & entry.keys():
            logger.warning("%s: a video dataset (musubi-tuner's other architectures) is skipped: Qwen-Image trains on "
                           "images", where)
            continue
        values = {**general, **_check_table(entry, where, general=False)}
        cfg = DatasetConfig(**values, index=i, source=str(p))
        _check_paths(cfg)
        configs.append(cfg)
    if not configs:
        raise UserError(f"{p}: no image datasets (only video datasets, which Qwen-Image does not train on)")
    return configs


def _check_paths(cfg: DatasetConfig) -> None:
    w = cfg.where
    if bool(cfg.image_directory) == bool(cfg.image_jsonl_file):
        raise UserError(f"{w}: give exactly one of image_directory or image_jsonl_file")
    if cfg.image_directory and not Path(cfg.image_directory).is_dir():
        raise UserError(f"{w}: image_directory does not exist: {cfg.image_directory}")
    if cfg.image_jsonl_file:
        if not Path(cfg.image_jsonl_file).is_file():
            raise UserError(f"{w}: image_jsonl_file does not exist: {cfg.image_jsonl_file}")
        if not cfg.cache_directory:
            raise UserError(f"{w}: cache_directory is required with image_jsonl_file")
    if cfg.control_directory and not Path(cfg.control_directory).is_dir():
        raise UserError(f"{w}: control_directory does not exist: {cfg.control_directory}")
    if not cfg.enable_bucket and (cfg.resolution[0] % 16 or cfg.resolution[1] % 16):
        raise UserError(f"{w}: resolution {list(cfg.resolution)} must be multiples of 16 without enable_bucket (with "
                        "buckets it is an area and any value works)")
    if cfg.cache_directory is None:
        cfg.cache_directory = cfg.image_directory


