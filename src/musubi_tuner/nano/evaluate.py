"""Scoring nano models with the judge: generate with the project's own pipeline pieces (text encoding, denoising,
decoding), read the pictures, count what is right.

- text to image: the shape and colour of the prompt (and, reported too, size, position and background);
- edit: the edited attribute is right and the others are kept;
- layered: each shape of the composite is matched (alpha IoU) by one of the generated layers.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..dataset.synthetic import Scene, caption, random_edit, random_layered_scene, random_scene, render, render_layers
from ..qwen_image import edit as E
from ..qwen_image.dit import LoraMerge, load_dit
from ..generation.prompts import GenerationSpec
from ..generation.saving import to_pil
from ..qwen_image.generation import Job, TextEncoderSession, denoise, encode_controls
from ..qwen_image.vae import decode, load_vae
from ..models.registry import VERSIONS
from ..models.version import ModelVersion
from .judge import Reading, read
from .models import IMAGE_SIZE

ATTRIBUTES = ("shape", "colour", "size", "position")


class NanoGenerator:
    """One version's models, loaded once (float32 on the CPU), generating at the nano size."""

    def __init__(self, paths: dict[str, Path], version: ModelVersion | str, loras: list[tuple[Path, float]] = (),
                 steps: int = 20, guidance: float = 1.0):
        self.version = VERSIONS[version] if isinstance(version, str) else version
        self.device, self.dtype = torch.device("cpu"), torch.float32
        args = argparse.Namespace(text_encoder=str(paths["text_encoder"]), tokenizer=str(paths["tokenizer"]),
                                  text_encoder_cpu=True, fp8_vl=False)
        self.text = TextEncoderSession(args, self.version, self.device, self.dtype)
        self.vae = load_vae(paths["vae"], self.dtype, self.device, self.version.vae_channels)
        self.model = load_dit(paths["dit"], self.version, self.dtype, self.device,
                              loras=[LoraMerge(str(p), m) for p, m in loras])
        self.steps, self.guidance = steps, guidance
        self.progress = None  # a tqdm bar that counts the generations, when set

    @torch.no_grad()
    def generate(self, prompt: str, seed: int, controls: list[Image.Image] = (), layers: int | None = None,
                 size: int = IMAGE_SIZE) -> list[Image.Image]:
        """The output frames (one image; layered: composite and layers, RGBA)."""
        spec = GenerationSpec(prompt=prompt, height=size, width=size, steps=self.steps,
                              guidance_scale=self.guidance, seed=seed, output_layers=layers)
        job = Job(spec)
        if controls:
            job.controls = list(controls)
            job.prepared = [E.prepare_control(c, "native", None) for c in controls]
            encode_controls(self.vae, [job], self.version)
        self.text.encode_job(job)
        lat = denoise(self.model, spec, job.encoded, self.device, self.dtype, self.version, job, progress=False)
        frames = [decode(self.vae, lat[:, :, f:f + 1])[0, :, 0] for f in range(lat.shape[2])]
        if self.progress is not None:
            self.progress.update(1)
        return [to_pil(p) for p in frames]


@dataclass
class Score:
    """Fractions right over `n` samples: `main` is the figure the version is judged by."""

    n: int = 0
    main: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"n": self.n, "main": round(self.main, 4), **{k: round(v, 4) for k, v in self.parts.items()}}


def heldout_scenes(seed: int, n: int, exclude: set[str] | None = None, **kw) -> list[Scene]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        sc = random_scene(rng, **kw)
        if exclude is None or caption(sc) not in exclude:
            out.append(sc)
    return out


def score_t2i(gen: NanoGenerator, scenes: list[Scene], seed: int = 1000) -> Score:
    hits = {a: 0 for a in ATTRIBUTES + ("background",)}
    main = 0
    for i, sc in enumerate(scenes):
        r = read(gen.generate(caption(sc), seed + i)[0])
        want = sc.shapes[0]
        got = r.main
        ok = {a: got is not None and getattr(got, a) == getattr(want, a) for a in ATTRIBUTES}
        ok["background"] = r.background == sc.background
        for a, v in ok.items():
            hits[a] += v
        main += ok["shape"] and ok["colour"]
    n = len(scenes)
    return Score(n, main / n, {a: v / n for a, v in hits.items()})


def _kept(r: Reading, target: Scene) -> dict[str, bool]:
    got, want = r.main, target.shapes[0]
    ok = {a: got is not None and getattr(got, a) == getattr(want, a) for a in ATTRIBUTES}
    ok["background"] = r.background == target.background
    return ok


EDIT_TARGET = {"colour": "colour", "shape": "shape", "position": "position", "background": "background",
               "enlarge": "size", "two_image": "colour"}


def score_edits(gen: NanoGenerator, kinds: tuple[str, ...], n_per_kind: int, seed: int = 2000) -> Score:
    """Per kind: the fraction of edits whose target attribute is right and whose other attributes are kept."""
    parts, total, count = {}, 0, 0
    for kind in kinds:
        rng = random.Random(f"{seed}-{kind}")  # str seeds are hashed the same in every process (hash() is not)
        right = 0
        for i in range(n_per_kind):
            sources, instruction, target = random_edit(rng, kind)
            frames = gen.generate(instruction, seed + i, controls=[render(s) for s in sources])
            ok = _kept(read(frames[0]), target)
            right += all(ok.values())
        parts[kind] = right / n_per_kind
        total += right
        count += n_per_kind
    return Score(count, total / max(1, count), parts)


def alpha_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter, union = np.logical_and(a, b).sum(), np.logical_or(a, b).sum()
    return float(inter / union) if union else 1.0


def score_layered(gen: NanoGenerator, n: int, n_shapes: int, seed: int = 3000, shapes=None) -> Score:
    """`main`: the mean over samples of the mean, over the composite's shapes, of the best alpha IoU of any generated
    layer (alpha > 0.5) with that shape's true layer; `kind`: the fraction of shapes whose best layer, shown on the
    scene's background, the judge reads as the right shape kind and colour."""
    rng = random.Random(seed)
    ious, kinds = [], []
    for i in range(n):
        sc = random_layered_scene(rng, n_shapes, shapes=shapes)
        comp, layers = render_layers(sc)
        frames = gen.generate(caption(sc), seed + i, controls=[comp], layers=n_shapes + 1)
        got = [np.asarray(f)[:, :, 3] > 127 for f in frames[1:]]
        sample = []
        for want, layer in zip(sc.shapes, layers[1:]):
            scores = [alpha_iou(np.asarray(layer)[:, :, 3] > 127, g) for g in got]
            best = int(np.argmax(scores))
            sample.append(scores[best])
            shown = read(Image.alpha_composite(layers[0], frames[1 + best].convert("RGBA")))
            kinds.append(any(r.shape == want.shape and r.colour == want.colour for r in shown.shapes))
        ious.append(float(np.mean(sample)))
    return Score(n, float(np.mean(ious)), {"kind": float(np.mean(kinds)), "min_sample": float(np.min(ious))})
