"""LoRAs baked into a DiT file (merge_lora.py, and generation's --save_merged_model): one or more LoRA / LoHa / LoKr
files with their multipliers are merged into the weights while the DiT streams in (the same merge generation does
with --lora_weight), and the result is written in the layout of the input:

- a single file (ComfyUI's, with or without its `model.diffusion_model.` prefix; Edit-2511's marker key kept) stays a
  single file with the same key names;
- diffusers shards (a folder, or the first `-0000N-of-0000M` shard) become a folder of shards of at most
  `max_shard_bytes` with `diffusion_pytorch_model.safetensors.index.json` and `config.json`, which diffusers'
  `from_pretrained` loads.

Precision: the DiT file's own (bf16 for the published files) unless `--save_precision` asks for another; with
`--fp8_scaled` a single file in ComfyUI's scaled fp8 layout (comfy_scaled_fp8; ComfyUI loads it, this tool's loaders
refuse fp8 files by design and quantise at load time instead). Every file
and option is checked before anything loads; files are written tensor by tensor and atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import DTYPE_NAMES, atomic_path, check_writable_folder, save_safetensors_streaming, temp_folder
from ..networks.lora_files import check_multipliers
from ..qwen_image.model_files import COMFY_DIT_PREFIX, ZERO_COND_MARKER, expect
from ..models.version import ModelVersion

logger = logging.getLogger(__name__)

SHARD_STEM = "diffusion_pytorch_model"
MAX_SHARD_BYTES = 5 * 2**30  # diffusers' default max_shard_size ("5GB" there is 5 * 10**9; shards only need a bound)


def plan(dit: str, loras: list[str], multipliers: list[float] | None, output: str, version: ModelVersion,
         precision: str | None) -> tuple[object, bool]:
    """Checks before any load; returns (the DiT's ModelFile, whether the output is sharded)."""
    info = expect(dit, "--dit", "dit", version)
    for lw in loras:
        expect(lw, "--lora_weight", "lora", version)
    check_multipliers(multipliers, "--lora_multiplier")
    if loras and len(multipliers or [1.0]) not in (1, len(loras)):
        raise UserError(f"--lora_multiplier: give one value or one per --lora_weight ({len(loras)})")
    if precision is not None and precision not in DTYPE_NAMES:
        raise UserError(f"--save_precision {precision}: choose one of {', '.join(DTYPE_NAMES)}")
    sharded = len(info.files) > 1
    out = Path(output)
    if sharded:
        if out.suffix == ".safetensors":
            raise UserError(f"--save_merged_model {output}: the DiT is diffusers shards, so the merged model is a "
                            "folder of shards; give a folder name")
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--save_merged_model {output}: the folder is not empty; give a new folder")
        check_writable_folder(out, "--save_merged_model")
    else:
        if out.suffix != ".safetensors":
            raise UserError(f"--save_merged_model {output}: give a .safetensors file name")
        check_writable_folder(out.parent if str(out.parent) else Path("."), "--save_merged_model")
    if any(Path(f).resolve() == out.resolve() for f in info.files):
        raise UserError(f"--save_merged_model {output} is the DiT file itself; write to a new file")
    if not loras:
        logger.warning("--save_merged_model without --lora_weight writes the DiT unchanged")
    return info, sharded


FP8_MAX = 448.0  # float8_e4m3fn


def comfy_scaled_fp8(sd: dict[str, torch.Tensor], linear_weights: set[str], prefix: str) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8 layout (its model_detection and ops.scaled_fp8_ops): a `<prefix>scaled_fp8` marker whose
    dtype is the fp8 type, every Linear weight in float8_e4m3fn with a float32 scalar `<layer>.scale_weight`
    (weight = fp8 * scale, scale = max |w| / 448), every other tensor as it was."""
    out = {}
    for k, v in sd.items():
        if k in linear_weights:
            w = v.float()
            scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)
            out[prefix + k] = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            out[prefix + k[:-len("weight")] + "scale_weight"] = scale.to(torch.float32).reshape(())
        else:
            out[prefix + k if k != ZERO_COND_MARKER else k] = v
    out[prefix + "scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)
    return out


def merge_into_dit(dit: str, loras: list[str], multipliers: list[float] | None, output: str, version: ModelVersion,
                   precision: str | None = None, include: list[str] | None = None,
                   exclude: list[str] | None = None, fp8_scaled: bool = False) -> Path:
    from ..models.registry import family_of
    from ..qwen_image.dit import LoraMerge

    info, sharded = plan(dit, loras, multipliers, output, version, precision)
    family = family_of(version)
    if fp8_scaled and (sharded or not family.comfy_single_file):
        raise UserError(f"--fp8_scaled writes ComfyUI's single-file scaled fp8 layout: give a single-file DiT of a model "
                        f"ComfyUI reads that way (not diffusers shards{'' if family.comfy_single_file else ' or ' + version.modelspec_arch})")
    file_dtype = next((d for k, d in info.dtypes.items() if k.endswith("img_in.weight")), torch.bfloat16)
    dtype = DTYPE_NAMES[precision] if precision else file_dtype
    mults = list(multipliers or [1.0])
    merges = [LoraMerge(str(p), mults[i] if i < len(mults) else mults[-1], "--lora_weight", include, exclude)
              for i, p in enumerate(loras)]
    model = family.load_dit(dit, version, dtype, "cpu", loras=merges)
    sd = model.state_dict()
    md = {"merged_from": Path(dit).name, "loras": "|".join(Path(p).name for p in loras),
          "lora_multipliers": "|".join(str(m.multiplier) for m in merges), "model_version": version.name}
    if sharded:
        out = write_shards(sd, Path(output), model.to_json_string(), md)
    else:
        # a family whose model holds diffusers names only (2.1: its ComfyUI files fuse gate_up) writes those
        prefix = COMFY_DIT_PREFIX if family.comfy_single_file and any(k.startswith(COMFY_DIT_PREFIX) for k in info.shapes) \
            else ""
        if version.zero_cond_t:
            sd = {**sd, ZERO_COND_MARKER: torch.tensor([])}
        if fp8_scaled:
            linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            out = save_safetensors_streaming(comfy_scaled_fp8(sd, linear, prefix), output, md)
        else:
            out = save_safetensors_streaming({(prefix + k if k != ZERO_COND_MARKER else k): v for k, v in sd.items()},
                                             output, md)
    logger.info("saved merged model %s", out)
    print(f"merged model written to {out}")
    return out


def write_shards(sd: dict[str, torch.Tensor], folder: Path, config_json: str, metadata: dict[str, str],
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """diffusers' sharded layout, written into a temporary folder that is renamed onto `folder` when complete."""
    groups, size = [[]], 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    tmp = temp_folder(folder)
    try:
        weight_map = {}
        for i, keys in enumerate(groups, 1):
            name = f"{SHARD_STEM}-{i:05d}-of-{len(groups):05d}.safetensors"
            save_safetensors_streaming({k: sd[k] for k in keys}, tmp / name, metadata)
            weight_map.update({k: name for k in keys})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        with atomic_path(tmp / f"{SHARD_STEM}.safetensors.index.json") as p:
            p.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        with atomic_path(tmp / "config.json") as p:  # as save_pretrained writes it
            p.write_text(config_json)
        if folder.exists():
            folder.rmdir()  # empty (checked before loading)
        tmp.rename(folder)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
