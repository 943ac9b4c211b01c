"""LoRA for the Qwen-Image DiT, with the kohya `network_module` interface (`create_network`,
`create_network_from_weights`, `apply_to`, `prepare_optimizer_params`, `save_weights`, `load_weights`), so the trainer
drives this module and third-party ones (e.g. LyCORIS' kohya module) the same way. `networks.loha` and `networks.lokr`
use the same network with other module kinds.

Targets: every nn.Linear inside the transformer blocks (attention q/k/v/out of both streams, MLPs, img_mod/txt_mod).
network_args: exclude_patterns / include_patterns (regexes, `re.fullmatch` on dotted module names as musubi-tuner does,
python-list syntax; include re-adds excluded modules), rank_dropout, module_dropout, loraplus_lr_ratio, verbose.
"""

from __future__ import annotations

import ast
import logging
import math
import re

import torch
from torch import nn

from ..errors import UserError
from .lora_files import (
    KOHYA_PREFIX, LohaWeights, LokrWeights, LoraWeights, canonical_lora, linear_module_names, load_lora, on_cpu,
    save_lora,
)

logger = logging.getLogger(__name__)

TARGET_PREFIX = "transformer_blocks."


class NetworkModule(nn.Module):
    """y = W x + multiplier * delta(x), patched into the wrapped Linear's forward. Subclasses define the delta."""

    kind = "base"

    def __init__(self, name: str, org: nn.Linear, rank: int, alpha: float | None, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        self.lora_name = name
        self.rank = rank
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

    def weights(self):
        """This module as the canonical file form (lora_files.*Weights)."""
        raise NotImplementedError

    def load(self, w) -> None:
        for key, t in w.tensors().items():
            own = self._file_params()[key]
            if own.shape != t.shape:
                raise UserError(f"module {self.lora_name}: {key} is {tuple(t.shape)} in the file but "
                                f"{tuple(own.shape)} here")
            own.data.copy_(t)

    def _file_params(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.weights().tensors().items()}

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.org_forward(x)
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        diff = self.delta_weight()
        scale = 1.0
        if self.training and self.rank_dropout:
            keep = (torch.rand(diff.shape[0], device=diff.device) > self.rank_dropout).to(diff.dtype)
            diff = diff * keep[:, None]
            scale = 1.0 / (1.0 - self.rank_dropout)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(diff.dtype)
        return out + (nn.functional.linear(x, diff) * (self.multiplier * scale)).to(out.dtype)


class LoRAModule(NetworkModule):
    """y = W x + multiplier * alpha/rank * up(down(x))."""

    kind = "lora"

    def __init__(self, name: str, org: nn.Linear, rank: int, alpha: float, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None, **_):
        super().__init__(name, org, rank, alpha, dropout, rank_dropout, module_dropout)
        self.lora_down = nn.Linear(org.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, org.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def weights(self) -> LoraWeights:
        return LoraWeights(self.lora_down.weight, self.lora_up.weight, float(self.alpha))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_up.weight @ self.lora_down.weight) * self.scale

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
        try:
            value = ast.literal_eval(value) if value.strip().startswith("[") else [value]
        except (ValueError, SyntaxError):
            raise UserError(f"--network_args: {value!r} is not a list of patterns; write e.g. "
                            "exclude_patterns=['.*img_mod.*']") from None
        if not isinstance(value, (list, tuple)):
            value = [value]
    return [str(v) for v in value]


def _compile(patterns: list[str], what: str) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in patterns]
    except re.error as e:
        raise UserError(f"--network_args {what}: invalid regex ({e})") from None


