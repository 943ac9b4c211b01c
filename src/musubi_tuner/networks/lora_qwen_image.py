"""LoRA for the Qwen-Image DiT, with the kohya `network_module` interface (`create_network`,
`create_network_from_weights`, `apply_to`, `prepare_optimizer_params`, `save_weights`, `load_weights`), so the trainer
drives this module and third-party ones (e.g. LyCORIS' kohya module) the same way.

Targets: every nn.Linear inside the transformer blocks (attention q/k/v/out of both streams, MLPs, img_mod/txt_mod).
network_args: exclude_patterns (regexes, re.match on dotted module names, python-list syntax) and
include_patterns (re-include excluded modules), rank_dropout,
module_dropout, loraplus_lr_ratio.
"""

from __future__ import annotations

import ast
import logging
import math
import re

import torch
from torch import nn

from ..errors import UserError
from .lora_files import KOHYA_PREFIX, LoraWeights, canonical_lora, linear_module_names, load_lora, save_lora

logger = logging.getLogger(__name__)

TARGET_PREFIX = "transformer_blocks."


class LoRAModule(nn.Module):
    """y = W x + multiplier * alpha/rank * up(down(x)), patched into the wrapped Linear's forward."""

    def __init__(self, name: str, org: nn.Linear, rank: int, alpha: float, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        self.lora_name = name
        self.rank = rank
        self.lora_down = nn.Linear(org.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, org.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = rank if alpha is None or alpha == 0 else alpha
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / rank
        self.multiplier = 1.0
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.org_module = [org]  # a list: not a submodule, so the base weights are not part of this state dict
        self.org_forward = None

    def apply_to(self) -> None:
        org = self.org_module[0]
        self.org_forward = org.forward
        org.forward = self.forward

    def remove(self) -> None:
        if self.org_forward is not None:
            self.org_module[0].forward = self.org_forward
            self.org_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.org_forward(x)
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmul casts; a copy would only cost
            x = x.to(self.lora_down.weight.dtype)          # memory (it is saved for backward)
        h = self.lora_down(x)
        if self.training and self.dropout:
            h = nn.functional.dropout(h, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            keep = (torch.rand(h.shape[-1], device=h.device) > self.rank_dropout).to(h.dtype)
            h = h * keep
            scale = scale / (1.0 - self.rank_dropout)
        return out + (self.lora_up(h) * (self.multiplier * scale)).to(out.dtype)


def _patterns(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = ast.literal_eval(value) if value.strip().startswith("[") else [value]
    return [str(v) for v in value]


class LoRANetwork(nn.Module):
    def __init__(self, transformer: nn.Module, rank: int, alpha: float, multiplier: float = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None,
                 include_patterns=None, exclude_patterns=None, loraplus_lr_ratio: float | None = None,
                 ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None):
        super().__init__()
        self.multiplier = multiplier
        self.loraplus_lr_ratio = loraplus_lr_ratio
        include = [re.compile(p) for p in _patterns(include_patterns)]
        exclude = [re.compile(p) for p in _patterns(exclude_patterns)]
        mods = dict(transformer.named_modules())
        self.unet_loras = nn.ModuleList()
        for name in linear_module_names(transformer):
            if not name.startswith(TARGET_PREFIX):
                continue
            # exclude_patterns drop modules; include_patterns bring excluded ones back (re.match on module names)
            if any(p.match(name) for p in exclude) and not any(p.match(name) for p in include):
                continue
            if ranks is not None and name not in ranks:
                continue
            r = ranks[name] if ranks else rank
            a = alphas.get(name, r) if alphas is not None else alpha
            self.unet_loras.append(LoRAModule(KOHYA_PREFIX + name.replace(".", "_"), mods[name], r, a, dropout,
                                              rank_dropout, module_dropout))
            self.unet_loras[-1].module_name = name
        if not self.unet_loras:
            raise ValueError("no LoRA targets matched (check include_patterns / exclude_patterns)")
        self.set_multiplier(multiplier)
        logger.info("LoRA: %d modules, rank %s", len(self.unet_loras), rank if ranks is None else "from weights")

    # kohya network interface
    def apply_to(self, text_encoders=None, unet=None, apply_text_encoder: bool = False, apply_unet: bool = True):
        for lora in self.unet_loras:
            lora.apply_to()

    def remove_from(self) -> None:
        for lora in self.unet_loras:
            lora.remove()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.unet_loras:
            lora.multiplier = multiplier

    def prepare_grad_etc(self, *args, **kwargs) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, *args, **kwargs) -> None:
        self.train()

    def get_trainable_params(self):
        return list(self.parameters())

    def prepare_optimizer_params(self, unet_lr: float | None = None, learning_rate: float | None = None, **_):
        lr = unet_lr if unet_lr is not None else learning_rate
        downs = [p for l in self.unet_loras for p in l.lora_down.parameters()]
        ups = [p for l in self.unet_loras for p in l.lora_up.parameters()]
        if self.loraplus_lr_ratio:
            groups = [{"params": downs, "lr": lr}, {"params": ups, "lr": lr * self.loraplus_lr_ratio}]
            return groups, ["unet", "unet plus"]
        return [{"params": downs + ups, "lr": lr}], ["unet"]

    def canonical(self) -> dict[str, LoraWeights]:
        return {l.module_name: LoraWeights(l.lora_down.weight.detach(), l.lora_up.weight.detach(), float(l.alpha))
                for l in self.unet_loras}

    def save_weights(self, file: str, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
                     fmt: str = "kohya") -> None:
        save_lora({k: LoraWeights(v.down.cpu(), v.up.cpu(), v.alpha) for k, v in self.canonical().items()},
                  file, fmt, metadata, dtype)

    def load_weights(self, file: str) -> dict:
        by_module = {l.module_name: l for l in self.unet_loras}
        lora = load_lora(file, list(by_module), option="--network_weights")
        missing = set(by_module) - set(lora)
        for name, w in lora.items():
            if name not in by_module:
                raise UserError(f"--network_weights {file}: module {name} is not a target of this network (other "
                                "include/exclude patterns?)")
            m = by_module[name]
            if m.lora_down.weight.shape != w.down.shape or m.lora_up.weight.shape != w.up.shape:
                raise UserError(f"--network_weights {file}: module {name} has rank {w.rank} but this network has rank "
                                f"{m.rank}; pass --network_dim {w.rank} or --dim_from_weights")
            m.lora_down.weight.data.copy_(w.down)
            m.lora_up.weight.data.copy_(w.up)
        return {"missing": sorted(missing)}


def _float(kwargs, name):
    v = kwargs.pop(name, None)
    return None if v is None else float(v)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                   unet: nn.Module, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    """kohya entry point; `unet` is the Qwen-Image DiT. kwargs come from --network_args (strings)."""
    return LoRANetwork(
        unet, int(network_dim or 4), float(network_alpha if network_alpha is not None else 1.0), multiplier,
        dropout=neuron_dropout, rank_dropout=_float(kwargs, "rank_dropout"),
        module_dropout=_float(kwargs, "module_dropout"), include_patterns=kwargs.pop("include_patterns", None),
        exclude_patterns=kwargs.pop("exclude_patterns", None), loraplus_lr_ratio=_float(kwargs, "loraplus_lr_ratio"),
    )


create_arch_network = create_network


def create_network_from_weights(multiplier: float, file: str, vae, text_encoders, unet: nn.Module,
                                weights_sd: dict | None = None, for_inference: bool = False, **kwargs) -> LoRANetwork:
    """A network whose modules, ranks and alphas are those of an existing LoRA file (to continue training it)."""
    names = linear_module_names(unet)
    lora = canonical_lora(weights_sd, names) if weights_sd is not None else load_lora(file, names, "--network_weights")
    net = LoRANetwork(unet, 0, 0, multiplier, ranks={k: v.rank for k, v in lora.items()},
                      alphas={k: (v.alpha if v.alpha is not None else v.rank) for k, v in lora.items()})
    for l in net.unet_loras:
        w = lora[l.module_name]
        l.lora_down.weight.data.copy_(w.down)
        l.lora_up.weight.data.copy_(w.up)
    return net


create_arch_network_from_weights = create_network_from_weights
