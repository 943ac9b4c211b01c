"""Cache files: names, metadata that records what produced them, freshness checks, orphan removal.

Latents:  <cache_directory>/<item>_<W>x<H>_<arch>.safetensors   tensors `latents` (16, F, h, w), `control_<i>`
Text:     <cache_directory>/<item>_<arch>_te.safetensors        tensor `embed` (L, 3584)
arch is the version's tag (qi, qie, qil). A cache whose metadata does not match the current image, caption, model
version, model file or resolution is stale: it is rebuilt by the caching scripts and refused by the trainer.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from safetensors import safe_open

from ..qwen_image.versions import ModelVersion
from .items import ImageItem
from .prepare import control_mode

logger = logging.getLogger(__name__)

LATENT_FORMAT = "qwen_image_latents/1"
TEXT_FORMAT = "qwen_image_text/1"


def fingerprint(path: Path) -> str:
    st = Path(path).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def model_id(path: str | Path) -> str:
    p = Path(path)
    size = sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else p.stat().st_size
    return f"{p.name}:{size}"


def latent_cache_path(item: ImageItem, version: ModelVersion, bucket: tuple[int, int]) -> Path:
    return Path(item.config.cache_directory) / f"{item.key}_{bucket[0]:04d}x{bucket[1]:04d}_{version.arch_tag}.safetensors"


def text_cache_path(item: ImageItem, version: ModelVersion) -> Path:
    return Path(item.config.cache_directory) / f"{item.key}_{version.arch_tag}_te.safetensors"


def latent_metadata(item: ImageItem, version: ModelVersion, bucket: tuple[int, int], vae_id: str) -> dict[str, str]:
    return {
        "format": LATENT_FORMAT, "model_version": version.name, "arch": version.arch_tag, "vae": vae_id,
        "bucket": f"{bucket[0]}x{bucket[1]}", "targets": "|".join(fingerprint(p) for p in item.targets),
        "controls": "|".join(fingerprint(p) for p in item.controls), "control_mode": control_mode(item),
    }


def text_metadata(item: ImageItem, version: ModelVersion, te_id: str) -> dict[str, str]:
    return {
        "format": TEXT_FORMAT, "model_version": version.name, "arch": version.arch_tag, "text_encoder": te_id,
        "template": version.template, "caption_sha": hashlib.sha256(item.caption.encode()).hexdigest()[:16],
        "controls": "|".join(fingerprint(p) for p in item.controls) if version.is_edit else "",
        "control_mode": control_mode(item) if version.is_edit else "",
    }


def read_metadata(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return None  # a corrupt cache is simply stale


def stale_reason(path: Path, expected: dict[str, str], ignore: tuple[str, ...] = ()) -> str | None:
    """None when the cache at `path` was produced from exactly `expected`; otherwise why not."""
    meta = read_metadata(path)
    if meta is None:
        return "missing or unreadable"
    for k, v in expected.items():
        if k not in ignore and meta.get(k) != v:
            return f"{k} changed ({meta.get(k)!r} -> {v!r})"
    return None


_LATENT_RE = r"^.+_\d{{4,}}x\d{{4,}}_{arch}\.safetensors$"
_TEXT_RE = r"^.+_{arch}_te\.safetensors$"


def remove_orphans(cache_dirs: set[Path], keep: set[Path], version: ModelVersion, kind: str) -> int:
    """Delete our cache files of this arch and kind that no current item produced; returns how many."""
    pattern = re.compile((_LATENT_RE if kind == "latents" else _TEXT_RE).format(arch=re.escape(version.arch_tag)))
    keep = {p.resolve() for p in keep}
    removed = 0
    for d in cache_dirs:
        for f in d.glob("*.safetensors"):
            if pattern.match(f.name) and f.resolve() not in keep:
                f.unlink()
                removed += 1
                logger.info("removed orphaned cache %s", f)
    return removed
