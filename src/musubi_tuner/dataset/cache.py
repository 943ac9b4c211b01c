"""Cache files, in musubi-tuner's layout so that caches carry over both ways.

Latents: <cache_directory>/<item>_<W:04d>x<H:04d>_<arch>.safetensors   (W x H: the original image size)
         latents_{F}x{h}x{w}_{dtype} (16, F, h, w)   F = 1, layered: composite + layers
         latents_control_{i}_{F}x{h}x{w}_{dtype}      edit versions, one per control image
Text:    <cache_directory>/<item>_<arch>_te.safetensors
         varlen_vl_embed_{dtype} (L, 3584)
arch is the version's tag (qi, qie, qil); dtype is torch's name (float32, bfloat16).

Metadata holds musubi-tuner's keys (architecture, width/height or caption1, format_version) and ours (`format` and
what produced the file: source images, caption, model file, bucket, control handling). A cache with our `format` key
is fresh only when all of that still matches; a stale one is rebuilt by the caching scripts and refused by the trainer.
A file without our `format` key was written by musubi-tuner: it is used as it is when it fits the item (caption,
number of controls or layers) and is never overwritten or deleted.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import plural
from ..models.version import ModelVersion
from .items import ImageItem
from .prepare import control_mode, image_size

logger = logging.getLogger(__name__)

LATENT_FORMAT = "qwen_image_latents/2"
TEXT_FORMAT = "qwen_image_text/2"
OUR_FORMATS = ("qwen_image_latents/", "qwen_image_text/")
MUSUBI_ARCHITECTURES = {"qwen_image", "qwen_image_edit", "qwen_image_layered"}
MUSUBI_FORMAT_VERSION = "1.0.1"
_LATENT_KEY = re.compile(r"^latents_(\d+)x(\d+)x(\d+)_([a-z0-9_]+)$")
_CONTROL_KEY = re.compile(r"^latents_control_(\d+)_(\d+)x(\d+)x(\d+)_([a-z0-9_]+)$")
_TEXT_KEY = re.compile(r"^varlen_vl_embed_([a-z0-9_]+)$")
IMAGE_SLOTS_KEY = "image_slots"  # 2.1: which text positions are condition-image slots (uint8, L)


def fingerprint(path: Path) -> str:
    st = Path(path).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def model_id(path: str | Path) -> str:
    p = Path(path)
    size = sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else p.stat().st_size
    return f"{p.name}:{size}"


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def latent_cache_path(item: ImageItem, version: ModelVersion) -> Path:
    w, h = image_size(item.targets[0])
    return Path(item.config.cache_directory) / f"{item.key}_{w:04d}x{h:04d}_{version.arch_tag}.safetensors"


def text_cache_path(item: ImageItem, version: ModelVersion) -> Path:
    return Path(item.config.cache_directory) / f"{item.key}_{version.arch_tag}_te.safetensors"


def latent_metadata(item: ImageItem, version: ModelVersion, bucket: tuple[int, int], vae_id: str) -> dict[str, str]:
    """What must match for a latent cache of ours to be fresh. Edit and Edit-2509/2511 latents are identical, so
    the model version itself is not part of it."""
    return {
        "format": LATENT_FORMAT, "arch": version.arch_tag, "vae": vae_id, "bucket": f"{bucket[0]}x{bucket[1]}",
        "targets": "|".join(fingerprint(p) for p in item.targets),
        "controls": "|".join(fingerprint(p) for p in item.controls), "control_mode": control_mode(item),
    }


def text_metadata(item: ImageItem, version: ModelVersion, te_id: str) -> dict[str, str]:
    """What must match for a text cache of ours to be fresh (Edit-2509 and Edit-2511 share the template)."""
    return {
        "format": TEXT_FORMAT, "arch": version.arch_tag, "text_encoder": te_id, "template": version.template,
        "caption_sha": hashlib.sha256(item.caption.encode()).hexdigest()[:16],
        "controls": "|".join(fingerprint(p) for p in item.controls) if version.uses_controls else "",
        "control_mode": control_mode(item) if version.uses_controls else "",
    }


def latent_tensors(latents: torch.Tensor, controls: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """musubi-tuner's tensor names for (16, F, h, w) latents and (16, 1, h, w) control latents."""
    def key(prefix: str, t: torch.Tensor) -> str:
        _, f, h, w = t.shape
        return f"{prefix}_{f}x{h}x{w}_{dtype_name(t)}"

    out = {key("latents", latents): latents}
    out.update({key(f"latents_control_{i}", c): c for i, c in enumerate(controls)})
    return out


def latent_file_metadata(item: ImageItem, version: ModelVersion, expected: dict[str, str]) -> dict[str, str]:
    w, h = image_size(item.targets[0])
    return {"architecture": "qwen_image", "width": str(w), "height": str(h), "format_version": MUSUBI_FORMAT_VERSION,
            "model_version": version.name, **expected}


def text_file_metadata(item: ImageItem, version: ModelVersion, expected: dict[str, str]) -> dict[str, str]:
    return {"architecture": "qwen_image", "caption1": item.caption, "format_version": MUSUBI_FORMAT_VERSION,
            "model_version": version.name, **expected}


