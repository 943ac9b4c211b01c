"""A UI project: a folder with the settings (settings.json), the dataset config, caches, training outputs,
generations and run logs. Everything the page does becomes a command line of the real scripts, built here."""

from __future__ import annotations

import copy
import json
import shlex
from collections import Counter
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_path
from ..models.registry import VERSIONS
from .runs import python_module

NANO_VERSIONS = ("original", "edit-2509", "edit-2511", "layered")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}

DEFAULTS = {
    "model_version": "original",
    "models": {"dit": "", "vae": "", "text_encoder": "", "tokenizer": ""},  # empty: the shipped nano models
    "dataset": {"config": "", "image_directory": "", "control_directory": "", "resolution": 64, "batch_size": 8,
                "num_repeats": 1, "caption_extension": ".txt", "enable_bucket": True},
    # the nano recipe of docs/first_lora.md (a tiny model learns at a high rate); the 20B models train at ~1e-4
    "training": {"output_name": "my-lora", "network_dim": 16, "learning_rate": 2e-3, "max_train_steps": 300,
                 "save_every_n_steps": 100, "sample_every_n_steps": 100, "validation_split": 0.1,
                 "sample_prompts": "a small purple circle at the center on a white background --d 1",
                 "memory_options": "", "extra_options": ""},
    "gpu_gib": 24,
}


