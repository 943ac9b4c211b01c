"""A third-party network module with the kohya/LyCORIS interface (positional text_encoder/unet arguments,
prepare_optimizer_params(text_encoder_lr, unet_lr, learning_rate) returning a list): the trainer must drive it
unchanged. It trains a learnable per-channel gain on every attention output projection."""

import torch
from safetensors.torch import save_file
from torch import nn


class GainNetwork(nn.Module):
    def __init__(self, unet, multiplier):
        super().__init__()
        self.targets = [m for n, m in unet.named_modules() if n.endswith("attn.to_out.0")]
        self.gains = nn.ParameterList([nn.Parameter(torch.zeros(m.out_features)) for m in self.targets])
        self.multiplier = multiplier

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        for m, g in zip(self.targets, self.gains):
            org = m.forward
            m.forward = lambda x, org=org, g=g: org(x) * (1 + self.multiplier * g)

    def prepare_grad_etc(self, text_encoder, unet):
        self.requires_grad_(True)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, learning_rate):
        return [{"params": list(self.gains.parameters()), "lr": unet_lr}]

    def save_weights(self, file, dtype, metadata):
        save_file({f"gain_{i}": g.detach().cpu().contiguous() for i, g in enumerate(self.gains)}, file, metadata)


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **kwargs):
    return GainNetwork(unet, multiplier)
