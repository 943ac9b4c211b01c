"""A LoRA from a full finetune (qwen_extract_lora.py, musubi-tuner's options): per Linear weight, the difference
finetuned - base, approximated by its truncated SVD of rank `dim` (U S as lora_up, V^T as lora_down, alpha = rank, so
the scale is 1), with musubi-tuner's clamp of the factors at the `clamp_quantile` of their absolute values.

The Linear weights taken are musubi-tuner's: every one of the transformer blocks, img_in, txt_in, proj_out,
norm_out.linear and the timestep embedder. Both files may be ComfyUI single files (with or without the
`model.diffusion_model.` prefix) or diffusers shards; the weights are read one pair at a time. The output is a kohya
LoRA (`lora_unet_*`), which this tool, musubi-tuner, ComfyUI and diffusers' `load_lora_weights` read. The relative
reconstruction error ||delta - up @ down|| / ||delta|| is reported per weight kind and overall, and recorded in the
file's metadata (`extract_relative_error`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import UserError
from ..fileio import DTYPE_NAMES, check_writable_folder, save_safetensors
from ..qwen_image.model_files import expect, strip_dit_prefix

logger = logging.getLogger(__name__)

SELECTED_PREFIXES = ("transformer_blocks.", "img_in", "txt_in", "proj_out", "norm_out.linear",
                     "time_text_embed.timestep_embedder.linear_")


def selected(key: str) -> bool:
    return key.endswith(".weight") and key[:-7].startswith(SELECTED_PREFIXES)


def _index(files: list[Path]) -> dict[str, tuple[Path, str]]:
    """unprefixed key -> (file, key in that file)."""
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                name = strip_dit_prefix(k)
                if name is not None:
                    out[name] = (f, k)
    return out


def _tensor(where: tuple[Path, str]) -> torch.Tensor:
    with safe_open(str(where[0]), "pt") as f:
        return f.get_tensor(where[1])


def low_rank(delta: torch.Tensor, dim: int, clamp_quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, r), down (r, in)) of the truncated SVD, both clamped at the quantile of their values (musubi-tuner:
    hi = quantile of the concatenated factors, clamp to [-hi, hi])."""
    rank = min(dim, *delta.shape)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    up, down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    if clamp_quantile < 1:
        values = torch.cat([up.flatten(), down.flatten()])
        hi = torch.quantile(values, clamp_quantile) if values.numel() <= 16_000_000 else \
            torch.kthvalue(values.cpu(), max(1, int(round(clamp_quantile * values.numel())))).values
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return up, down


def extract_lora(model_org: str, model_tuned: str, save_to: str, dim: int = 4, device: str | None = None,
                 save_precision: str | None = None, clamp_quantile: float = 0.99, no_metadata: bool = False) -> dict:
    if dim < 1:
        raise UserError(f"--dim {dim} must be at least 1")
    if not 0 < clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile {clamp_quantile} must be in (0, 1]")
    if save_precision is not None and save_precision not in DTYPE_NAMES:
        raise UserError(f"--save_precision {save_precision}: choose one of {', '.join(DTYPE_NAMES)}")
    out = Path(save_to)
    if out.suffix != ".safetensors":
        raise UserError(f"--save_to {save_to}: give a .safetensors file name")
    check_writable_folder(out.parent if str(out.parent) else Path("."), "--save_to")
    org = expect(model_org, "--model_org", "dit")
    tuned = expect(model_tuned, "--model_tuned", "dit")
    a, b = _index(org.files), _index(tuned.files)
    keys = sorted(k for k in set(a) & set(b) if selected(k))
    shapes_a, shapes_b = org.dit_shapes, tuned.dit_shapes
    keys = [k for k in keys if len(shapes_a.get(k, ())) == 2]
    if not keys:
        raise UserError(f"--model_org {model_org} and --model_tuned {model_tuned} share no Linear weights")
    wrong = [k for k in keys if tuple(shapes_a[k]) != tuple(shapes_b[k])]
    if wrong:
        raise UserError(f"--model_tuned {model_tuned}: {wrong[0]} is {tuple(shapes_b[wrong[0]])} there but "
                        f"{tuple(shapes_a[wrong[0]])} in --model_org; give the finetune of this base model")
    calc = torch.device(device) if device else torch.device("cpu")
    save_dtype = DTYPE_NAMES[save_precision] if save_precision else None
    sd, errors, sizes, residuals = {}, {}, {}, {}
    for key in tqdm(keys, desc="extracting LoRA", unit="weight"):
        delta = _tensor(b[key]).to(calc, torch.float32) - _tensor(a[key]).to(calc, torch.float32)
        up, down = low_rank(delta, dim, clamp_quantile)
        norm = float(delta.norm())
        err = float((delta - up @ down).norm()) / norm if norm > 0 else 0.0
        kind = re.sub(r"^transformer_blocks\.\d+\.", "", key[:-7])  # e.g. attn.to_q, img_mlp.net.2, img_in
        errors.setdefault(kind, []).append(err)
        sizes[key], residuals[key] = norm, err * norm
        name = "lora_unet_" + key[:-7].replace(".", "_")
        sd[name + ".lora_up.weight"] = up.cpu().to(save_dtype or torch.float32).contiguous()
        sd[name + ".lora_down.weight"] = down.cpu().to(save_dtype or torch.float32).contiguous()
        sd[name + ".alpha"] = torch.tensor(float(up.shape[1]))
    # ||residual|| / ||delta|| over all weights together
    overall = math.sqrt(sum(r ** 2 for r in residuals.values()) / max(1e-30, sum(n ** 2 for n in sizes.values())))
    per_kind = {k: sum(v) / len(v) for k, v in errors.items()}
    metadata = {}
    if not no_metadata:
        metadata = {"title": out.stem, "created_at": str(int(time.time())), "ss_network_module": "networks.lora",
                    "ss_network_dim": str(dim), "ss_network_alpha": str(dim), "extracted_from": Path(model_tuned).name,
                    "extract_base": Path(model_org).name,
                    "extract_relative_error": json.dumps({"overall": round(overall, 6),
                                                          **{k: round(v, 6) for k, v in per_kind.items()}})}
    save_safetensors(sd, out, metadata)
    print(f"LoRA of rank {dim} from {len(keys)} weights written to {out}; relative reconstruction error "
          f"{overall:.4f} (" + ", ".join(f"{k} {v:.3f}" for k, v in sorted(per_kind.items())) + ")")
    return {"path": out, "error": overall, "per_kind": per_kind, "weights": len(keys)}