def merge(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        if k in out and isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = merge(out[k], v)
        elif k in out:
            out[k] = v
    return out


class Project:
    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings_path = self.folder / "settings.json"
        self.settings = copy.deepcopy(DEFAULTS)
        if self.settings_path.is_file():
            try:
                self.settings = merge(DEFAULTS, json.loads(self.settings_path.read_text(encoding="utf-8")))
            except (ValueError, OSError) as e:
                raise UserError(f"{self.settings_path}: not readable settings ({e}); delete it to start over") from None

    # settings ------------------------------------------------------------------------------------------------------
    def update(self, new: dict) -> dict:
        settings = merge(self.settings, new)
        if settings["model_version"] not in VERSIONS:
            raise UserError(f"model version {settings['model_version']!r}: choose one of {', '.join(VERSIONS)}")
        self.settings = settings
        with atomic_path(self.settings_path) as tmp:
            tmp.write_text(json.dumps(settings, indent=2), encoding="utf-8")
        return settings

    @property
    def version(self):
        return VERSIONS[self.settings["model_version"]]

    def uses_nano(self) -> bool:
        return not any(self.settings["models"][k] for k in ("dit", "vae", "text_encoder"))

    def model_paths(self) -> dict[str, str]:
        """The model options: the settings, or the shipped nano models of the version when none is set."""
        m = self.settings["models"]
        if not self.uses_nano():
            missing = [k for k in ("dit", "vae", "text_encoder") if not m[k]]
            if missing:
                raise UserError(f"models: set {', '.join(missing)} too (or clear all three to use the nano models)")
            return {k: m[k] for k in ("dit", "vae", "text_encoder", "tokenizer") if m[k]}
        name = self.settings["model_version"]
        if name not in NANO_VERSIONS:
            raise UserError(f"there is no nano model of {name}; set the model files or choose one of "
                            f"{', '.join(NANO_VERSIONS)}")
        from ..nano.models import shipped

        return {k: str(v) for k, v in shipped(name).items()}

    def model_args(self, vae: bool = True, text_encoder: bool = True) -> list[str]:
        paths = self.model_paths()
        args = ["--dit", paths["dit"], "--model_version", self.settings["model_version"]]
        if vae:
            args += ["--vae", paths["vae"]]
        if text_encoder:
            args += ["--text_encoder", paths["text_encoder"]] + (["--tokenizer", paths["tokenizer"]]
                                                                  if paths.get("tokenizer") else [])
        return args

    # dataset -------------------------------------------------------------------------------------------------------
    def dataset_config(self) -> Path:
        """The dataset TOML in use: one given (e.g. the nano example's), else written from the dataset fields."""
        d = self.settings["dataset"]
        if d["config"]:
            path = Path(d["config"])
            if not path.is_file():
                raise UserError(f"dataset config {path}: file not found")
            return path
        if not d["image_directory"]:
            raise UserError("dataset: choose an image folder (or create the nano example dataset)")
        return self.write_dataset_config()

    def write_dataset_config(self) -> Path:
        d = self.settings["dataset"]
        images = Path(d["image_directory"]).expanduser().resolve()
        if not images.is_dir():
            raise UserError(f"dataset: image folder {images} not found")
        lines = ["[general]", f"resolution = {int(d['resolution'])}", f'caption_extension = "{d["caption_extension"]}"',
                 f"batch_size = {int(d['batch_size'])}", f"enable_bucket = {'true' if d['enable_bucket'] else 'false'}",
                 "", "[[datasets]]", f"image_directory = {json.dumps(str(images))}",
                 f"cache_directory = {json.dumps(str(self.folder / 'cache'))}", f"num_repeats = {int(d['num_repeats'])}"]
        if d["control_directory"]:
            lines.append(f"control_directory = {json.dumps(str(Path(d['control_directory']).expanduser().resolve()))}")
        if self.version.layer_targets:
            lines.append("multiple_target = true")
        path = self.folder / "dataset.toml"
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def nano_dataset(self, items: int = 48) -> Path:
        """The nano example dataset of the version (the demo's story), written into the project."""
        from ..nano.build import set_batch_size
        from ..nano.stories import STORIES

        name = self.settings["model_version"]
        if name not in STORIES:
            raise UserError(f"there is no nano example dataset for {name}; choose one of {', '.join(STORIES)}")
        toml = STORIES[name].write_dataset(self.folder / "nano_dataset", items, 0)
        set_batch_size(toml, int(self.settings["dataset"]["batch_size"]))
        self.update({"dataset": {"config": str(toml)}})
        return toml

    def items(self) -> tuple[Path, list]:
        """(the dataset TOML, its items) as the scripts will read them."""
        from ..dataset.config import load_dataset_config
        from ..dataset.items import collect_items

        toml = self.dataset_config()
        return toml, collect_items(load_dataset_config(str(toml)), self.version)

    def dataset_view(self) -> dict:
        """Items (image, caption, controls, layers), images per bucket and the TOML."""
        from ..dataset.prepare import target_bucket

        toml, items = self.items()
        version = self.version
        buckets = Counter(f"{w}x{h}" for w, h in (target_bucket(it, version.bucket_step) for it in items))
        view = []
        for it in items:
            caption_file = self.caption_file(it)
            view.append({"key": it.key, "image": str(it.targets[0]), "caption": it.caption,
                         "caption_file": str(caption_file) if caption_file else None,
                         "controls": [str(c) for c in it.controls], "layers": [str(p) for p in it.targets[1:]],
                         "dataset": it.config.index})
        return {"toml_path": str(toml), "toml": toml.read_text(encoding="utf-8"), "items": view,
                "buckets": dict(sorted(buckets.items(), key=lambda kv: -kv[1]))}

    @staticmethod
    def caption_file(item) -> Path | None:
        """Where an item's caption is kept: beside the image (image folders); None for JSONL datasets."""
        return item.targets[0].with_suffix(item.config.caption_extension) if item.config.image_directory else None

    def save_caption(self, image: str, caption: str) -> Path:
        item = next((it for it in self.items()[1] if str(it.targets[0]) == str(Path(image))), None)
        if item is None:
            raise UserError(f"{image} is not an image of the dataset")
        path = self.caption_file(item)
        if path is None:
            raise UserError(f"{image}: its caption is in the JSONL file; edit it there")
        with atomic_path(path) as tmp:
            tmp.write_text(caption.strip() + "\n", encoding="utf-8")
        return path

    def image_folders(self) -> list[Path]:
        """Folders whose images the page may show: the project and the dataset's folders (read from the settings or
        the TOML in use; nothing is written to serve an image)."""
        d = self.settings["dataset"]
        roots = [self.folder] + [Path(p).expanduser() for p in (d["image_directory"], d["control_directory"]) if p]
        if d["config"]:
            try:
                from ..dataset.config import load_dataset_config

                for cfg in load_dataset_config(d["config"]):
                    roots += [Path(p) for p in (cfg.image_directory, cfg.control_directory) if p]
            except UserError:
                pass
        return roots

    # commands ------------------------------------------------------------------------------------------------------
    def output_dir(self) -> Path:
        return self.folder / "output" / self.settings["training"]["output_name"]

    def caching_commands(self) -> list[tuple[str, str, list[str]]]:
        toml = str(self.dataset_config())
        common = ["--dataset_config", toml, "--model_version", self.settings["model_version"], "--skip_existing"]
        paths = self.model_paths()
        text = ["--text_encoder", paths["text_encoder"]] + (["--tokenizer", paths["tokenizer"]]
                                                           if paths.get("tokenizer") else [])
        return [("cache_latents", "cache latents", python_module("musubi_tuner.qwen_image_cache_latents", *common,
                                                                 "--vae", paths["vae"])),
                ("cache_text", "cache text-encoder outputs",
                 python_module("musubi_tuner.qwen_image_cache_text_encoder_outputs", *common, *text))]

    def training_command(self, resume: str | None = None) -> list[str]:
        t = self.settings["training"]
        out = self.output_dir()
        out.mkdir(parents=True, exist_ok=True)
        args = [*self.model_args(), "--dataset_config", str(self.dataset_config()),
                "--network_module", "networks.lora_qwen_image", "--network_dim", str(int(t["network_dim"])),
                "--network_alpha", str(int(t["network_dim"])), "--learning_rate", str(float(t["learning_rate"])),
                "--lr_scheduler", "constant", "--max_train_steps", str(int(t["max_train_steps"])),
                "--save_every_n_steps", str(int(t["save_every_n_steps"])), "--save_state",
                "--output_dir", str(out), "--output_name", t["output_name"], "--seed", "42"]
        if "--optimizer_type" not in t["memory_options"]:
            args += ["--optimizer_type", "adamw"]
        if self.uses_nano():
            args += ["--timestep_sampling", "shift", "--discrete_flow_shift", "2.2"]
        if t["sample_prompts"].strip():
            prompts = self.folder / "sample_prompts.txt"
            with atomic_path(prompts) as tmp:
                tmp.write_text(t["sample_prompts"].strip() + "\n", encoding="utf-8")
            args += ["--sample_prompts", str(prompts), "--sample_every_n_steps", str(int(t["sample_every_n_steps"]))]
        if float(t["validation_split"] or 0) > 0:
            every = max(1, int(t["sample_every_n_steps"]) // 2)
            args += ["--validation_split", str(float(t["validation_split"])), "--validate_every_n_steps", str(every)]
        args += shlex.split(t["memory_options"]) + shlex.split(t["extra_options"])
        if resume:
            args += ["--resume", resume]
        return python_module("musubi_tuner.qwen_image_train_network", *args)

    def latest_state(self) -> Path | None:
        """The newest state folder of the run (periodic or interrupted), to resume from."""
        name = self.settings["training"]["output_name"]
        states = [p for p in self.output_dir().glob(f"{name}*-state") if p.is_dir()]
        return max(states, key=lambda p: p.stat().st_mtime) if states else None

    def caption_commands(self, overwrite: bool = False) -> list[tuple[str, list[str]]]:
        """(title, argv) of the captioning tool for each image folder of the dataset."""
        paths = self.model_paths()
        out = []
        for cfg in self.dataset_configs():
            if cfg.image_directory:
                out.append((f"caption {Path(cfg.image_directory).name}", python_module(
                    "musubi_tuner.caption_images_by_qwen_vl", "--image_dir", cfg.image_directory, "--model_path",
                    paths["text_encoder"], "--output_format", "text", "--caption_extension", cfg.caption_extension,
                    *(["--tokenizer", paths["tokenizer"]] if paths.get("tokenizer") else []),
                    *(["--overwrite"] if overwrite else []))))
        return out

    def dataset_configs(self) -> list:
        """The [[datasets]] entries of the TOML in use."""
        from ..dataset.config import load_dataset_config

        return load_dataset_config(str(self.dataset_config()))

    def tool_command(self, name: str, lora: str, output: str = "", files: list[str] = ()) -> list[str]:
        """convert (to diffusers), ema (post-hoc EMA of the run's step checkpoints) or merge (into the DiT)."""
        if not Path(lora).is_file():
            raise UserError(f"LoRA {lora}: file not found")
        stem = Path(lora).with_suffix("")
        if name == "convert":
            return python_module("musubi_tuner.convert_lora", "--input", lora, "--output",
                                 output or f"{stem}_diffusers.safetensors", "--target", "diffusers")
        if name == "ema":
            checkpoints = list(files) or sorted(str(p) for p in Path(lora).parent.glob(f"{stem.name}-step*.safetensors"))
            if not checkpoints:
                raise UserError(f"post-hoc EMA needs the run's checkpoints ({stem.name}-step*.safetensors); save "
                                "every N steps while training")
            return python_module("musubi_tuner.lora_post_hoc_ema", *checkpoints, lora, "--output_file",
                                 output or f"{stem}_ema.safetensors")
        if name == "merge":
            return python_module("musubi_tuner.merge_lora", "--dit", self.model_paths()["dit"], "--lora_weight", lora,
                                 "--save_merged_model", output or str(self.folder / "merged_dit.safetensors"),
                                 "--model_version", self.settings["model_version"])
        raise UserError(f"unknown tool {name!r}: convert, ema or merge")

    def lora_path(self) -> Path:
        return self.output_dir() / f"{self.settings['training']['output_name']}.safetensors"

    def generation_command(self, prompt: str, seed: int, save_path: Path, lora: str | None,
                           multiplier: float = 1.0, controls: list[str] = ()) -> list[str]:
        """Edit versions take the control images (--control_image_path), layered the image to decompose."""
        args = [*self.model_args(), "--prompt", prompt, "--seed", str(int(seed)), "--save_path", str(save_path)]
        if controls:
            args += ["--control_image_path", *controls]
        if lora:
            args += ["--lora_weight", lora, "--lora_multiplier", str(float(multiplier))]
        return python_module("musubi_tuner.qwen_image_generate_image", *args)
