"""The families this tool knows. Adding a family is its own package (with `versions.py` listing its ModelVersions and
`family.py` defining FAMILY) plus one line here."""

from __future__ import annotations

import importlib
from functools import cache

from ..errors import UserError
from .version import ModelVersion

FAMILIES: dict[str, str] = {
    "qwen_image": "musubi_tuner.qwen_image",  # Qwen-Image, Edit, Edit-2509, Edit-2511, Layered
    "qwen_image_21": "musubi_tuner.qwen_image_21",  # Qwen-Image-2.1
}


def _versions() -> dict[str, ModelVersion]:
    table: dict[str, ModelVersion] = {}
    for family, package in FAMILIES.items():
        for v in importlib.import_module(package + ".versions").VERSIONS:
            assert v.family == family, f"{package}: version {v.name} names family {v.family}"
            table[v.name] = v
    return table


VERSIONS: dict[str, ModelVersion] = _versions()


@cache
def family_of(version: ModelVersion):
    """The family object (models/family.py's ModelFamily) that implements `version`; imported on first use."""
    return importlib.import_module(FAMILIES[version.family] + ".family").FAMILY


def resolve_version(model_version: str | None = None, edit: bool = False, edit_plus: bool = False) -> ModelVersion:
    """--model_version wins; --edit / --edit_plus are the backward-compatible spellings."""
    if edit and edit_plus:
        raise UserError("--edit and --edit_plus are mutually exclusive; use --model_version edit|edit-2509|edit-2511")
    legacy = "edit" if edit else "edit-2509" if edit_plus else None
    name = model_version or legacy or "original"
    if legacy and model_version and model_version not in ("original", legacy):
        raise UserError(f"--model_version {model_version} contradicts --{'edit' if edit else 'edit_plus'}; pass only one")
    if legacy and model_version == "original":
        name = legacy
    if name not in VERSIONS:
        raise UserError(f"unknown --model_version {name!r}; choose one of {', '.join(VERSIONS)}")
    return VERSIONS[name]


def lora_family(metadata: dict, keys):
    """The family a LoRA file was trained on, from its metadata (ss_model_version) or what a family recognises in it;
    the first registered family when nothing says (kohya and diffusers LoRAs of other tools carry no version)."""
    version = VERSIONS.get(metadata.get("ss_model_version", ""))
    if version is not None:
        return family_of(version)
    families = [importlib.import_module(package + ".family").FAMILY for package in FAMILIES.values()]
    return next((f for f in families if f.recognizes_lora(metadata, keys)), families[0])
