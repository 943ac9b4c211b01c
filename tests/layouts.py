"""Writers for the real weight-file layouts, so loaders are tested on the exact key formats users download."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

_RES = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
        "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
        "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def diffusers_vae_key_to_wan(k: str) -> str:
    """Inverse of diffusers' convert_wan_vae_to_diffusers (the ComfyUI / original Wan names)."""
    k = {"quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
         "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias"}.get(k, k)
    k = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", k)
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", k)
    k = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1.", k)
    m = re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$", k)
    if m:
        return f"{m[1]}.middle.{2 * int(m[2])}.{_RES[m[3]]}"
    m = re.match(r"^encoder\.down_blocks\.(\d+)\.(.+)$", k)
    if m:
        return f"encoder.downsamples.{m[1]}.{_RES.get(m[2], m[2])}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k)
    if m:
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_RES[m[3]]}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", k)
    if m:
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    return k


def write_sharded(sd: dict[str, torch.Tensor], folder: Path, stem: str, shards: int, config: dict | None = None) -> list[Path]:
    """diffusers-style `<stem>-0000N-of-0000M.safetensors` shards plus an index (and config.json if given)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    per = -(-len(keys) // shards)
    files, weight_map = [], {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
        files.append(folder / name)
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return files


def write_single(sd: dict[str, torch.Tensor], path: Path, prefix: str = "", extra: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {prefix + k: v.contiguous() for k, v in sd.items()}
    out.update(extra or {})
    save_file(out, str(path))
    return path
