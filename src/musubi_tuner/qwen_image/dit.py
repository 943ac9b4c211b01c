"""Loading the Qwen-Image DiT (diffusers `QwenImageTransformer2DModel`) from every published weight layout.

Layouts: diffusers (single file, `-0000N-of-0000M` shards given by the first shard or the folder, with or without
config.json) and ComfyUI single files (bare keys or the `model.diffusion_model.` prefix). The config is inferred from
tensor shapes, so pruned and tiny checkpoints load; the model version switches the flags the weights cannot show.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from diffusers import QwenImageTransformer2DModel

from ..errors import UserError
from .model_files import ADDITIONAL_T_KEY, dit_blocks, expect, strip_dit_prefix
from ..models.version import ModelVersion
from .weights import load_tensors

logger = logging.getLogger(__name__)

def count(n: int) -> str:
    """20.43 B, 4.17 M, 950 K: a parameter count for a log line."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def default_axes_dims_rope(head_dim: int) -> tuple[int, int, int]:
    """(16, 56, 56) for the real head_dim 128; the same 1/8 : 7/16 : 7/16 split for smaller heads."""
    t = head_dim // 8
    hw = (head_dim - t) // 2
    if t % 2 or hw % 2 or t + 2 * hw != head_dim:
        raise UserError(f"cannot infer rope axes for attention head_dim {head_dim}; put a config.json beside the DiT file")
    return (t, hw, hw)


def infer_dit_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Everything QwenImageTransformer2DModel needs that the tensor shapes determine."""
    blocks = dit_blocks(shapes)
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    patch_out = shapes["proj_out.weight"][0]
    patch_size = 2
    return dict(
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=patch_out // (patch_size * patch_size),
        num_layers=max(blocks) + 1,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=shapes["txt_in.weight"][1],
        axes_dims_rope=default_axes_dims_rope(head_dim),
        use_additional_t_cond=ADDITIONAL_T_KEY in shapes,
    )


def _find_config_json(files: list[Path]) -> dict | None:
    cfg = files[0].parent / "config.json"
    if cfg.exists():
        try:
            data = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg}: invalid JSON ({e})") from None
        if data.get("_class_name", "QwenImageTransformer2DModel") == "QwenImageTransformer2DModel":
            return data
    return None


@dataclass
class LoraMerge:
    """A LoRA (or LoHa / LoKr) file merged into the DiT while it loads."""

    path: str
    multiplier: float = 1.0
    option: str = "--lora_weight"
    include: list[str] | None = None
    exclude: list[str] | None = None


def lora_merges(model: torch.nn.Module, loras: list[LoraMerge]) -> dict[str, list]:
    """weight key -> [(weights, multiplier)] of every LoRA, checked against the (meta) model's Linear shapes."""
    from ..networks.lora_files import linear_module_names, load_lora

    if not loras:
        return {}
    modules = dict(model.named_modules())
    names = linear_module_names(model)
    out: dict[str, list] = {}
    for spec in loras:
        for name, w in load_lora(spec.path, names, spec.option, spec.include, spec.exclude).items():
            mod = modules.get(name)
            if not isinstance(mod, torch.nn.Linear):
                raise UserError(f"{spec.option} {spec.path}: module {name} is not a Linear layer of this DiT (wrong "
                                "model or version?)")
            if tuple(mod.weight.shape) != tuple(w.shape):
                raise UserError(f"{spec.option} {spec.path}: module {name} is {tuple(w.shape)} but the DiT weight is "
                                f"{tuple(mod.weight.shape)} (a LoRA for another model?)")
            out.setdefault(name + ".weight", []).append((w, spec.multiplier))
        logger.info("merging %s x %.3g while loading", spec.path, spec.multiplier)
    return out


