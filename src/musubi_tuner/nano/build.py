"""Rebuild every shipped nano file from scratch, with fixed seeds: the text encoder (random, fixed), the RGB and RGBA
VAEs (trained here on the shapes world), and the DiTs of four versions, trained from random initialisation with the
project's own caching scripts and full-finetuning script, then scored with the judge.

    python -m musubi_tuner.nano build --output DIR [--quick]

Edit-2509 starts from the trained text-to-image weights (as Qwen-Image-Edit was initialised from Qwen-Image: it
knows the shapes world and has to learn to read the control images), Edit-2511 from the trained Edit-2509 weights
(as the real 2511 continues from earlier edit models) with its zero_cond_t modulation; the text-to-image and layered
DiTs start from random weights.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..dataset.synthetic import (
    EDIT_KINDS, Scene, caption, random_edit, random_layered_scene, random_scene, render, render_layers,
)
from ..errors import UserError
from ..fileio import atomic_path, save_safetensors, temp_folder
from ..models.registry import VERSIONS
from . import evaluate as ev
from .models import IMAGE_SIZE, nano_dit, nano_vae, stamp_recommended, write_text_encoder
from .vae_training import evaluate_vae, latent_statistics, train_vae

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """Sizes of a build; `quick()` is a smoke-test version of the same steps."""

    vae_steps: int = 2500
    vae_batch: int = 8
    vae_learning_rate: float = 3e-4
    t2i_images: int = 2400
    edit_items: int = 2400
    layered_items: int = 1200
    steps: dict | None = None  # DiT training steps per version
    batch_size: int = 32
    learning_rate: float = 1e-3
    eval_samples: int = 120
    seed: int = 0
    timestep_sampling: tuple = ("shift", "--discrete_flow_shift", "2.2")

    def __post_init__(self):
        self.steps = self.steps or {"original": 9000, "edit-2509": 5500, "edit-2511": 1500, "layered": 3000}

    @classmethod
    def quick(cls) -> "Plan":
        return cls(vae_steps=4, vae_batch=2, t2i_images=16, edit_items=16, layered_items=8,
                   steps={"original": 2, "edit-2509": 2, "edit-2511": 2, "layered": 2}, batch_size=4,
                   eval_samples=3)


def heldout_captions(seed: int, fraction: float = 0.15) -> set[str]:
    """Single-shape captions (without jitter) kept out of the text-to-image training set, for scoring."""
    from ..dataset.synthetic import BACKGROUNDS, POSITIONS, SIZES, WORLD_COLOURS, WORLD_SHAPES, Shape

    every = sorted(caption(Scene(bg, (Shape(k, c, s, p),))) for bg in BACKGROUNDS for k in WORLD_SHAPES
                   for c in WORLD_COLOURS for s in SIZES for p in POSITIONS)
    return set(random.Random(seed).sample(every, int(len(every) * fraction)))


def _write_item(folder: Path, stem: str, image, text: str) -> None:
    image.save(folder / f"{stem}.png")
    (folder / f"{stem}.txt").write_text(text)


def write_t2i_dataset(root: Path, n: int, seed: int, exclude: set[str], colours=None, two_shapes: float = 0.1,
                      start: int = 0) -> Path:
    """Scenes of one shape or (a fraction `two_shapes`) two, none of whose captions is in `exclude`; file numbers
    from `start` (several calls fill one folder)."""
    img = root / "images"
    img.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    i = start
    n += start
    while i < n:
        sc = random_scene(rng, 2 if rng.random() < two_shapes else 1, colours=colours)
        if caption(dataclass_free(sc)) in exclude:
            continue
        _write_item(img, f"{i:05d}", render(sc, IMAGE_SIZE), caption(sc))
        i += 1
    return _toml(root, [f'image_directory = "{img}"\ncache_directory = "{root / "cache"}"'])


def dataclass_free(sc: Scene) -> Scene:
    """The scene without jitter (captions do not depend on it, but the held-out set is keyed by caption)."""
    import dataclasses

    return Scene(sc.background, tuple(dataclasses.replace(s, dx=0.0, dy=0.0) for s in sc.shapes))


def write_edit_dataset(root: Path, n: int, seed: int, kinds=EDIT_KINDS, two_image: float = 0.2, colours=None) -> Path:
    """Single-image edits of the given kinds and (a fraction) two-image edits, as two datasets (one control image
    and two)."""
    rng = random.Random(seed)
    entries = []
    for sub, count, pick in (("single", int(n * (1 - two_image)), lambda: rng.choice(kinds)),
                             ("double", int(n * two_image), lambda: "two_image")):
        if count == 0:
            continue
        img, ctrl = root / sub / "images", root / sub / "controls"
        img.mkdir(parents=True, exist_ok=True)
        ctrl.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            sources, instruction, target = random_edit(rng, pick(), colours=colours)
            _write_item(img, f"{i:05d}", render(target, IMAGE_SIZE), instruction)
            for k, s in enumerate(sources):
                render(s, IMAGE_SIZE).save(ctrl / (f"{i:05d}.png" if len(sources) == 1 else f"{i:05d}_{k}.png"))
        entries.append(f'image_directory = "{img}"\ncontrol_directory = "{ctrl}"\n'
                       f'cache_directory = "{root / sub / "cache"}"\nno_resize_control = true')
    return _toml(root, entries)


def write_layered_dataset(root: Path, n: int, seed: int, shapes=None, colours=None) -> Path:
    """Composites of 2 and 3 overlapping shapes with their layers (background first), one dataset per count."""
    rng = random.Random(seed)
    entries = []
    for k in (2, 3):
        img = root / f"shapes{k}"
        img.mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            sc = random_layered_scene(rng, k, colours=colours, shapes=shapes)
            comp, layers = render_layers(sc, IMAGE_SIZE)
            _write_item(img, f"{i:05d}", comp, caption(sc))
            for j, layer in enumerate(layers, 1):
                layer.save(img / f"{i:05d}_{j}.png")
        entries.append(f'image_directory = "{img}"\ncache_directory = "{root / f"cache{k}"}"\nmultiple_target = true')
    return _toml(root, entries)


def _toml(root: Path, entries: list[str], batch_size: int | None = None) -> Path:
    path = root / "dataset.toml"
    body = f"[general]\nresolution = {IMAGE_SIZE}\ncaption_extension = \".txt\"\nbatch_size = BATCH\n"
    body += "".join(f"\n[[datasets]]\n{e}\n" for e in entries)
    path.write_text(body)
    return path


def set_batch_size(toml: Path, batch_size: int) -> None:
    toml.write_text(toml.read_text().replace("batch_size = BATCH", f"batch_size = {batch_size}"))


def save_vae(vae, folder: Path, mean: list, std: list) -> Path:
    """diffusers layout (config.json with the latent statistics + weights in bf16)."""
    vae.register_to_config(latents_mean=mean, latents_std=std)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.to(torch.bfloat16) for k, v in vae.state_dict().items()},
                     folder / "diffusion_pytorch_model.safetensors")
    with atomic_path(folder / "config.json") as tmp:  # as save_pretrained writes it (no _use_default_values, which
        tmp.write_text(vae.to_json_string())          # would make from_pretrained drop the statistics above)
    return folder


def cache(toml: Path, version: str, paths: dict) -> None:
    from ..qwen_image_cache_latents import main as cache_latents
    from ..qwen_image_cache_text_encoder_outputs import main as cache_text

    common = ["--dataset_config", str(toml), "--model_version", version, "--device", "cpu", "--skip_existing",
              "--batch_size", "16"]
    cache_latents(common + ["--vae", str(paths["vae"])])
    cache_text(common + ["--text_encoder", str(paths["text_encoder"]), "--tokenizer", str(paths["tokenizer"])])


def train_dit(init: Path, toml: Path, version: str, paths: dict, out: Path, steps: int, plan: Plan,
              name: str) -> Path:
    from ..qwen_image_train import main as full_main

    result = full_main([
        "--dit", str(init), "--vae", str(paths["vae"]), "--text_encoder", str(paths["text_encoder"]),
        "--tokenizer", str(paths["tokenizer"]), "--dataset_config", str(toml), "--model_version", version,
        "--output_dir", str(out), "--output_name", name, "--overwrite", "--device", "cpu",
        "--max_data_loader_n_workers", "0", "--seed", str(plan.seed), "--mixed_precision", "no",
        "--optimizer_type", "adamw", "--learning_rate", str(plan.learning_rate), "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "100", "--max_train_steps", str(steps), "--timestep_sampling", *plan.timestep_sampling,
        "--max_grad_norm", "1.0", "--save_precision", "bf16", "--optimizer_args", "weight_decay=0.01",
    ])
    return result["final"]


STAGES = ("text_encoder", "vae", "vae_layered", "original", "edit-2509", "edit-2511", "layered")


def build(output: Path, plan: Plan | None = None, versions=("original", "edit-2509", "edit-2511", "layered")) -> dict:
    """The text encoder, both VAEs and the DiTs of `versions`. Stages whose files are in `output` already, built with
    the same settings, are kept: a stage's files are written last and atomically, so an interrupted build resumes
    where it stopped, and a build of more versions reuses the VAEs."""
    plan = plan or Plan()
    output, work = Path(output), Path(output) / "work"
    output.mkdir(parents=True, exist_ok=True)
    info_path = output / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.update(plan=asdict(plan), torch=torch.__version__)
    times, scores = info.setdefault("seconds", {}), info.setdefault("scores", {})
    settings = info.setdefault("settings", {})

    def stage(name: str, done: Path, fn) -> None:
        if done.exists() and settings.get(name) == stage_settings(name, plan):
            logger.info("%s: built already (%s)", name, done)
            return
        t = time.time()
        result = fn()
        times[name] = round(time.time() - t)
        settings[name] = stage_settings(name, plan)
        scores.pop(name, None)
        if result is not None:
            scores[name] = result
        info[f"threads_{name}"] = torch.get_num_threads()
        logger.info("%s: %s (%d s)", name, scores.get(name, "done"), times[name])
        with atomic_path(info_path) as tmp:
            Path(tmp).write_text(json.dumps(info, indent=2))

    te_file = output / "text_encoder" / "nano_qwen_2.5_vl.safetensors"
    stage("text_encoder", te_file, lambda: write_text_encoder(output / "text_encoder", plan.seed) and None)
    wanted = {"vae": not versions or any(v != "layered" for v in versions),
              "vae_layered": not versions or "layered" in versions}
    for channels, name in ((3, "vae"), (4, "vae_layered")):
        if wanted[name]:  # only the VAEs the requested DiTs use (both when no DiT is requested)
            stage(name, output / name / "config.json", lambda c=channels, n=name: _build_vae(output / n, c, plan))
    common = {"text_encoder": te_file, "tokenizer": output / "text_encoder"}
    heldout = heldout_captions(plan.seed)
    for version in versions:
        shipped = output / f"nano_qwen_image_{version}.safetensors"
        paths = {**common, "vae": output / ("vae_layered" if version == "layered" else "vae")}
        stage(version, shipped, lambda v=version, p=paths, f=shipped: _build_dit(v, p, f, work, plan, heldout))
    return info


def stage_settings(name: str, plan: Plan) -> dict:
    """The plan settings a stage's files depend on (those of the stages it builds on included)."""
    p = asdict(plan)
    vae = {k: v for k, v in p.items() if k.startswith("vae_") or k == "seed"}
    if name == "text_encoder":
        return {"seed": plan.seed}
    if name in ("vae", "vae_layered"):
        return vae
    steps = p.pop("steps")
    chain = {"edit-2509": ("original", "edit-2509"), "edit-2511": ("original", "edit-2509", "edit-2511")}
    p["steps"] = {k: steps[k] for k in chain.get(name, (name,))}
    return json.loads(json.dumps(p))  # as build_info.json holds it (lists for tuples)


