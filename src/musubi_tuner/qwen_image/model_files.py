"""What a weight file is, read from its header alone (no tensor data): a Qwen-Image DiT, a VAE (RGB or RGBA), a
Qwen2.5-VL text encoder, a LoRA, or the trainable weights of a training state folder.

Every script checks its files with `expect` before any model loads, so a file passed to the wrong option is one
clear line at once, not a misleading error after minutes of work (a DiT as --vae used to read as a stale cache, a DiT
as --text_encoder waited for the hub and blamed the tokenizer). The loaders call the same function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..models.registry import family_of
from ..models.version import ModelVersion
from .weights import read_header, refuse_fp8, resolve_files

COMFY_DIT_PREFIX = "model.diffusion_model."
ZERO_COND_MARKER = "__index_timestep_zero__"  # ComfyUI Edit-2511 files carry this key (bare or prefixed)
ADDITIONAL_T_KEY = "time_text_embed.addition_t_embedding.weight"
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight",
                 ".lora_B.default.weight", ".hada_w1_a", ".lokr_w1", ".lokr_w1_a")
STATE_PREFIXES = ("unet_loras.",)  # keys of our LoRA network's state dict (a state folder's trainable.safetensors)

DIT_FILE_HINT = {
    "original": "split_files/diffusion_models/qwen_image_bf16.safetensors (Comfy-Org/Qwen-Image_ComfyUI)",
    "edit": "split_files/diffusion_models/qwen_image_edit_bf16.safetensors (Comfy-Org/Qwen-Image-Edit_ComfyUI)",
    "edit-2509": "split_files/diffusion_models/qwen_image_edit_2509_bf16.safetensors (Comfy-Org/Qwen-Image-Edit_ComfyUI)",
    "edit-2511": "split_files/diffusion_models/qwen_image_edit_2511_bf16.safetensors (Comfy-Org/Qwen-Image-Edit_ComfyUI)",
    "layered": "split_files/diffusion_models/qwen_image_layered_bf16.safetensors (Comfy-Org/Qwen-Image-Layered_ComfyUI)",
    "2.1": "the transformer/ folder of Qwen/Qwen-Image-2.1 (diffusers) or its ComfyUI single file",
}
V21_VAE_HINT = "the vae/ folder of Qwen/Qwen-Image-2.1 (AutoencoderKLQwenImage21)"
V21_TE_HINT = "the text_encoder/ folder of Qwen/Qwen-Image-2.1 (Qwen3-VL)"
VAE_FILE_HINT = {
    3: "split_files/vae/qwen_image_vae.safetensors (Comfy-Org/Qwen-Image_ComfyUI)",
    4: "split_files/vae/qwen_image_layered_vae.safetensors (Comfy-Org/Qwen-Image-Layered_ComfyUI)",
}
TE_FILE_HINT = "split_files/text_encoders/qwen_2.5_vl_7b.safetensors (Comfy-Org/Qwen-Image_ComfyUI)"
SUBFOLDER = {"dit": "transformer", "vae": "vae", "text_encoder": "text_encoder"}


def strip_dit_prefix(key: str) -> str | None:
    """ComfyUI DiT names -> diffusers names; the Edit-2511 marker key (bare or prefixed) is dropped."""
    key = key[len(COMFY_DIT_PREFIX):] if key.startswith(COMFY_DIT_PREFIX) else key
    return None if key == ZERO_COND_MARKER else key


def dit_blocks(shapes) -> set[int]:
    """The transformer block indices of DiT keys (prefix already stripped)."""
    return {int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks.")}


def is_wan_vae_layout(keys) -> bool:
    """ComfyUI / original Wan files name the quant convs conv1 / conv2 and use encoder.downsamples.*."""
    return "conv1.bias" in keys or any(k.startswith("encoder.downsamples.") for k in keys)


QI, V21 = "qwen_image", "qwen_image_21"  # the families whose files this module recognises


@dataclass
class ModelFile:
    kind: str  # dit | vae | text_encoder | lora | train_state | unknown
    files: list[Path]
    shapes: dict[str, tuple[int, ...]]  # raw key names
    dtypes: dict[str, torch.dtype]
    metadata: dict[str, str] = field(default_factory=dict)
    vae_channels: int | None = None
    layered: bool = False  # a DiT with the Layered timestep embedding
    zero_cond_marker: bool = False  # the ComfyUI Edit-2511 marker
    family: str = "qwen_image"  # the model family the file belongs to (models/registry.py)

    @property
    def v21(self) -> bool:
        return self.family == V21

    @property
    def dit_shapes(self) -> dict[str, tuple[int, ...]]:
        return {sk: v for k, v in self.shapes.items() if (sk := strip_dit_prefix(k)) is not None}

    def describe(self) -> str:
        if self.kind == "dit":
            return "a Qwen-Image-2.1 DiT" if self.v21 else "a Qwen-Image-Layered DiT" if self.layered \
                else "a Qwen-Image DiT"
        if self.kind == "vae" and self.v21:
            return "a Qwen-Image-2.1 VAE"
        if self.kind == "text_encoder" and self.v21:
            return "a Qwen3-VL text encoder (Qwen-Image-2.1)"
        if self.kind == "vae":
            return f"a {'4-channel (RGBA, Qwen-Image-Layered)' if self.vae_channels == 4 else '3-channel (RGB)'} VAE"
        return {"text_encoder": "a Qwen2.5-VL text encoder", "lora": "a LoRA",
                "train_state": "the trainable weights inside a training state folder (…-state/trainable.safetensors)",
                }.get(self.kind, "not a Qwen-Image model file")


def classify(shapes: dict[str, tuple[int, ...]]) -> tuple[str, dict]:
    keys = shapes.keys()
    if any(k.startswith(STATE_PREFIXES) for k in keys):
        return "train_state", {}
    if any(k.endswith(LORA_SUFFIXES) for k in keys):
        return "lora", {}
    stripped = {k[len(COMFY_DIT_PREFIX):] if k.startswith(COMFY_DIT_PREFIX) else k for k in keys}
    if "img_in.weight" in stripped and any(k.startswith("transformer_blocks.0.") for k in stripped):
        return "dit", {"layered": ADDITIONAL_T_KEY in stripped, "family": V21 if "modulation.1.weight" in stripped else QI,
                       "zero_cond_marker": ZERO_COND_MARKER in stripped}
    if is_wan_vae_layout(keys) or "encoder.conv_in.weight" in keys:
        conv = shapes.get("encoder.conv_in.weight") or shapes.get("encoder.conv1.weight")
        return "vae", {"vae_channels": conv[1] if conv and len(conv) > 1 else None,
                       "family": V21 if conv is not None and len(conv) == 4 else QI}  # 2.1's convolutions are 2D
    if "model.embed_tokens.weight" in keys or "model.language_model.embed_tokens.weight" in keys:
        return "text_encoder", {"family": V21 if any(k.endswith("layers.0.self_attn.q_norm.weight") for k in keys)
                                else QI}
    return "unknown", {}


def inspect_file(path: str | os.PathLike, option: str, subfolder: str | None = None) -> ModelFile:
    files = resolve_files(path, option, subfolder=subfolder)
    shapes, dtypes, metadata = read_header(files)
    kind, extra = classify(shapes)
    return ModelFile(kind, files, shapes, dtypes, metadata, **extra)


_WANTED = {"dit": "the Qwen-Image DiT (diffusion model)", "vae": "the Qwen-Image VAE",
           "text_encoder": "the text encoder (Qwen2.5-VL; 2.1: Qwen3-VL)", "lora": "a LoRA file"}


def _hint(kind: str, version: ModelVersion | None) -> str:
    if kind == "dit":
        return DIT_FILE_HINT.get(version.name if version else "original", f"the {version and version.modelspec_arch} DiT")
    if kind == "vae":
        return V21_VAE_HINT if version and version.family == V21 else VAE_FILE_HINT[version.vae_channels if version else 3]
    if kind == "text_encoder":
        return V21_TE_HINT if version and version.family == V21 else TE_FILE_HINT
    return "a LoRA file written by a trainer (kohya lora_unet_* or diffusers lora_A/lora_B keys)"


def expect(path: str | os.PathLike, option: str, kind: str, version: ModelVersion | None = None,
           num_layers: int | None = None) -> ModelFile:
    """The file behind `option` must be of `kind` (and fit `version`, and for a DiT have `num_layers` blocks when
    given); otherwise one UserError that says what the file is and which file to pass instead."""
    info = inspect_file(path, option, SUBFOLDER.get(kind))
    first = info.files[0]
    if num_layers is not None and info.kind == kind == "dit":
        blocks = dit_blocks(info.dit_shapes)
        if len(blocks) != num_layers:
            raise UserError(f"--num_layers {num_layers}: {first} has {len(blocks)} blocks; leave --num_layers out "
                            "(the block count is read from the file)")
    if info.kind != kind:
        what = info.describe()
        if info.kind == "train_state" and kind == "lora":
            raise UserError(f"{option}: {first} is {what}, not a LoRA; use the LoRA file saved beside the state "
                            "folder (<output_name>….safetensors), or continue training with --resume <state folder>")
        raise UserError(f"{option}: {first} is {what}, not {_WANTED[kind]}. Pass {_hint(kind, version)}")
    if kind in ("dit", "vae", "text_encoder") and version is not None and not family_of(version).accepts_file(info):
        if not info.v21:
            raise UserError(f"{option}: {first} is {info.describe()}, not one of {version.modelspec_arch}. Pass "
                            f"{_hint(kind, version)}")
        raise UserError(f"{option}: {first} is {info.describe()}; pass --model_version 2.1, or {_hint(kind, version)}")
    if kind == "dit" and version is not None:
        refuse_fp8(info.files, info.dtypes, option, _hint("dit", version))
        if info.layered != version.additional_t_cond:
            if version.additional_t_cond:
                raise UserError(f"{option}: {first} has no {ADDITIONAL_T_KEY}; it is not a Qwen-Image-Layered DiT. "
                                "Pass the layered DiT or another --model_version")
            raise UserError(f"{option}: {first} is a Qwen-Image-Layered DiT; pass --model_version layered")
    if kind == "vae" and version is not None and info.family == QI and info.vae_channels != version.vae_channels:
        raise UserError(f"{option}: {first} is {info.describe()} but --model_version {version.name} needs "
                        f"{version.vae_channels} channels; pass {VAE_FILE_HINT[version.vae_channels]}")
    if kind == "text_encoder":
        refuse_fp8(info.files, info.dtypes, option, _hint(kind, version) + " (use --fp8_vl to run it in fp8)")
    return info
