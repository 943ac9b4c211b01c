"""LoRA files: read every supported key format into one canonical form, convert, and merge into a model.

Formats (FACTS.md "LoRA file interop"):
- kohya: `lora_unet_<module_path_with_underscores>.lora_down.weight / .lora_up.weight / .alpha` (our default; loads in
  ComfyUI and diffusers)
- diffusers/PEFT: `diffusion_model.<module>.lora_A.weight / .lora_B.weight` (+ optional `.alpha`), also with the
  `transformer.` prefix (diffusers breaks on `transformer.` + `.alpha`, so we never write that combination).
Canonical form: {module_name: LoraWeights(down, up, alpha)} with diffusers module names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..fileio import save_safetensors
from ..qwen_image.model_files import expect
from ..qwen_image.weights import load_tensors

KOHYA_PREFIX = "lora_unet_"
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
DOWN = (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight")
UP = (".lora_up.weight", ".lora_B.weight", ".lora_B.default.weight")


@dataclass
class LoraWeights:
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)
    alpha: float | None = None  # None: alpha = rank (scale 1)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


def _split(key: str) -> tuple[str, str] | None:
    for kind, suffixes in (("down", DOWN), ("up", UP), ("alpha", (".alpha",))):
        for s in suffixes:
            if key.endswith(s):
                return key[: -len(s)], kind
    return None


def canonical_lora(state: dict[str, torch.Tensor], module_names: list[str] | None = None,
                   source: str = "LoRA file") -> dict[str, LoraWeights]:
    """Any supported key format -> {diffusers module name: LoraWeights}. module_names resolves kohya underscores."""
    underscored = {n.replace(".", "_"): n for n in (module_names or [])}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        split = _split(key)
        if split is None:
            continue
        name, kind = split
        if name.startswith(KOHYA_PREFIX):
            flat = name[len(KOHYA_PREFIX):]
            if module_names is None:
                raise UserError(f"{source}: kohya keys need the model's module names to resolve")
            if flat not in underscored:
                raise UserError(f"{source}: LoRA module {name} does not exist in this DiT (wrong model or version?)")
            name = underscored[flat]
        else:
            for p in PREFIXES:
                if name.startswith(p):
                    name = name[len(p):]
                    break
        parts.setdefault(name, {})[kind] = t
    out = {}
    for name, p in parts.items():
        if "down" not in p or "up" not in p:
            raise UserError(f"{source}: module {name} has only {sorted(p)} weights (needs down and up)")
        down, up, alpha = p["down"], p["up"], p.get("alpha")
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise UserError(f"{source}: module {name} has mismatched LoRA shapes (down {tuple(down.shape)}, up "
                            f"{tuple(up.shape)}): the file is damaged or was assembled from two LoRAs")
        for kind, t in (("down", down), ("up", up), ("alpha", alpha)):
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UserError(f"{source}: module {name} has NaN or infinite {kind} weights; the LoRA is broken "
                                "(training diverged?): use an earlier checkpoint")
        out[name] = LoraWeights(down, up, None if alpha is None else float(alpha))
    if not out:
        raise UserError(f"{source}: no LoRA weights found (expected lora_unet_*.lora_down/up or *.lora_A/B keys)")
    return out


def load_lora(path: str | Path, module_names: list[str] | None = None, option: str = "--lora_weight"
              ) -> dict[str, LoraWeights]:
    files = expect(path, option, "lora").files
    return canonical_lora(load_tensors(files, torch.float32), module_names, source=str(path))


def to_kohya(lora: dict[str, LoraWeights]) -> dict[str, torch.Tensor]:
    sd = {}
    for name, w in lora.items():
        k = KOHYA_PREFIX + name.replace(".", "_")
        sd[k + ".lora_down.weight"] = w.down
        sd[k + ".lora_up.weight"] = w.up
        sd[k + ".alpha"] = torch.tensor(float(w.rank if w.alpha is None else w.alpha))
    return sd


def to_diffusers(lora: dict[str, LoraWeights], prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """lora_A/lora_B keys. With the `transformer.` prefix alpha is folded into B (diffusers mis-reads `.alpha` there)."""
    sd = {}
    for name, w in lora.items():
        k = prefix + name
        if prefix == "transformer.":
            sd[k + ".lora_A.weight"], sd[k + ".lora_B.weight"] = w.down, w.up * w.scale
        else:
            sd[k + ".lora_A.weight"], sd[k + ".lora_B.weight"] = w.down, w.up
            sd[k + ".alpha"] = torch.tensor(float(w.rank if w.alpha is None else w.alpha))
    return sd


def save_lora(lora: dict[str, LoraWeights], path: str | Path, fmt: str = "kohya",
              metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    sd = to_kohya(lora) if fmt == "kohya" else to_diffusers(lora, "transformer." if fmt == "transformer" else "diffusion_model.")
    if dtype is not None:
        sd = {k: v.to(dtype) if v.ndim else v.float() for k, v in sd.items()}
    return save_safetensors(sd, path, metadata)


@torch.no_grad()
def merge_lora(model: nn.Module, lora: dict[str, LoraWeights], multiplier: float = 1.0) -> int:
    """W += multiplier * alpha/rank * up @ down for every module in the LoRA; returns the number merged."""
    modules = dict(model.named_modules())
    for name, w in lora.items():
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            raise UserError(f"LoRA module {name} is not a Linear layer of this DiT (wrong model or version?)")
        if mod.weight.shape != (w.up.shape[0], w.down.shape[1]):
            raise UserError(f"LoRA module {name}: shape {tuple(w.up.shape[:1]) + tuple(w.down.shape[1:])} does not "
                            f"match the DiT weight {tuple(mod.weight.shape)} (LoRA for another model?)")
        delta = (w.up.float() @ w.down.float()) * (multiplier * w.scale)
        mod.weight.copy_((mod.weight.float() + delta.to(mod.weight.device)).to(mod.weight.dtype))
    return len(lora)


def linear_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