def _build_vae(folder: Path, channels: int, plan: Plan) -> dict:
    from ..qwen_image.vae import load_vae

    vae = nano_vae(channels, plan.seed)
    train_vae(vae, plan.vae_steps, plan.vae_batch, IMAGE_SIZE, plan.seed + channels, lr=plan.vae_learning_rate)
    mean, std = latent_statistics(vae, IMAGE_SIZE, plan.seed + 10 + channels)
    tmp = save_vae(vae, temp_folder(folder), mean, std)
    shutil.rmtree(folder, ignore_errors=True)  # a half-written one from an interrupted build
    tmp.rename(folder)
    shipped = load_vae(folder, torch.float32, "cpu", channels)  # the bf16 files, as users get them
    return evaluate_vae(shipped, IMAGE_SIZE, plan.seed + 20 + channels, n=128)


def _build_dit(version: str, paths: dict, shipped: Path, work: Path, plan: Plan, heldout: set[str]) -> dict:
    data = work / ("edit" if version.startswith("edit") else version)
    if version == "edit-2511":
        toml = data / "dataset.toml"  # edit-2511 trains on the 2509 data (the same caches)
        if not toml.is_file():
            raise UserError("edit-2511 continues from edit-2509: build edit-2509 first (--versions edit-2509 edit-2511)")
    elif version == "original":
        toml = write_t2i_dataset(data, plan.t2i_images, plan.seed + 1, heldout)
    elif version == "edit-2509":
        toml = write_edit_dataset(data, plan.edit_items, plan.seed + 2)
    else:
        toml = write_layered_dataset(data, plan.layered_items, plan.seed + 3)
    if "BATCH" in toml.read_text():
        set_batch_size(toml, plan.batch_size)
    cache(toml, version, paths)
    init = work / f"init_{version}.safetensors"
    parent = {"edit-2509": "original", "edit-2511": "edit-2509"}.get(version)
    if parent:
        source = shipped.with_name(f"nano_qwen_image_{parent}.safetensors")
        if not source.is_file():
            raise UserError(f"{version} continues from {parent}: build {parent} first (--versions {parent} {version})")
        shutil.copyfile(source, init)
    else:
        save_safetensors(nano_dit(VERSIONS[version], plan.seed).state_dict(), init)
    final = train_dit(init, toml, version, paths, work / f"train_{version}", plan.steps[version], plan,
                      f"nano_qwen_image_{version}")
    stamp_recommended(final, shipped)
    return score_version(version, {**paths, "dit": shipped}, plan.eval_samples, heldout).as_dict()


def score_version(version: str, paths: dict, n: int, heldout: set[str] | None = None, seed: int = 7000,
                  loras=()) -> ev.Score:
    gen = ev.NanoGenerator(paths, version, loras)
    if version == "original":
        scenes = [s for s in ev.heldout_scenes(seed, n * 4) if caption(dataclass_free(s)) in (heldout or set())][:n] \
            if heldout else ev.heldout_scenes(seed, n)
        return ev.score_t2i(gen, scenes or ev.heldout_scenes(seed, n))
    if version.startswith("edit"):
        single = ev.score_edits(gen, EDIT_KINDS, max(1, n // 5), seed)
        double = ev.score_edits(gen, ("two_image",), max(1, n // 5), seed + 1)
        return ev.Score(single.n + double.n, single.main, {**single.parts, **double.parts})
    three = ev.score_layered(gen, max(1, n // 2), 2, seed)
    four = ev.score_layered(gen, max(1, n // 2), 3, seed + 1)
    return ev.Score(three.n + four.n, (three.main + four.main) / 2, {"2 shapes": three.main, "3 shapes": four.main})
