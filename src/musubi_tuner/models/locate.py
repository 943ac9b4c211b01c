"""Where model files are: a path as given, a ComfyUI `models/` folder (the file of the wanted kind in its
diffusion_models/, vae/ or text_encoders/ folder), or a Hugging Face repo id such as `Qwen/Qwen-Image` (its
transformer/, vae/ and text_encoder/ folders, fetched into the hub cache with a progress bar the first time and read
from there afterwards). Every script resolves --dit / --vae / --text_encoder / --tokenizer this way before anything
else, and the web UI lists the same candidates."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from .version import ModelVersion

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMFY_FOLDERS = {"dit": ("diffusion_models", "unet"), "vae": ("vae",), "text_encoder": ("text_encoders", "clip")}
HUB_FOLDERS = {"dit": "transformer", "vae": "vae", "text_encoder": "text_encoder"}
HUB_SIDE_FILES = ["tokenizer/*", "processor/*", "scheduler/*", "model_index.json"]  # read beside the weights
OPTIONS = {"dit": "--dit", "vae": "--vae", "text_encoder": "--text_encoder"}


def is_repo_id(value: str) -> bool:
    """`org/name` that is not a local path (a path that exists always wins)."""
    return bool(REPO_ID.match(value)) and not Path(value).exists() and not value.endswith(".safetensors")


def is_comfy_models_folder(path: Path) -> bool:
    """ComfyUI's models/ folder (diffusion_models/, text_encoders/, ...), not a diffusers checkpoint folder (which
    has vae/ too, beside transformer/ and model_index.json)."""
    if not path.is_dir() or (path / "transformer").is_dir() or (path / "model_index.json").is_file():
        return False
    return any((path / sub).is_dir() for sub in ("diffusion_models", "unet", "text_encoders", "clip"))


def cached_snapshot(repo_id: str, patterns: list[str]) -> Path | None:
    """The snapshot folder of `repo_id` in the hub cache, without the network; None when it is not there."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or incomplete)
        return None


def hub_snapshot(repo_id: str, patterns: list[str], option: str) -> Path:
    """The local snapshot folder of `repo_id` holding `patterns`: from the hub cache when it is there (no network),
    else downloaded into it (huggingface_hub's progress bars)."""
    from huggingface_hub import snapshot_download

    cached = cached_snapshot(repo_id, patterns)
    if cached is not None:
        return cached
    print(f"{option} {repo_id}: downloading {', '.join(patterns[:1])} from the Hugging Face hub into its cache")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, disk
        raise UserError(f"{option} {repo_id}: no such file or folder here, and not a Hugging Face repo in the cache "
                        f"that can be downloaded ({type(e).__name__}); check the path, or the repo id and the "
                        "connection (gated repos need `hf auth login`)") from None


def hub_patterns(kind: str) -> list[str]:
    """What a model option takes from a repo: the kind's folder and the files read beside it."""
    return [f"{HUB_FOLDERS[kind]}/*", *HUB_SIDE_FILES]


def comfy_candidates(folder: Path, kind: str) -> list[Path]:
    return sorted(f for sub in COMFY_FOLDERS[kind] for f in (folder / sub).glob("*.safetensors"))


def fits(path: Path, kind: str, version: ModelVersion | None) -> bool:
    from ..qwen_image.model_files import expect

    try:
        expect(path, OPTIONS[kind], kind, version)
        return True
    except UserError:
        return False


def locate(value: str | None, kind: str, version: ModelVersion | None = None) -> str | None:
    """The local path behind the value of --dit / --vae / --text_encoder (`kind`)."""
    if not value:
        return value
    option, path = OPTIONS[kind], Path(value)
    if is_comfy_models_folder(path):
        found = [c for c in comfy_candidates(path, kind) if fits(c, kind, version)]
        folders = " or ".join(f"{path / sub}/" for sub in COMFY_FOLDERS[kind])
        what = f" for --model_version {version.name}" if version else ""
        if not found:
            raise UserError(f"{option} {path}: this ComfyUI models folder has no {kind.replace('_', ' ')} file{what} in "
                            f"{folders}; put it there or pass the file itself")
        if len(found) > 1:
            raise UserError(f"{option} {path}: several files fit{what} ({', '.join(f.name for f in found)}); pass the "
                            "one you mean")
        return str(found[0])
    if is_repo_id(value):
        snapshot = hub_snapshot(value, hub_patterns(kind), option)
        folder = snapshot / HUB_FOLDERS[kind]
        if not folder.is_dir():
            raise UserError(f"{option} {value}: the repo has no {HUB_FOLDERS[kind]}/ folder (not a diffusers "
                            "checkpoint); pass the file or folder of the model instead")
        return str(folder)
    return value


def resolve_args(args, version: ModelVersion | None = None) -> None:
    """Every model option of a parsed command line, in place."""
    for kind in OPTIONS:
        if getattr(args, kind, None):
            setattr(args, kind, locate(getattr(args, kind), kind, version))
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer and is_repo_id(tokenizer):
        args.tokenizer = str(hub_snapshot(tokenizer, ["tokenizer/*", "processor/*"], "--tokenizer") / "tokenizer")


def main(argv=None) -> None:
    """python -m musubi_tuner.models.locate ORG/NAME: fetch a diffusers checkpoint's transformer, VAE and text encoder
    (with tokenizer, processor and scheduler files) into the Hugging Face cache (what the web UI runs)."""
    import argparse

    from ..errors import cli_main

    @cli_main
    def run(argv=None):
        p = argparse.ArgumentParser(description=main.__doc__)
        p.add_argument("repo_id")
        args = p.parse_args(argv)
        if not is_repo_id(args.repo_id):
            raise UserError(f"{args.repo_id!r} is not a Hugging Face repo id (org/name)")
        folder = hub_snapshot(args.repo_id, [f"{sub}/*" for sub in HUB_FOLDERS.values()] + HUB_SIDE_FILES,
                              args.repo_id)
        print(f"{args.repo_id}: {folder}")
        return folder

    return run(argv)


if __name__ == "__main__":
    main()
