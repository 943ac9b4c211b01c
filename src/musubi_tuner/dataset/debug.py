"""--debug_mode of the latent caching script: show what would be cached (bucket, crops, controls) instead of
caching it, as musubi-tuner's does. `console` prints one line per item; `image` writes the prepared images (targets
and controls, exactly the pixels the VAE would see) to <cache_directory>/debug/ for a look."""

from __future__ import annotations

from pathlib import Path

from ..fileio import save_image
from ..qwen_image.versions import ModelVersion
from .items import ImageItem
from .prepare import image_size, prepare_item


def show_dataset(items: list[ImageItem], version: ModelVersion, mode: str, args) -> dict:
    from PIL import Image

    written = []
    for it in items:
        prep = prepare_item(it, version)
        w, h = image_size(it.targets[0])
        controls = " ".join(f"{c.size[0]}x{c.size[1]}" for c in prep.control_images)
        print(f"{it.key}: {w}x{h} -> bucket {prep.bucket[0]}x{prep.bucket[1]}, {len(it.targets)} target image(s)"
              + (f", controls {controls}" if controls else "") + f" | {it.caption[:80]}")
        if mode == "image":
            folder = Path(it.config.cache_directory) / "debug"
            for f in range(prep.targets.shape[1]):
                arr = ((prep.targets[:, f].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
                img = Image.fromarray(arr, mode="RGBA" if arr.shape[2] == 4 else "RGB")
                written.append(save_image(img, folder / f"{it.key}_target{f}.png"))
            for k, c in enumerate(prep.control_images):
                written.append(save_image(c, folder / f"{it.key}_control{k}.png"))
    if written:
        print(f"{len(written)} prepared image(s) written to {written[0].parent}")
    return {"shown": len(items), "written": written}
