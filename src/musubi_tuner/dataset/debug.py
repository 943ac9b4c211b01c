"""--debug_mode of the latent caching script: show what would be cached (bucket, crops, controls) instead of
caching it, as musubi-tuner's does. `console` prints one line per item; `image` writes the prepared images (targets
and controls, exactly the pixels the VAE would see) to <cache_directory>/debug/ for a look; `video` (musubi-tuner's
name: it saves each image item as a JPEG beside where its cache goes, `<cache name>.jpg`) writes the prepared targets
there (`_1.jpg`, ... for the layers of a layered item)."""

from __future__ import annotations

from pathlib import Path

from ..fileio import save_image
from ..models.version import ModelVersion
from .cache import latent_cache_path
from .items import ImageItem
from .prepare import image_size, prepare_item


def show_dataset(items: list[ImageItem], version: ModelVersion, mode: str, args) -> dict:
    from ..generation.saving import to_pil

    written = []
    for it in items:
        prep = prepare_item(it, version)
        w, h = image_size(it.targets[0])
        controls = " ".join(f"{c.size[0]}x{c.size[1]}" for c in prep.control_images)
        print(f"{it.key}: {w}x{h} -> bucket {prep.bucket[0]}x{prep.bucket[1]}, {len(it.targets)} target image(s)"
              + (f", controls {controls}" if controls else "") + f" | {it.caption[:80]}")
        targets = [to_pil(prep.targets[:, f]) for f in range(prep.targets.shape[1])]
        if mode == "image":
            folder = Path(it.config.cache_directory) / "debug"
            for f, img in enumerate(targets):
                written.append(save_image(img, folder / f"{it.key}_target{f}.png"))
            for k, c in enumerate(prep.control_images):
                written.append(save_image(c, folder / f"{it.key}_control{k}.png"))
        elif mode == "video":
            cache = latent_cache_path(it, version)
            for f, img in enumerate(targets):
                name = cache.stem + (f"_{f}" if len(targets) > 1 else "") + ".jpg"
                written.append(save_image(img.convert("RGB"), cache.with_name(name)))
    if written:
        print(f"{len(written)} prepared image(s) written to {written[0].parent}")
    return {"shown": len(items), "written": written}
