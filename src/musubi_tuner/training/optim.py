"""Optimizers (--optimizer_type, --optimizer_args) and learning-rate schedules (--lr_scheduler ...)."""

from __future__ import annotations

import ast
import importlib
import math

import torch

from ..errors import UserError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def parse_kv(pairs: list[str] | None, option: str) -> dict:
    """["k=v", ...] -> {k: python literal or string}."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"{option}: expected key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def build_optimizer(optimizer_type: str, params, lr: float, optimizer_args: list[str] | None = None):
    kwargs = parse_kv(optimizer_args, "--optimizer_args")
    name = optimizer_type.lower()
    if name == "adamw":
        cls = torch.optim.AdamW
    elif name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--optimizer_type adamw8bit needs bitsandbytes: pip install bitsandbytes "
                            "(or use --optimizer_type adamw)") from None
        cls = bnb.optim.AdamW8bit
    elif name == "adafactor":
        from transformers.optimization import Adafactor

        cls = Adafactor
        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("scale_parameter", False)
        kwargs.setdefault("warmup_init", False)
    elif "." in optimizer_type:
        mod, _, attr = optimizer_type.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"--optimizer_type {optimizer_type}: cannot import ({e})") from None
    else:
        raise UserError(f"--optimizer_type {optimizer_type!r}: use adamw, adamw8bit, adafactor or module.Class")
    try:
        return cls(params, lr=lr, **kwargs)
    except TypeError as e:
        raise UserError(f"--optimizer_args for {optimizer_type}: {e}") from None


def warmup_steps(value: float, total: int) -> int:
    """--lr_warmup_steps: an int, or a fraction (< 1) of the total steps."""
    return int(round(value * total)) if 0 < value < 1 else int(value)


def lr_lambda(name: str, total: int, warmup: int, num_cycles: float = 1.0, power: float = 1.0,
              min_lr_ratio: float = 0.0):
    """Multiplier of the base learning rate at each step: linear warmup from 0, then the decay shape (the formulas
    of diffusers' schedulers), floored at min_lr_ratio. num_cycles applies to cosine_with_restarts."""
    if name not in SCHEDULERS:
        raise UserError(f"--lr_scheduler {name!r}: choose from {', '.join(SCHEDULERS)}")

    def f(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        if name == "constant_with_warmup":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "linear":
            decay = 1.0 - progress
        elif name == "cosine":  # half a cosine wave
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif name == "cosine_with_restarts":
            decay = 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
        else:  # polynomial
            decay = (1.0 - progress) ** power
        return min_lr_ratio + (1.0 - min_lr_ratio) * max(0.0, decay)

    return f


def build_scheduler(optimizer, name: str, total: int, warmup: float = 0, num_cycles: float = 1.0, power: float = 1.0,
                    min_lr_ratio: float = 0.0):
    fn = lr_lambda(name, total, warmup_steps(warmup, total), num_cycles, power, min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