class LoRANetwork(nn.Module):
    def __init__(self, transformer: nn.Module, rank: int, alpha: float, multiplier: float = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None,
                 include_patterns=None, exclude_patterns=None, loraplus_lr_ratio: float | None = None,
                 ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None,
                 module_class: type[NetworkModule] = LoRAModule, module_kwargs: dict | None = None,
                 verbose: bool = False):
        super().__init__()
        self.multiplier = multiplier
        self.loraplus_lr_ratio = loraplus_lr_ratio
        include = _compile(_patterns(include_patterns), "include_patterns")
        exclude = _compile(_patterns(exclude_patterns), "exclude_patterns")
        mods = dict(transformer.named_modules())
        self.unet_loras = nn.ModuleList()
        for name in linear_module_names(transformer):
            if not name.startswith(TARGET_PREFIX):
                continue
            # exclude_patterns drop modules; include_patterns bring excluded ones back (full match, as musubi-tuner)
            if any(p.fullmatch(name) for p in exclude) and not any(p.fullmatch(name) for p in include):
                if verbose:
                    logger.info("excluded: %s", name)
                continue
            if ranks is not None and name not in ranks:
                continue
            r = ranks[name] if ranks else rank
            a = alphas.get(name, r) if alphas is not None else alpha
            m = module_class(KOHYA_PREFIX + name.replace(".", "_"), mods[name], r, a, dropout, rank_dropout,
                             module_dropout, **(module_kwargs or {}))
            m.module_name = name
            self.unet_loras.append(m)
        if not self.unet_loras:
            raise UserError("--network_args: no target modules left (check include_patterns / exclude_patterns)")
        self.set_multiplier(multiplier)
        logger.info("%s: %d modules, rank %s", module_class.kind, len(self.unet_loras),
                    rank if ranks is None else "from weights")

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
        """One group, or with loraplus_lr_ratio the lora_up weights in a second group at ratio x lr (as kohya's)."""
        lr = unet_lr if unet_lr is not None else learning_rate
        plus, base = [], []
        for m in self.unet_loras:
            for n, p in m.named_parameters():
                (plus if self.loraplus_lr_ratio and n.startswith("lora_up") else base).append(p)
        if self.loraplus_lr_ratio:
            return [{"params": base, "lr": lr}, {"params": plus, "lr": lr * self.loraplus_lr_ratio}], ["unet", "unet plus"]
        return [{"params": base, "lr": lr}], ["unet"]

    def canonical(self) -> dict:
        return {m.module_name: m.weights() for m in self.unet_loras}

    def save_weights(self, file: str, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
                     fmt: str = "kohya") -> None:
        """kohya keys; with metadata, the kohya model hashes (sshs_*) are added as LoRA managers expect."""
        weights = {name: on_cpu(w) for name, w in self.canonical().items()}
        save_lora(weights, file, fmt, metadata, dtype, hashes=metadata is not None)

    def load_weights(self, file: str) -> dict:
        by_module = {m.module_name: m for m in self.unet_loras}
        lora = load_lora(file, list(by_module), option="--network_weights")
        missing = set(by_module) - set(lora)
        for name, w in lora.items():
            if name not in by_module:
                raise UserError(f"--network_weights {file}: module {name} is not a target of this network (other "
                                "include/exclude patterns?)")
            m = by_module[name]
            if type(m.weights()) is not type(w):
                raise UserError(f"--network_weights {file}: module {name} is a {type(w).__name__[:4]} module but the "
                                f"network is {m.kind}; pass the matching --network_module")
            if getattr(w, "rank", None) is not None and w.rank != m.rank:
                raise UserError(f"--network_weights {file}: module {name} has rank {w.rank} but this network has rank "
                                f"{m.rank}; pass --network_dim {w.rank} or --dim_from_weights")
            try:
                m.load(w)
            except UserError as e:
                raise UserError(f"--network_weights {file}: {e}; pass --dim_from_weights") from None
        return {"missing": sorted(missing)}

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float, device) -> tuple[int, float, float]:
        """--scale_weight_norms: scale down the LoRA modules whose delta-weight norm exceeds max_norm (down and up by
        the square root of the ratio each), as kohya's trainers do. Returns (modules scaled, mean norm, max norm)."""
        norms, scaled = [], 0
        for m in self.unet_loras:
            if not isinstance(m, LoRAModule):
                continue
            down, up = m.lora_down.weight, m.lora_up.weight
            norm = ((up.to(device) @ down.to(device)) * m.scale).norm()
            clamped = norm.clamp(min=max_norm / 2)
            ratio = float(clamped.clamp(max=max_norm) / clamped)
            if ratio != 1:
                scaled += 1
                down.mul_(ratio ** 0.5)
                up.mul_(ratio ** 0.5)
            norms.append(float(norm) * ratio)
        return scaled, (sum(norms) / len(norms) if norms else 0.0), max(norms, default=0.0)


NETWORK_ARGS = ("exclude_patterns", "include_patterns", "rank_dropout", "module_dropout", "loraplus_lr_ratio", "verbose")


