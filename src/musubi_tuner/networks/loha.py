"""LoHa (low-rank Hadamard product, arXiv 2108.06098) for the Qwen-Image DiT: `--network_module networks.loha`.

delta W = ((w1a @ w1b) * (w2a @ w2b)) * alpha / rank, on the same Linear layers as the LoRA. Files use LyCORIS'
names (`lora_unet_<module>.hada_w1_a ... .alpha`), which musubi-tuner and ComfyUI read.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora_files import LohaWeights
from .lora_qwen_image import (  # noqa: F401 - check_network_args: this module's --network_args are the LoRA's
    LoRANetwork, NetworkModule, check_network_args, make_network, make_network_from_weights,
)


class _HadamardDelta(torch.autograd.Function):
    """((w1a @ w1b) * (w2a @ w2b)) * scale, recomputing the two products in backward instead of keeping them."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


class LoHaModule(NetworkModule):
    kind = "loha"

    def __init__(self, name: str, org: nn.Linear, rank: int, alpha: float, dropout=None, rank_dropout=None,
                 module_dropout=None, **_):
        super().__init__(name, org, rank, alpha, dropout, rank_dropout, module_dropout)
        out_dim, in_dim = org.out_features, org.in_features
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_dim, rank))  # zero: the delta starts at 0
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def weights(self) -> LohaWeights:
        return LohaWeights(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, float(self.alpha))

    def delta_weight(self) -> torch.Tensor:
        return _HadamardDelta.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                   unet: nn.Module, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    return make_network(LoHaModule, multiplier, network_dim, network_alpha, unet, neuron_dropout, **kwargs)


def create_network_from_weights(multiplier: float, file: str, vae, text_encoders, unet: nn.Module,
                                weights_sd: dict | None = None, for_inference: bool = False, **kwargs) -> LoRANetwork:
    return make_network_from_weights(LoHaModule, LohaWeights, multiplier, file, unet, weights_sd)


create_arch_network = create_network
create_arch_network_from_weights = create_network_from_weights
