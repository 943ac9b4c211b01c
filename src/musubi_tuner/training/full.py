"""Full finetuning mode of the trainer, the fused backward pass (optimizer step inside the backward hooks, with
stochastic rounding into bf16 weights) and memory-efficient checkpoint saving."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import save_safetensors, save_safetensors_streaming
from .trainer import Mode

logger = logging.getLogger(__name__)


def stochastic_round_bf16(src: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 -> bfloat16 rounding up or down with probability proportional to the distance: unbiased, so small
    updates accumulate in expectation instead of being rounded away."""
    bits = src.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=src.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class FusedBackwardStep:
    """Run the optimizer for each parameter as soon as its gradient is accumulated, then free the gradient.

    The optimizer's own step is reused on a one-parameter group; bf16 parameters are stepped through a float32
    proxy and written back with stochastic rounding."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float = 0.0):
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        self.group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.handles = [p.register_post_accumulate_grad_hook(self.step_param) for p in params if p.requires_grad]

    @torch.no_grad()
    def step_param(self, p: torch.nn.Parameter) -> None:
        if p.grad is None:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        if self.max_grad_norm:  # per tensor: there is no global norm when each tensor steps on its own
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        opt, group = self.optimizer, self.group_of[id(p)]
        target = p
        if p.dtype == torch.bfloat16:
            target = torch.nn.Parameter(p.detach().float())
            target.grad = p.grad.float()
            if p in opt.state:
                opt.state[target] = opt.state.pop(p)
        saved = opt.param_groups
        opt.param_groups = [{**group, "params": [target]}]
        try:
            opt.step()
        finally:
            opt.param_groups = saved
        if target is not p:
            opt.state[p] = opt.state.pop(target)
            p.copy_(stochastic_round_bf16(target))
        p.grad = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class FullMode(Mode):
    name = "full"
    fused: FusedBackwardStep | None = None

    def __init__(self):
        self.model = None
        self.args = None
        self.metadata: dict[str, str] = {}

    def dit_dtype(self, args) -> torch.dtype:
        return torch.bfloat16 if args.full_bf16 else torch.float32

    def setup(self, transformer, args) -> list[dict]:
        if args.fused_backward_pass:
            if args.optimizer_type.lower() != "adafactor":
                raise UserError("--fused_backward_pass works with --optimizer_type adafactor")
            if args.gradient_accumulation_steps > 1:
                raise UserError("--fused_backward_pass cannot be combined with --gradient_accumulation_steps > 1 "
                                "(each gradient is applied as soon as it exists)")
        self.model, self.args = transformer, args
        transformer.requires_grad_(True)
        params = [p for p in transformer.parameters() if p.requires_grad]
        logger.info("full finetuning: %.3f B parameters (%s weights)", sum(p.numel() for p in params) / 1e9,
                    self.dit_dtype(args))
        self.metadata = {"ss_full_bf16": str(args.full_bf16), "ss_fused_backward_pass": str(args.fused_backward_pass)}
        return [{"params": params, "lr": args.learning_rate}]

    def attach_optimizer(self, optimizer, params) -> None:
        if self.args.fused_backward_pass:
            self.fused = FusedBackwardStep(optimizer, params, self.args.max_grad_norm)

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def save(self, path: Path, dtype, metadata) -> Path:
        """The DiT in diffusers key names (also a ComfyUI single file); streamed with --mem_eff_save."""
        sd = self.model.state_dict()
        if self.args.mem_eff_save:
            return save_safetensors_streaming(sd, path, metadata, dtype)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        return save_safetensors({k: v.cpu() for k, v in sd.items()}, path, metadata)
