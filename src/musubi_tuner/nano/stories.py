"""What the demo teaches each nano model with a LoRA, and how the judge scores it.

- original: the colour word "purple" (the base model was never shown it): text to image of purple shapes;
- edit-2511: a new kind of edit, "make it large" (the base model knows colour, shape, position and background edits);
- layered: a new shape, the diamond: composites with diamonds decomposed into layers that show diamonds.

Each story has a dataset writer, a score on the new concept and one on the old concepts (what was forgotten), and the
prompts of the before / after grid.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from ..dataset.synthetic import EDIT_KINDS, caption, random_edit, random_layered_scene, render, render_layers
from . import evaluate as ev
from .build import write_edit_dataset, write_layered_dataset, write_t2i_dataset


@dataclass(frozen=True)
class GridRow:
    prompt: str
    controls: tuple[Image.Image, ...] = ()
    layers: int | None = None
    label: str = ""


@dataclass(frozen=True)
class Story:
    version: str
    concept: str  # what is taught, in words
    write_dataset: Callable[[Path, int, int], Path]  # (folder, items, seed) -> dataset config
    score_concept: Callable[[ev.NanoGenerator, int, int], ev.Score]  # (generator, samples, seed)
    score_old: Callable[[ev.NanoGenerator, int, int], ev.Score]
    grid_rows: Callable[[int], list[GridRow]]  # seed -> rows (new concept first, then one old one)
    items: int = 48  # training examples of the new concept
    data_note: str = ""  # what else the dataset holds
    steps: int = 300  # LoRA training steps
    learning_rate: float = 2e-3
    score_label: str = "right"


def _purple_rows(seed: int) -> list[GridRow]:
    rng = random.Random(seed)
    rows = [GridRow(caption(sc), label="new") for sc in ev.heldout_scenes(rng.randrange(1 << 30), 4, colours=["purple"])]
    return rows + [GridRow(caption(ev.heldout_scenes(seed + 1, 1)[0]), label="old")]


def _edit_rows(seed: int) -> list[GridRow]:
    rng = random.Random(seed)
    rows = []
    for kind in ("enlarge",) * 4 + ("colour",):
        sources, instruction, _ = random_edit(rng, kind)
        rows.append(GridRow(instruction, tuple(render(s) for s in sources), label="new" if kind == "enlarge" else "old"))
    return rows


def _layered_rows(seed: int) -> list[GridRow]:
    rng = random.Random(seed)
    rows = []
    for shapes, label in ((("diamond",), "new"),) * 3 + (((None, "old")),):
        sc = random_layered_scene(rng, 2, shapes=shapes)
        rows.append(GridRow(caption(sc), (render_layers(sc)[0],), 3, label))
    return rows


def _with_old_scenes(root: Path, n: int, seed: int) -> Path:
    """n purple scenes and as many of the colours the model knows (so that the LoRA learns the new word, not "every
    shape is purple")."""
    write_t2i_dataset(root, n, seed, set(), colours=["purple"], two_shapes=0.0)
    return write_t2i_dataset(root, n, seed + 1, set(), two_shapes=0.0, start=n)


def _merged(root: Path, new: Path, old: Path) -> Path:
    """One dataset config with the datasets of both (the new concept's first)."""
    text = old.read_text()
    config = root / "dataset.toml"
    config.write_text(new.read_text() + text[text.index("[[datasets]]"):])
    return config


def _diamonds_with_old_shapes(root: Path, n: int, seed: int) -> Path:
    """n composites with diamonds and as many with the shapes the model knows (without them the LoRA learns "every
    layer is a diamond": the old shapes fell from 92% to 18% in a trial)."""
    return _merged(root, write_layered_dataset(root / "diamonds", n, seed, shapes=("diamond",)),
                   write_layered_dataset(root / "known", n, seed + 1))


def _enlarge_with_old_edits(root: Path, n: int, seed: int) -> Path:
    """n "make it large" edits and as many of the edits the model knows (so that it learns the new instruction, not
    "make everything large")."""
    return _merged(root, write_edit_dataset(root / "enlarge", n, seed, kinds=("enlarge",), two_image=0.0),
                   write_edit_dataset(root / "known", n, seed + 1, two_image=0.0))


STORIES = {
    "original": Story(
        "original", 'the colour word "purple"',
        lambda root, n, seed: _with_old_scenes(root, n, seed),
        lambda gen, n, seed: ev.score_t2i(gen, ev.heldout_scenes(seed, n, colours=["purple"])),
        lambda gen, n, seed: ev.score_t2i(gen, ev.heldout_scenes(seed + 1, n)),
        _purple_rows, score_label="purple and the right shape", data_note=" and as many of the colours it knows"),
    "edit-2511": Story(
        "edit-2511", 'a new kind of edit, "make it large"',
        lambda root, n, seed: _enlarge_with_old_edits(root, n, seed),
        lambda gen, n, seed: ev.score_edits(gen, ("enlarge",), n, seed),
        lambda gen, n, seed: ev.score_edits(gen, EDIT_KINDS, max(1, n // len(EDIT_KINDS)), seed + 1),
        _edit_rows, score_label="large and everything else kept", data_note=" and as many of the edits it knows"),
    "layered": Story(
        "layered", "a new shape, the diamond, in layer decomposition",
        lambda root, n, seed: _diamonds_with_old_shapes(root, n, seed),
        lambda gen, n, seed: _layered_kind(ev.score_layered(gen, n, 2, seed, shapes=("diamond",))),
        lambda gen, n, seed: _layered_kind(ev.score_layered(gen, n, 2, seed + 1)),
        _layered_rows, score_label="layers read as the right shape and colour",
        data_note=" and as many of the shapes it knows"),
}


def _layered_kind(score: ev.Score) -> ev.Score:
    """Judged by the shapes the layers show (the alpha IoU is reported beside)."""
    return dataclasses.replace(score, main=score.parts["kind"], parts={"alpha_iou": score.main, **score.parts})


def judged_generations(story: Story, samples: int) -> int:
    """How many images scoring the new and the old concepts generates (for the demo's progress bar)."""
    if story.version == "edit-2511":  # the old edits: samples // kinds of each kind
        return samples + max(1, samples // len(EDIT_KINDS)) * len(EDIT_KINDS)
    return 2 * samples
