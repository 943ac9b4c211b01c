"""LoKr (low-rank Kronecker product, arXiv 2309.14859) for the Qwen-Image DiT: `--network_module networks.lokr`.

delta W = kron(w1, w2) * scale: w1 (out_l, in_m) is a small full matrix, w2 (out_k, in_n) is w2_a @ w2_b of rank r
(scale alpha / r), or a full matrix when r >= max(out_k, in_n) / 2 (scale 1). The dimensions are split into balanced
factors (network_args factor=F caps the smaller one). Files use LyCORIS' names (`lokr_w1`, `lokr_w2_a`, `lokr_w2_b`
or `lokr_w2`, `alpha`), which musubi-tuner and ComfyUI read.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .lora_files import LokrWeights
from ..errors import UserError
from .lora_qwen_image import LoRANetwork, NetworkModule, make_network, make_network_from_weights
from .lora_qwen_image import check_network_args as check_lora_args

logger = logging.getLogger(__name__)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension: with factor > 0 dividing the dimension, (factor, dimension / factor); else the
    most balanced pair whose smaller part does not exceed factor (any, for -1)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:  # walk up the divisors towards the square root
        nm = m + 1
        while dimension % nm:
            nm += 1
        if nm > limit:
            break
        m, n = nm, dimension // nm
    return (m, n) if m <= n else (n, m)


class LoKrModule(NetworkModule):
    kind = "lokr"

    def __init__(self, name: str, org: nn.Linear, rank: int, alpha: float, dropout=None, rank_dropout=None,
                 module_dropout=None, factor: int = -1, **_):
        in_m, in_n = factorization(org.in_features, int(factor))
        out_l, out_k = factorization(org.out_features, int(factor))
        self.full_w2 = rank >= max(out_k, in_n) / 2
        super().__init__(name, org, rank, rank if self.full_w2 else alpha, dropout, rank_dropout, module_dropout)
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.full_w2:  # the rank would not save anything: a full w2 (scale 1)
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n))  # zero: the delta starts at 0
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))

    def weights(self) -> LokrWeights:
        parts = {"lokr_w1": self.lokr_w1}
        parts.update({"lokr_w2": self.lokr_w2} if self.full_w2 else
                     {"lokr_w2_a": self.lokr_w2_a, "lokr_w2_b": self.lokr_w2_b})
        return LokrWeights(parts, float(self.alpha))

    def delta_weight(self) -> torch.Tensor:
        w2 = self.lokr_w2 if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b
        return torch.kron(self.lokr_w1, w2) * self.scale


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                   unet: nn.Module, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    factor = int(kwargs.pop("factor", -1))
    return make_network(LoKrModule, multiplier, network_dim, network_alpha, unet, neuron_dropout,
                        module_kwargs={"factor": factor}, **kwargs)


def create_network_from_weights(multiplier: float, file: str, vae, text_encoders, unet: nn.Module,
                                weights_sd: dict | None = None, for_inference: bool = False, **kwargs) -> LoRANetwork:
    return make_network_from_weights(LoKrModule, LokrWeights, multiplier, file, unet, weights_sd,
                                     module_kwargs={"factor": int(kwargs.pop("factor", -1))})


def check_network_args(kwargs: dict) -> None:
    check_lora_args(kwargs, extra=("factor",))
    if "factor" in kwargs:
        try:
            factor = int(kwargs["factor"])
        except ValueError:
            factor = 0
        if factor == 0 or factor < -1:
            raise UserError(f"--network_args factor={kwargs['factor']} must be a whole number >= 1 (or -1: balanced)")


create_arch_network = create_network
create_arch_network_from_weights = create_network_from_weights