def _read(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:
        return None


def latent_keys(keys) -> tuple[str | None, list[str]]:
    """(target latent key, control keys by index) of a latent cache."""
    target = next((k for k in keys if _LATENT_KEY.match(k)), None)
    controls = sorted((k for k in keys if _CONTROL_KEY.match(k)), key=lambda k: int(_CONTROL_KEY.match(k)[1]))
    return target, controls


def text_key(keys) -> str | None:
    return next((k for k in keys if _TEXT_KEY.match(k)), None)


@dataclass
class CacheStatus:
    state: str  # fresh | stale | missing | foreign | foreign_mismatch
    reason: str | None = None

    @property
    def usable(self) -> bool:
        return self.state in ("fresh", "foreign")

    @property
    def ours(self) -> bool:
        return self.state in ("fresh", "stale")


def _ours(meta: dict[str, str]) -> bool:
    return meta.get("format", "").startswith(OUR_FORMATS)


def _status(path: Path, expected: dict[str, str], ignore: tuple[str, ...], foreign_check) -> CacheStatus:
    """Ours: fresh or stale by the recorded sources; musubi-tuner's: `foreign` when foreign_check(meta, shapes)
    finds nothing wrong with it for the item, else `foreign_mismatch` with the reason."""
    if not path.exists():
        return CacheStatus("missing")
    read = _read(path) if path.is_file() else None
    if read is None:
        return CacheStatus("stale", "unreadable")
    meta, shapes = read
    if _ours(meta):
        return _compare(meta, expected, ignore)
    if meta.get("architecture") not in MUSUBI_ARCHITECTURES:
        return CacheStatus("foreign_mismatch", f"architecture {meta.get('architecture')!r} is not Qwen-Image")
    problem = foreign_check(meta, shapes)
    return CacheStatus("foreign_mismatch", problem) if problem else CacheStatus("foreign")


def latent_status(path: Path, item: ImageItem, expected: dict[str, str], ignore: tuple[str, ...] = ()) -> CacheStatus:
    def check(meta, shapes) -> str | None:
        target, controls = latent_keys(shapes)
        if target is None:
            return "no latents_FxHxW_dtype tensor"
        if shapes[target][1] != len(item.targets):
            return f"{plural(shapes[target][1], 'frame')} but the item has {plural(len(item.targets), 'image')}"
        if len(controls) != len(item.controls):
            return (f"{plural(len(controls), 'control latent')} but the item has "
                    f"{plural(len(item.controls), 'control image')}")
        return None

    return _status(path, expected, ignore, check)


def text_status(path: Path, item: ImageItem, expected: dict[str, str], ignore: tuple[str, ...] = ()) -> CacheStatus:
    def check(meta, shapes) -> str | None:
        if text_key(shapes) is None:
            return "not a Qwen-Image text-encoder cache (no varlen_vl_embed tensor)"
        if meta.get("caption1", "").strip() != item.caption.strip():
            return f"it holds the caption {meta.get('caption1', '')[:60]!r}, not the item's {item.caption[:60]!r}"
        return None

    return _status(path, expected, ignore, check)


def _compare(meta: dict[str, str], expected: dict[str, str], ignore: tuple[str, ...]) -> CacheStatus:
    for k, v in expected.items():
        if k not in ignore and meta.get(k) != v:
            return CacheStatus("stale", f"{k} changed ({meta.get(k)!r} -> {v!r})")
    return CacheStatus("fresh")


def read_latent_cache(path: Path) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(latents (16, F, h, w), control latents) in float32, from a cache of ours or musubi-tuner's."""
    with safe_open(str(path), framework="pt") as f:
        target, controls = latent_keys(list(f.keys()))
        return f.get_tensor(target).float(), [f.get_tensor(k).float() for k in controls]


def read_text_cache(path: Path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(text_key(list(f.keys()))).float()


def read_image_slots(path: Path) -> torch.Tensor | None:
    """2.1 text caches: the image-slot mask (L,) bool; None in the caches of the other versions."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(IMAGE_SLOTS_KEY).bool() if IMAGE_SLOTS_KEY in f.keys() else None


def cache_shapes(path: Path) -> tuple[tuple, tuple]:
    """Shapes of the target latents and of each control latent (items in one batch must share them)."""
    with safe_open(str(path), framework="pt") as f:
        target, controls = latent_keys(list(f.keys()))
        return tuple(f.get_slice(target).get_shape()), tuple(tuple(f.get_slice(k).get_shape()) for k in controls)


_LATENT_RE = r"^.+_\d{{4,}}x\d{{4,}}_{arch}\.safetensors$"
_TEXT_RE = r"^.+_{arch}_te\.safetensors$"


def remove_orphans(cache_dirs: set[Path], keep: set[Path], version: ModelVersion, kind: str) -> tuple[int, int]:
    """Delete cache files of this arch and kind that no current item produced, but only those this tool wrote (they
    carry our format marker); files of other tools are reported and kept. Returns (removed, kept foreign)."""
    pattern = re.compile((_LATENT_RE if kind == "latents" else _TEXT_RE).format(arch=re.escape(version.arch_tag)))
    keep = {p.resolve() for p in keep}
    removed, foreign = 0, []
    for d in cache_dirs:
        for f in d.glob("*.safetensors"):
            if not pattern.match(f.name) or f.resolve() in keep:
                continue
            read = _read(f)
            if read is not None and _ours(read[0]):
                f.unlink()
                removed += 1
                logger.info("removed orphaned cache %s", f)
            else:
                foreign.append(f)
    if foreign:
        logger.info("%d cache file(s) that no item uses were not written by this tool and are kept (e.g. %s)",
                    len(foreign), foreign[0].name)
    return removed, len(foreign)