def check_network_args(kwargs: dict, extra: tuple[str, ...] = ()) -> None:
    """--network_args of this module, checked before any model loads: value ranges, regexes; a key it does not know
    is a warning with the nearest known one (kohya modules ignore unknown keys, so musubi-tuner lines still run)."""
    import difflib

    known = NETWORK_ARGS + extra
    for key in kwargs:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            logger.warning("--network_args %s is not used by this network%s", key,
                           f" (did you mean {near[0]}?)" if near else f"; it knows {', '.join(known)}")
    for key in ("rank_dropout", "module_dropout"):
        if key in kwargs:
            v = _number(kwargs, key)
            if not 0 <= v < 1:
                raise UserError(f"--network_args {key}={kwargs[key]} must be in [0, 1)")
    if "loraplus_lr_ratio" in kwargs and not _number(kwargs, "loraplus_lr_ratio") > 0:
        raise UserError(f"--network_args loraplus_lr_ratio={kwargs['loraplus_lr_ratio']} must be > 0")
    for key in ("include_patterns", "exclude_patterns"):
        if key in kwargs:
            _compile(_patterns(kwargs[key]), key)


def _number(kwargs, name) -> float:
    try:
        v = float(kwargs[name])
    except (TypeError, ValueError):
        raise UserError(f"--network_args {name}={kwargs[name]} must be a number") from None
    if not math.isfinite(v):
        raise UserError(f"--network_args {name}={kwargs[name]} must be a finite number")
    return v


def _float(kwargs, name):
    v = kwargs.pop(name, None)
    return None if v is None else float(v)


def make_network(module_class: type[NetworkModule], multiplier: float, network_dim: int | None,
                 network_alpha: float | None, unet: nn.Module, neuron_dropout: float | None = None,
                 module_kwargs: dict | None = None, **kwargs) -> LoRANetwork:
    """The network for `--network_args` strings (kwargs)."""
    verbose = str(kwargs.pop("verbose", "False")).lower() in ("1", "true", "yes")
    return LoRANetwork(
        unet, int(network_dim or 4), float(network_alpha if network_alpha is not None else 1.0), multiplier,
        dropout=neuron_dropout, rank_dropout=_float(kwargs, "rank_dropout"),
        module_dropout=_float(kwargs, "module_dropout"), include_patterns=kwargs.pop("include_patterns", None),
        exclude_patterns=kwargs.pop("exclude_patterns", None), loraplus_lr_ratio=_float(kwargs, "loraplus_lr_ratio"),
        module_class=module_class, module_kwargs=module_kwargs, verbose=verbose,
    )


def make_network_from_weights(module_class: type[NetworkModule], weights_kind: type, multiplier: float, file: str,
                              unet: nn.Module, weights_sd: dict | None = None, module_kwargs: dict | None = None
                              ) -> LoRANetwork:
    """A network whose modules, ranks and alphas are those of an existing file (to continue training it)."""
    names = linear_module_names(unet)
    lora = canonical_lora(weights_sd, names) if weights_sd is not None else load_lora(file, names, "--network_weights")
    wrong = [n for n, w in lora.items() if not isinstance(w, weights_kind)]
    if wrong:
        raise UserError(f"--network_weights {file}: module {wrong[0]} is a {type(lora[wrong[0]]).__name__[:4]} module; "
                        f"pass the matching --network_module")
    def rank(w) -> int:  # a full LoKr w2 has no rank: its size stands in (any rank >= half of it means full)
        return w.rank if w.rank is not None else max(w.parts["lokr_w2"].shape)

    net = LoRANetwork(unet, 0, 0, multiplier, ranks={k: rank(v) for k, v in lora.items()},
                      alphas={k: (v.alpha if v.alpha is not None else rank(v)) for k, v in lora.items()},
                      module_class=module_class, module_kwargs=module_kwargs)
    for m in net.unet_loras:
        m.load(lora[m.module_name])
    return net


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                   unet: nn.Module, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    """kohya entry point; `unet` is the Qwen-Image DiT. kwargs come from --network_args (strings)."""
    return make_network(LoRAModule, multiplier, network_dim, network_alpha, unet, neuron_dropout, **kwargs)


create_arch_network = create_network


def create_network_from_weights(multiplier: float, file: str, vae, text_encoders, unet: nn.Module,
                                weights_sd: dict | None = None, for_inference: bool = False, **kwargs) -> LoRANetwork:
    return make_network_from_weights(LoRAModule, LoraWeights, multiplier, file, unet, weights_sd)


create_arch_network_from_weights = create_network_from_weights

__all__ = ["LoRAModule", "LoRANetwork", "NetworkModule", "LohaWeights", "LokrWeights", "create_network",
           "create_network_from_weights"]