def load_dit(
    path: str | os.PathLike,
    version: ModelVersion,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    disable_mmap: bool = False,
    option: str = "--dit",
    fp8_mode: str | None = None,
    compute_device: str | torch.device | None = None,
    check_config: Callable[[dict], None] | None = None,
    loras: list[LoraMerge] | None = None,
) -> QwenImageTransformer2DModel:
    """fp8_mode ("tensor" = --fp8_base, "channel" / "block" = --fp8_scaled) quantises the Linear weights of the
    transformer blocks while they stream in (on compute_device), so the high-precision model never exists whole.
    loras are merged into their weights as those stream in, before any quantisation (merging into fp8 weights
    afterwards would lose the LoRA in the scale). check_config(config) runs once the config is known from the
    header, before any weight is read."""
    info = expect(path, option, "dit", version)
    files, shapes = info.files, info.dit_shapes
    config = infer_dit_config(shapes)
    file_cfg = _find_config_json(files)
    if file_cfg:
        for k in ("axes_dims_rope", "guidance_embeds"):
            if k in file_cfg:
                config[k] = tuple(file_cfg[k]) if k == "axes_dims_rope" else file_cfg[k]
    if info.zero_cond_marker and not version.zero_cond_t:
        logger.warning("%s carries the Edit-2511 marker key but --model_version is %s; did you mean edit-2511?",
                       files[0], version.name)
    config["zero_cond_t"] = version.zero_cond_t
    config["use_layer3d_rope"] = version.layer3d_rope
    if check_config is not None:
        check_config(config)

    with init_empty_weights():
        model = QwenImageTransformer2DModel(**config)
    stream_weights(model, files, "Qwen-Image DiT", dtype, device, strip_dit_prefix, disable_mmap, fp8_mode,
                   compute_device, loras, option)
    logger.info("loaded DiT %s: %d blocks, %d heads x %d, %s parameters, %s",
                files[0].name, config["num_layers"], config["num_attention_heads"], config["attention_head_dim"],
                count(sum(p.numel() for p in model.parameters())), dtype)
    return model


def stream_weights(model: torch.nn.Module, files: list[Path], what: str, dtype: torch.dtype, device, key_map,
                   disable_mmap: bool = False, fp8_mode: str | None = None, compute_device=None,
                   loras: list[LoraMerge] | None = None, option: str = "--dit",
                   split: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None) -> torch.nn.Module:
    """Fill a DiT built on the meta device from `files`: LoRAs merged and the transformer blocks' Linear weights
    quantised (fp8_mode) as each tensor streams in; split(key, tensor) first turns a tensor the file fuses into the
    model's own (None: the file has none). One UserError naming `what` when the keys do not match."""
    quantized = {n + ".weight": n for n, m in model.named_modules()
                 if fp8_mode and isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.")}
    merges = lora_merges(model, loras or [])

    def finish(key, t):
        for w, multiplier in merges.pop(key, []):
            t = (t.float() + w.delta().to(t.device) * multiplier).to(t.dtype)
        if key not in quantized:
            return {key: t}
        from ..memory.fp8 import quantize_weight

        q, s = quantize_weight(t.to(compute_device or device), fp8_mode)
        return {key: q.to(device), quantized[key] + ".scale_weight": s.to(device)}

    def transform(key, t):
        out = {}
        for k, v in (split(key, t) if split is not None else {key: t}).items():
            out.update(finish(k, v))
        return out

    state = load_tensors(files, dtype, device, key_map=key_map, disable_mmap=disable_mmap,
                         transform=transform if (fp8_mode or merges or split is not None) else None)
    if fp8_mode:
        from ..memory.fp8 import make_fp8_linear

        for wkey, name in quantized.items():  # declare the fp8 layout; the tensors are assigned below
            make_fp8_linear(model.get_submodule(name), torch.empty_like(state[wkey], device="meta"),
                            torch.empty_like(state[name + ".scale_weight"], device="meta"))
    expected = set(model.state_dict().keys())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise UserError(
            f"{option}: {files[0]} does not match the {what} layout "
            f"(missing {sorted(missing)[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {sorted(unexpected)[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    model.load_state_dict(state, assign=True, strict=True)
    model.to(device)  # buffers created at init follow the weights
    model.eval().requires_grad_(False)
    return model


def linear_names(num_layers: int = 60) -> list[str]:
    """Names of every nn.Linear of a Qwen-Image DiT with `num_layers` blocks (built on the meta device, no memory):
    what kohya LoRA keys (`lora_unet_<name with underscores>`) resolve against without loading the model."""
    from torch import nn

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(num_layers=num_layers)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
