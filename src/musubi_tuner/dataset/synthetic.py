"""Generated datasets: coloured shapes with captions for the tests (write_shapes_dataset), and the shapes world the
nano models are trained on (scenes, captions, rendering, layers)."""

from __future__ import annotations

import dataclasses
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


# The shapes world of the nano models: one or more flat shapes (circle, square, triangle) in a few colours, two
# sizes and nine positions, on a few background colours, with captions from templates. Rendered at 4x and reduced,
# so edges are anti-aliased like a photo's.

WORLD_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (240, 210, 40)}
NEW_COLOURS = {"purple": (150, 50, 200)}  # never in the base models' data: the demo teaches it with a LoRA
PALETTE = {**WORLD_COLOURS, **NEW_COLOURS}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
WORLD_SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.28, "large": 0.47}  # shape extent as a fraction of the image side
POSITIONS = {"top left": (0, 0), "top": (1, 0), "top right": (2, 0), "left": (0, 1), "center": (1, 1),
             "right": (2, 1), "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2)}


@dataclasses.dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0  # jitter of the centre, as a fraction of the image side
    dy: float = 0.0


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]


def phrase(s: Shape) -> str:
    where = "in the center" if s.position == "center" else f"at the {s.position}"
    return f"a {s.size} {s.colour} {s.shape} {where}"


def caption(scene: Scene) -> str:
    return " and ".join(phrase(s) for s in scene.shapes) + f" on a {scene.background} background"


def random_shape(rng: random.Random, colours=None, shapes=None, sizes=None, positions=None) -> Shape:
    return Shape(rng.choice(list(shapes or WORLD_SHAPES)), rng.choice(list(colours or WORLD_COLOURS)),
                 rng.choice(list(sizes or SIZES)), rng.choice(list(positions or POSITIONS)),
                 rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))


def _apart(a: str, b: str) -> bool:
    """Two grid positions whose shapes can never touch (not neighbours, diagonals included)."""
    (ca, ra), (cb, rb) = POSITIONS[a], POSITIONS[b]
    return max(abs(ca - cb), abs(ra - rb)) > 1


def random_scene(rng: random.Random, n_shapes: int = 1, colours=None, shapes=None, backgrounds=None) -> Scene:
    """n_shapes shapes in different colours at positions far enough apart that they never touch."""
    for _ in range(1000):
        positions = rng.sample(list(POSITIONS), n_shapes)
        if all(_apart(a, b) for i, a in enumerate(positions) for b in positions[i + 1:]):
            break
    else:
        raise ValueError(f"cannot place {n_shapes} shapes apart")
    names = rng.sample(list(colours or WORLD_COLOURS), n_shapes)
    picked = [dataclasses.replace(random_shape(rng, colours, shapes), position=p, colour=c)
              for p, c in zip(positions, names)]
    return Scene(rng.choice(list(backgrounds or BACKGROUNDS)), tuple(picked))


