"""A small generated dataset (coloured shapes with captions) for the embedded default job and the tests."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square")


def _draw(size, colour, shape, bg=(255, 255, 255), rgba=False, box=None):
    w, h = size
    im = Image.new("RGBA" if rgba else "RGB", size, (0, 0, 0, 0) if rgba else bg)
    d = ImageDraw.Draw(im)
    box = box or (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    fill = colour + ((255,) if rgba else ())
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=fill)
    return im


def write_shapes_dataset(folder: str | Path, n: int = 8, size: tuple[int, int] = (128, 128), seed: int = 0,
                         controls: int = 0, layers: int = 0, colours: list[str] | None = None) -> Path:
    """Write n images `<i>.png` + `<i>.txt` captions; controls: a `control/` folder with `<i>_<k>.png`;
    layers: `<i>_1.png ...` RGBA layers (the composite is `<i>.png`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = colours or list(COLOURS)
    for i in range(n):
        colour, shape = rng.choice(names), rng.choice(SHAPES)
        stem = f"img{i:03d}"
        if layers:
            w, h = size
            parts = []
            for k in range(layers):
                c = COLOURS[rng.choice(names)]
                x0, y0 = rng.randrange(0, w // 2), rng.randrange(0, h // 2)
                parts.append(_draw(size, c, rng.choice(SHAPES), rgba=True, box=(x0, y0, x0 + w // 3, y0 + h // 3)))
            comp = Image.new("RGBA", size, (255, 255, 255, 255))
            for k, part in enumerate(parts, 1):
                part.save(folder / f"{stem}_{k}.png")
                comp = Image.alpha_composite(comp, part)
            comp.save(folder / f"{stem}.png")
        else:
            _draw(size, COLOURS[colour], shape).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"a {colour} {shape} on a white background")
        if controls:
            cdir = folder.parent / f"{folder.name}_control"
            cdir.mkdir(exist_ok=True)
            for k in range(controls):
                csize = size if k == 0 else (size[0] // 2 + 16 * k, size[1])
                _draw(csize, COLOURS[rng.choice(names)], rng.choice(SHAPES)).save(cdir / f"{stem}_{k}.png")
    return folder
