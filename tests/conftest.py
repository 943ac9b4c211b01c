import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: one thread each, not cores x cores
    import torch

    torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The embedded tiny model set (ComfyUI single-file layouts + tokenizer folder)."""
    from musubi_tuner.qwen_image.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny"))


def console_input(monkeypatch, lines: list[str]) -> None:
    """input() returns these lines, then raises EOFError (Ctrl-D): what --interactive reads."""
    it = iter(lines)

    def read(_prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", read)


def make_cached_dataset(root, version_name: str, n: int = 4, size=(64, 64), batch_size: int = 2, colours=None,
                        layers: int = 2):
    """Tiny models for the version + a shapes dataset + both caches; returns (models, toml path)."""
    from musubi_tuner.dataset.synthetic import write_shapes_dataset
    from musubi_tuner.qwen_image.tiny import write_tiny_models
    from musubi_tuner.models.registry import VERSIONS
    from musubi_tuner.qwen_image_cache_latents import main as cache_latents
    from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_text

    root = Path(root)
    version = VERSIONS[version_name]
    models = write_tiny_models(root / "models", version)
    controls = {"edit": 1, "edit-2509": 2, "edit-2511": 2}.get(version_name, 0)
    img = write_shapes_dataset(root / "data", n=n, size=size, controls=controls,
                               layers=layers if version.layer_targets else 0, colours=colours)
    lines = ["[general]", f"resolution = [{size[0]}, {size[1]}]", f"batch_size = {batch_size}", "[[datasets]]",
             f'image_directory = "{img}"', f'cache_directory = "{root / "cache"}"']
    if controls:
        lines += [f'control_directory = "{root / "data_control"}"', "no_resize_control = true"]
    if version.layer_targets:
        lines.append("multiple_target = true")
    toml = root / "dataset.toml"
    toml.write_text("\n".join(lines) + "\n")
    common = ["--dataset_config", str(toml), "--model_version", version_name, "--device", "cpu"]
    cache_latents(common + ["--vae", str(models["vae"])])
    cache_text(common + ["--text_encoder", str(models["text_encoder"])])
    return models, toml


def train_args(models, toml, out, version_name="original", *extra):
    return ["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder", str(models["text_encoder"]),
            "--dataset_config", str(toml), "--model_version", version_name, "--output_dir", str(out),
            "--output_name", "lora", "--device", "cpu", "--max_data_loader_n_workers", "0", "--seed", "42",
            "--log_with", "tensorboard", *extra]


def add_validation_dataset(root: Path, toml: Path, models: dict, version_name: str, n: int = 2, seed: int = 99):
    """A second [[datasets]] entry with `validation = true` (other images, own cache folder), cached."""
    from musubi_tuner.dataset.synthetic import write_shapes_dataset
    from musubi_tuner.models.registry import VERSIONS
    from musubi_tuner.qwen_image_cache_latents import main as cache_latents
    from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_text

    version = VERSIONS[version_name]
    controls = {"edit": 1, "edit-2509": 2, "edit-2511": 2}.get(version_name, 0)
    img = write_shapes_dataset(root / "val", n=n, size=(64, 64), seed=seed, controls=controls,
                               layers=2 if version.layer_targets else 0)
    entry = ["", "[[datasets]]", f'image_directory = "{img}"', f'cache_directory = "{root / "val_cache"}"',
             "validation = true"]
    if controls:
        entry += [f'control_directory = "{root / "val_control"}"', "no_resize_control = true"]
    if version.layer_targets:
        entry.append("multiple_target = true")
    toml.write_text(toml.read_text() + "\n".join(entry) + "\n")
    common = ["--dataset_config", str(toml), "--model_version", version_name, "--device", "cpu", "--skip_existing"]
    cache_latents(common + ["--vae", str(models["vae"])])
    cache_text(common + ["--text_encoder", str(models["text_encoder"])])
    return img