def _polygon(s: Shape, side: int) -> tuple[str, list]:
    col, row = POSITIONS[s.position]  # centres at 1/4, 1/2, 3/4 of the side: large shapes stay inside
    cx, cy = (0.25 + 0.25 * col + s.dx) * side, (0.25 + 0.25 * row + s.dy) * side
    r = SIZES[s.size] * side / 2
    if s.shape == "circle":
        return "ellipse", [cx - r, cy - r, cx + r, cy + r]
    if s.shape == "square":
        return "rectangle", [cx - r, cy - r, cx + r, cy + r]
    if s.shape == "triangle":  # apex up
        return "polygon", [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if s.shape == "diamond":
        return "polygon", [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(s.shape)


def render_shape_layer(s: Shape, size: int = 64, supersample: int = 4) -> Image.Image:
    """One shape on a transparent canvas (RGBA), anti-aliased."""
    big = size * supersample
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    kind, geom = _polygon(s, big)
    getattr(ImageDraw.Draw(layer), kind)(geom, fill=PALETTE[s.colour] + (255,))
    return layer.resize((size, size), Image.LANCZOS)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image (shapes drawn in order, later ones on top)."""
    img = Image.new("RGBA", (size, size), BACKGROUNDS[scene.background] + (255,))
    for s in scene.shapes:
        img = Image.alpha_composite(img, render_shape_layer(s, size))
    return img.convert("RGB")


def render_layers(scene: Scene, size: int = 64) -> tuple[Image.Image, list[Image.Image]]:
    """(composite RGBA, one RGBA layer per shape; the background is the first layer), as Qwen-Image-Layered
    datasets hold them."""
    background = Image.new("RGBA", (size, size), BACKGROUNDS[scene.background] + (255,))
    layers = [background] + [render_shape_layer(s, size) for s in scene.shapes]
    comp = layers[0]
    for layer in layers[1:]:
        comp = Image.alpha_composite(comp, layer)
    return comp, layers


# Edits of the shapes world: (source scene, instruction, target scene). Single-image kinds change one attribute of
# the one shape (or the background); the two-image kind combines two pictures.
EDIT_KINDS = ("colour", "shape", "position", "background")
NEW_EDIT_KINDS = ("enlarge",)  # never in the base models' data: the demo teaches it with a LoRA


def random_edit(rng: random.Random, kind: str, colours=None, shapes=None) -> tuple[list[Scene], str, Scene]:
    """([source scenes], instruction, target scene) of one edit."""
    colours = list(colours or WORLD_COLOURS)
    if kind == "two_image":  # the shape of picture 1 in the colour of picture 2
        a = random_scene(rng, colours=colours, shapes=shapes)
        b = random_scene(rng, colours=[c for c in colours if c != a.shapes[0].colour], shapes=shapes)
        target = Scene(a.background, (dataclasses.replace(a.shapes[0], colour=b.shapes[0].colour),))
        return [a, b], "the shape of picture 1 in the colour of picture 2", target
    src = random_scene(rng, colours=colours, shapes=shapes)
    s = src.shapes[0]
    if kind == "colour":
        new = rng.choice([c for c in colours if c != s.colour])
        return [src], f"make it {new}", Scene(src.background, (dataclasses.replace(s, colour=new),))
    if kind == "shape":
        new = rng.choice([k for k in (shapes or WORLD_SHAPES) if k != s.shape])
        return [src], f"turn it into a {new}", Scene(src.background, (dataclasses.replace(s, shape=new),))
    if kind == "position":
        new = rng.choice([p for p in POSITIONS if p != s.position])
        where = "the center" if new == "center" else f"the {new}"
        return [src], f"move it to {where}", Scene(src.background, (dataclasses.replace(s, position=new),))
    if kind == "background":
        new = rng.choice([b for b in BACKGROUNDS if b != src.background])
        return [src], f"make the background {new}", Scene(new, src.shapes)
    if kind == "enlarge":
        small = Scene(src.background, (dataclasses.replace(s, size="small"),))
        return [small], "make it large", Scene(src.background, (dataclasses.replace(s, size="large"),))
    raise ValueError(kind)


def random_layered_scene(rng: random.Random, n_shapes: int, colours=None, shapes=None) -> Scene:
    """Overlapping shapes for layer decomposition: distinct colours, positions at most one grid step apart."""
    names = rng.sample(list(colours or WORLD_COLOURS), n_shapes)
    first = rng.choice(["center", "top", "left", "right", "bottom"])
    picked = [dataclasses.replace(random_shape(rng, colours, shapes), colour=names[0], position=first)]
    while len(picked) < n_shapes:
        c, r = POSITIONS[picked[0].position]
        near = [p for p, (cc, rr) in POSITIONS.items() if max(abs(cc - c), abs(rr - r)) <= 1]
        picked.append(dataclasses.replace(random_shape(rng, colours, shapes), colour=names[len(picked)],
                                          position=rng.choice(near), size="large"))
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(picked))
