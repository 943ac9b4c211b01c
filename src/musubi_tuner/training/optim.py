"""Optimizers (--optimizer_type, --optimizer_args) and learning-rate schedules (--lr_scheduler ...), with
musubi-tuner's names and defaults.

Schedules: our six (constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial; the formulas of
diffusers / transformers, floored at --lr_scheduler_min_lr_ratio), transformers' others (inverse_sqrt,
cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay), diffusers' piecewise_constant, rex, adafactor
(Adafactor's own relative step), and any scheduler class with --lr_scheduler_type + --lr_scheduler_args.
"""

from __future__ import annotations

import ast
import importlib
import logging
import math

import torch

from ..errors import UserError

logger = logging.getLogger(__name__)

OWN_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SCHEDULERS = OWN_SCHEDULERS + ("inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
                               "piecewise_constant", "rex", "adafactor")


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


def adafactor_kwargs(kwargs: dict) -> dict:
    """musubi-tuner's Adafactor defaults: transformers' (relative_step=True, scale_parameter=True, warmup_init=False),
    and warmup_init implies relative_step."""
    kwargs = dict(kwargs)
    kwargs.setdefault("relative_step", True)
    if kwargs.get("warmup_init") and not kwargs["relative_step"]:
        logger.info("Adafactor: warmup_init needs relative_step, so relative_step=True")
        kwargs["relative_step"] = True
    return kwargs


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
        kwargs = adafactor_kwargs(kwargs)
        if kwargs["relative_step"]:  # Adafactor computes its own step size; --learning_rate is only logged
            logger.info("Adafactor with relative_step: the learning rate comes from Adafactor itself (--learning_rate "
                        "%g is the scheduler's initial value)", lr)
            lr = None
    else:
        mod, _, attr = optimizer_type.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod or "torch.optim"), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise UserError(f"--optimizer_type {optimizer_type}: cannot import ({e}); use adamw, adamw8bit, adafactor, "
                            "a torch.optim class name or module.Class") from None
    try:
        return cls(params, lr=lr, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--optimizer_args for {optimizer_type}: {e}") from None


def steps_value(value: float, total: int) -> int:
    """--lr_warmup_steps / --lr_decay_steps: an int, or a fraction (< 1) of all steps."""
    return int(round(value * total)) if 0 < value < 1 else int(value)


warmup_steps = steps_value


def lr_lambda(name: str, total: int, warmup: int, num_cycles: float = 1.0, power: float = 1.0,
              min_lr_ratio: float | None = 0.0):
    """Multiplier of the base learning rate at each step: linear warmup from 0, then the decay shape (the formulas
    of diffusers' schedulers), floored at min_lr_ratio. num_cycles applies to cosine_with_restarts."""
    min_lr_ratio = min_lr_ratio or 0.0

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


def rex_lambda(total: int, warmup: int, min_lr_ratio: float, rex_alpha: float = 0.1, rex_beta: float = 0.9):
    """Reflected exponential schedule (arXiv 2107.04197) as a multiplier of the base learning rate, with musubi-tuner's
    warmup from min_lr to the base rate."""
    def f(step: int) -> float:
        if warmup == 1 and step == 1:
            return min_lr_ratio
        if warmup > 1 and 1 <= step <= warmup - 1:
            return min_lr_ratio + (1 - min_lr_ratio) * (step - 1) / (warmup - 1)
        after, remaining = step - warmup, total - warmup
        if after >= remaining or after == -1 or remaining <= 0:
            return min_lr_ratio
        z = (remaining - (after % remaining)) / remaining
        return min_lr_ratio + (1.0 - min_lr_ratio) * (z / (rex_alpha + rex_beta * z))

    return f


def build_scheduler(optimizer, name: str, total: int, warmup: float = 0, num_cycles: float = 1.0, power: float = 1.0,
                    min_lr_ratio: float | None = None, decay_steps: float = 0, timescale: int | None = None,
                    scheduler_type: str | None = None, scheduler_args: list[str] | None = None,
                    learning_rate: float = 0.0):
    """The schedule, stepped once per optimizer step (total = optimizer steps of the run)."""
    kwargs = parse_kv(scheduler_args, "--lr_scheduler_args")
    if scheduler_type:  # any scheduler class, as musubi-tuner's --lr_scheduler_type
        mod, _, attr = scheduler_type.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod or "torch.optim.lr_scheduler"), attr)
            return cls(optimizer, **kwargs)
        except (ImportError, AttributeError, ValueError, TypeError) as e:
            raise UserError(f"--lr_scheduler_type {scheduler_type} with --lr_scheduler_args {scheduler_args}: {e}") from None
    if name not in SCHEDULERS:
        raise UserError(f"--lr_scheduler {name!r}: choose from {', '.join(SCHEDULERS)}")
    n_warmup, n_decay = steps_value(warmup, total), steps_value(decay_steps, total)
    from transformers.optimization import Adafactor

    relative = isinstance(optimizer, Adafactor) and optimizer.defaults.get("relative_step")
    if name == "adafactor" or relative:
        if not isinstance(optimizer, Adafactor):
            raise UserError("--lr_scheduler adafactor needs --optimizer_type adafactor")
        if name != "adafactor":
            logger.info("Adafactor with relative_step: using its own schedule instead of --lr_scheduler %s", name)
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, learning_rate)
    try:
        if name in OWN_SCHEDULERS and not kwargs:
            fn = lr_lambda(name, total, n_warmup, num_cycles, power, min_lr_ratio)
            return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
        if name == "rex":
            ratio = 0.01 if min_lr_ratio is None else min_lr_ratio
            return torch.optim.lr_scheduler.LambdaLR(optimizer, rex_lambda(total, n_warmup, ratio, **kwargs))
        if name == "piecewise_constant":
            from diffusers.optimization import get_piecewise_constant_schedule

            return get_piecewise_constant_schedule(optimizer, **kwargs)
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        fn = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
        if name == "constant":
            return fn(optimizer, **kwargs)
        if name == "constant_with_warmup":
            return fn(optimizer, num_warmup_steps=n_warmup, **kwargs)
        if name == "inverse_sqrt":
            return fn(optimizer, num_warmup_steps=n_warmup, timescale=timescale, **kwargs)
        common = dict(num_warmup_steps=n_warmup, num_training_steps=total)
        if name == "cosine_with_restarts":
            return fn(optimizer, **common, num_cycles=int(num_cycles), **kwargs)
        if name == "polynomial":
            return fn(optimizer, **common, power=power, **kwargs)
        if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
            if min_lr_ratio is None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
                raise UserError(f"--lr_scheduler {name} needs --lr_scheduler_min_lr_ratio")
            rate = {} if min_lr_ratio is None else {"min_lr_rate": min_lr_ratio}
            return fn(optimizer, **common, num_cycles=num_cycles / 2, **rate, **kwargs)
        if name == "warmup_stable_decay":
            if not n_decay:
                raise UserError("--lr_scheduler warmup_stable_decay needs --lr_decay_steps (steps or a fraction)")
            return fn(optimizer, num_warmup_steps=n_warmup, num_stable_steps=total - n_warmup - n_decay,
                      num_decay_steps=n_decay, num_cycles=num_cycles / 2, min_lr_ratio=min_lr_ratio or 0.0, **kwargs)
        return fn(optimizer, **common, **kwargs)  # linear / cosine with --lr_scheduler_args
    except TypeError as e:
        raise UserError(f"--lr_scheduler {name} with --lr_scheduler_args {scheduler_args}: {e}") from None
