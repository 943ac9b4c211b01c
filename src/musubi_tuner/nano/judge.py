"""A deterministic judge of shapes-world pictures (no learned model): it reads the background colour and, for each
shape, its colour, kind (circle, square, triangle, diamond), size and position, from the pixels.

Segmentation: pixels far from the background colour and close to a palette colour belong to that colour; connected
regions of one colour are shapes (tiny or thin regions are noise or blended edges). Kind: a triangle is narrow at the top and
wide at the bottom, a diamond narrow at both ends, a square fills its bounding box, a circle fills about pi/4 of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..dataset.synthetic import BACKGROUNDS, PALETTE, POSITIONS, SIZES, Scene

FOREGROUND_DISTANCE = 70.0  # RGB distance from the background colour
COLOUR_DISTANCE = 110.0  # a shape pixel is this close to its palette colour (blended edges are not)
MIN_FILL = 0.3  # of the bounding box: thin outlines (edges of another shape) are not shapes
MIN_AREA_FRACTION = 0.012  # smaller regions are noise (a small shape covers ~6% of the image)


@dataclass(frozen=True)
class ShapeReading:
    shape: str
    colour: str
    size: str
    position: str
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


@dataclass(frozen=True)
class Reading:
    background: str
    shapes: tuple[ShapeReading, ...]  # largest first

    @property
    def main(self) -> ShapeReading | None:
        return self.shapes[0] if self.shapes else None


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(table)
    d = np.linalg.norm(np.array([table[n] for n in names], dtype=np.float32) - rgb[None], axis=1)
    return names[int(d.argmin())], float(d.min())


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, each as a boolean mask."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n = len(out) + 1
        stack = [(y0, x0)]
        labels[y0, x0] = n
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
        out.append(labels == n)
    return out


def classify(region: np.ndarray) -> str:
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = region[y0:y1, x0:x1]
    h = y1 - y0
    widths = box.sum(axis=1).astype(np.float32)

    def width(f: float) -> float:  # mean width of the rows around a fraction f of the height
        i = min(h - 1, int(f * h))
        return widths[max(0, i - 1): i + 2].mean()

    top, mid, bottom = width(0.12), width(0.5), width(0.88)
    if top < 0.45 * bottom:
        return "triangle"
    if top < 0.45 * mid and bottom < 0.45 * mid:
        return "diamond"
    return "square" if box.mean() > 0.88 else "circle"


def read(image: Image.Image) -> Reading:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    side = arr.shape[0]
    border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3),
                             arr[:, -2:].reshape(-1, 3)])
    background, _ = _nearest(np.median(border, axis=0), BACKGROUNDS)
    bg = np.array(BACKGROUNDS[background], dtype=np.float32)
    fg = np.linalg.norm(arr - bg, axis=2) > FOREGROUND_DISTANCE
    names = list(PALETTE)
    pal = np.array([PALETTE[n] for n in names], dtype=np.float32)
    dist = np.linalg.norm(arr[:, :, None, :] - pal[None, None], axis=3)
    nearest = np.where(dist.min(axis=2) < COLOUR_DISTANCE, dist.argmin(axis=2), -1)
    shapes = []
    min_area = MIN_AREA_FRACTION * arr.shape[0] * arr.shape[1]
    for k, name in enumerate(names):
        for region in _components(fg & (nearest == k)):
            area = int(region.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(region)
            if area < MIN_FILL * (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1):
                continue
            extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / side
            size = "small" if extent < (SIZES["small"] + SIZES["large"]) / 2 else "large"
            cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2  # bounding-box centre
            col, row = min(2, int(3 * cx / side)), min(2, int(3 * cy / side))
            position = next(p for p, cr in POSITIONS.items() if cr == (col, row))
            shapes.append(ShapeReading(classify(region), name, size, position, area,
                                       (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return Reading(background, tuple(sorted(shapes, key=lambda s: -s.area)))


def matches(reading: Reading, scene: Scene, attributes=("shape", "colour", "size", "position")) -> bool:
    """The picture shows the scene: the same background and, for each scene shape, a read shape with the same
    attributes (the given ones), and no extra shapes."""
    if reading.background != scene.background or len(reading.shapes) != len(scene.shapes):
        return False
    left = list(reading.shapes)
    for s in scene.shapes:
        hit = next((r for r in left if all(getattr(r, a) == getattr(s, a) for a in attributes)), None)
        if hit is None:
            return False
        left.remove(hit)
    return True
