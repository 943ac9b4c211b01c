"""Network files (LoRA, LoHa, LoKr): read every supported key format into one canonical form, convert, merge.

Formats (FACTS.md "LoRA file interop"):
- kohya: `lora_unet_<module_path_with_underscores>.lora_down.weight / .lora_up.weight / .alpha` (our default; loads in
  ComfyUI and diffusers); LoHa `.hada_w1_a/.hada_w1_b/.hada_w2_a/.hada_w2_b`, LoKr `.lokr_w1 (or _a/_b)`,
  `.lokr_w2 (or _a/_b)`, with `.alpha` (LyCORIS names, as musubi-tuner and ComfyUI use them)
- diffusers/PEFT: `diffusion_model.<module>.lora_A.weight / .lora_B.weight` (+ optional `.alpha`), also with the
  `transformer.` prefix (diffusers breaks on `transformer.` + `.alpha`, so we never write that combination).
Canonical form: {diffusers module name: LoraWeights | LohaWeights | LokrWeights}; each gives its weight delta.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..fileio import save_safetensors
from ..qwen_image.model_files import expect
from ..qwen_image.weights import load_tensors

logger = logging.getLogger(__name__)

KOHYA_PREFIX = "lora_unet_"
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
SUFFIXES = {
    "down": (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight"),
    "up": (".lora_up.weight", ".lora_B.weight", ".lora_B.default.weight"),
    "alpha": (".alpha",),
    **{k: ("." + k,) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                               "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
}


MAX_MULTIPLIER = 100.0  # a multiplier beyond this only makes images black or noise (a typo such as 1e30)


def check_multipliers(values: list[float] | None, option: str) -> None:
    """LoRA multipliers are finite and within +-MAX_MULTIPLIER (negative ones subtract a LoRA, which is legitimate)."""
    for m in values or []:
        if not (math.isfinite(m) and abs(m) <= MAX_MULTIPLIER):
            raise UserError(f"{option} {m} must be a number between -{MAX_MULTIPLIER:g} and {MAX_MULTIPLIER:g} "
                            "(usually 0.5 to 1.5)")


def _alpha_scale(alpha: float | None, dim: int | None) -> float:
    return 1.0 if alpha is None or dim is None else alpha / dim


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
        return _alpha_scale(self.alpha, self.rank)

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def delta(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()) * self.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.down, "lora_up.weight": self.up}


@dataclass
class LohaWeights:
    """LoHa: delta = ((w1a @ w1b) * (w2a @ w2b)) * alpha / rank."""

    w1a: torch.Tensor  # (out, rank)
    w1b: torch.Tensor  # (rank, in)
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1a.shape[0], self.w1b.shape[1]

    def delta(self) -> torch.Tensor:
        f = [t.float() for t in (self.w1a, self.w1b, self.w2a, self.w2b)]
        return (f[0] @ f[1]) * (f[2] @ f[3]) * _alpha_scale(self.alpha, self.rank)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}


@dataclass
class LokrWeights:
    """LoKr: delta = kron(w1, w2) * scale; w1 / w2 full or as a @ b; scale = alpha / rank of the low-rank factor
    (1 when both are full), as LyCORIS and ComfyUI read it."""

    parts: dict[str, torch.Tensor]  # lokr_w1 | lokr_w1_a+b, lokr_w2 | lokr_w2_a+b
    alpha: float | None = None

    def _factor(self, n: str) -> torch.Tensor:
        p = self.parts
        return p[f"lokr_{n}"].float() if f"lokr_{n}" in p else p[f"lokr_{n}_a"].float() @ p[f"lokr_{n}_b"].float()

    @property
    def rank(self) -> int | None:
        for n in ("w2", "w1"):
            if f"lokr_{n}_b" in self.parts:
                return self.parts[f"lokr_{n}_b"].shape[0]
        return None

    @property
    def shape(self) -> tuple[int, int]:
        w1, w2 = self._factor("w1"), self._factor("w2")
        return w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]

    def delta(self) -> torch.Tensor:
        return torch.kron(self._factor("w1"), self._factor("w2")) * _alpha_scale(self.alpha, self.rank)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.parts)


def on_cpu(w):
    """A detached CPU copy of any of the weights kinds."""
    import dataclasses

    def move(v):
        if torch.is_tensor(v):
            return v.detach().cpu()
        return {k: t.detach().cpu() for k, t in v.items()} if isinstance(v, dict) else v

    return dataclasses.replace(w, **{f.name: move(getattr(w, f.name)) for f in dataclasses.fields(w)})


def _split(key: str) -> tuple[str, str] | None:
    for kind, suffixes in SUFFIXES.items():
        for s in suffixes:
            if key.endswith(s):
                return key[: -len(s)], kind
    return None


def _build(name: str, p: dict[str, torch.Tensor], source: str):
    alpha_t = p.get("alpha")
    alpha = None if alpha_t is None else float(alpha_t)
    if "down" in p or "up" in p:
        if "down" not in p or "up" not in p:
            raise UserError(f"{source}: module {name} has only {sorted(p)} weights (needs down and up)")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise UserError(f"{source}: module {name} has mismatched LoRA shapes (down {tuple(down.shape)}, up "
                            f"{tuple(up.shape)}): the file is damaged or was assembled from two LoRAs")
        return LoraWeights(down, up, alpha)
    if any(k.startswith("hada_") for k in p):
        need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if not all(k in p for k in need):
            raise UserError(f"{source}: LoHa module {name} lacks {[k for k in need if k not in p]}")
        w = LohaWeights(*(p[k] for k in need), alpha)
        if w.w1a.shape[1] != w.rank or w.w2b.shape != w.w1b.shape or w.w2a.shape != w.w1a.shape:
            raise UserError(f"{source}: LoHa module {name} has mismatched shapes")
        return w
    parts = {k: v for k, v in p.items() if k.startswith("lokr_")}
    for n in ("w1", "w2"):
        if f"lokr_{n}" not in parts and not (f"lokr_{n}_a" in parts and f"lokr_{n}_b" in parts):
            raise UserError(f"{source}: LoKr module {name} lacks lokr_{n} (or lokr_{n}_a / lokr_{n}_b)")
    return LokrWeights(parts, alpha)


def canonical_lora(state: dict[str, torch.Tensor], module_names: list[str] | None = None,
                   source: str = "LoRA file") -> dict:
    """Any supported key format -> {diffusers module name: weights}. module_names resolves kohya underscores."""
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
        w = _build(name, p, source)
        for kind, t in w.tensors().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UserError(f"{source}: module {name} has NaN or infinite {kind} weights; the LoRA is broken "
                                "(training diverged?): use an earlier checkpoint")
        if w.alpha is not None and not torch.isfinite(torch.tensor(w.alpha)):
            raise UserError(f"{source}: module {name} has a NaN or infinite alpha")
        out[name] = w
    if not out:
        raise UserError(f"{source}: no LoRA weights found (expected lora_unet_*.lora_down/up, *.lora_A/B, hada_* or "
                        "lokr_* keys)")
    return out


def filter_keys(state: dict[str, torch.Tensor], include: list[str] | None, exclude: list[str] | None,
                source: str) -> dict[str, torch.Tensor]:
    """musubi-tuner's --include_patterns / --exclude_patterns of generation: regexes searched in the file's keys; a key
    is kept when it matches an include pattern (if any are given) and no exclude pattern."""
    try:
        inc = [re.compile(p) for p in include or []]
        exc = [re.compile(p) for p in exclude or []]
    except re.error as e:
        raise UserError(f"--include_patterns / --exclude_patterns: invalid regex ({e})") from None
    kept = {k: v for k, v in state.items() if (not inc or any(p.search(k) for p in inc))
            and not any(p.search(k) for p in exc)}
    if (inc or exc) and not kept:
        logger.warning("%s: --include_patterns / --exclude_patterns leave no weights; nothing of it is merged", source)
    return kept


def load_lora(path: str | Path, module_names: list[str] | None = None, option: str = "--lora_weight",
              include: list[str] | None = None, exclude: list[str] | None = None) -> dict:
    files = expect(path, option, "lora").files
    state = load_tensors(files, torch.float32)
    if include or exclude:
        state = filter_keys(state, include, exclude, str(path))
        if not state:
            return {}
    return canonical_lora(state, module_names, source=str(path))


def to_kohya(lora: dict) -> dict[str, torch.Tensor]:
    sd = {}
    for name, w in lora.items():
        k = KOHYA_PREFIX + name.replace(".", "_")
        for suffix, t in w.tensors().items():
            sd[f"{k}.{suffix}"] = t
        rank = w.rank
        alpha = w.alpha if w.alpha is not None else rank
        if alpha is not None:
            sd[k + ".alpha"] = torch.tensor(float(alpha))
    return sd


def to_diffusers(lora: dict, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """lora_A/lora_B keys. With the `transformer.` prefix alpha is folded into B (diffusers mis-reads `.alpha` there)."""
    sd = {}
    for name, w in lora.items():
        if not isinstance(w, LoraWeights):
            raise UserError(f"module {name} is a {type(w).__name__[:4]} module: LoHa and LoKr have no diffusers "
                            "format; use the file as it is (ComfyUI and this tool read it)")
        k = prefix + name
        if prefix == "transformer.":
            sd[k + ".lora_A.weight"], sd[k + ".lora_B.weight"] = w.down, w.up * w.scale
        else:
            sd[k + ".lora_A.weight"], sd[k + ".lora_B.weight"] = w.down, w.up
            sd[k + ".alpha"] = torch.tensor(float(w.rank if w.alpha is None else w.alpha))
    return sd


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's trainers compute them: on the file serialised with only the
    ss_* metadata, sha256 of everything after the header, and the first 8 hex digits of sha256 of the 64 KiB at
    1 MiB (what LoRA managers such as sd-webui-additional-networks index)."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest(), hashlib.sha256(blob[0x100000:0x100000 + 0x10000]).hexdigest()[:8]


def save_lora(lora: dict, path: str | Path, fmt: str = "kohya", metadata: dict[str, str] | None = None,
              dtype: torch.dtype | None = None, hashes: bool = False) -> Path:
    sd = to_kohya(lora) if fmt == "kohya" else to_diffusers(lora, "transformer." if fmt == "transformer" else "diffusion_model.")
    if dtype is not None:
        sd = {k: v.to(dtype) if v.ndim else v.float() for k, v in sd.items()}
    metadata = dict(metadata or {})
    if hashes:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(sd, metadata)
    return save_safetensors(sd, path, metadata or None)


@torch.no_grad()
def merge_lora(model: nn.Module, lora: dict, multiplier: float = 1.0) -> int:
    """W += multiplier * delta for every module in the file (LoRA: alpha/rank * up @ down); returns the number merged."""
    modules = dict(model.named_modules())
    for name, w in lora.items():
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            raise UserError(f"LoRA module {name} is not a Linear layer of this DiT (wrong model or version?)")
        if tuple(mod.weight.shape) != tuple(w.shape):
            raise UserError(f"LoRA module {name}: shape {tuple(w.shape)} does not match the DiT weight "
                            f"{tuple(mod.weight.shape)} (LoRA for another model?)")
        delta = w.delta() * multiplier
        mod.weight.copy_((mod.weight.float() + delta.to(mod.weight.device)).to(mod.weight.dtype))
    return len(lora)


def linear_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
