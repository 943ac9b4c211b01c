"""Full finetuning mode of the trainer, the fused backward pass (optimizer step inside the backward hooks, with
stochastic rounding into bf16 weights) and memory-efficient checkpoint saving."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserError
from ..fileio import TMP_SUFFIX, save_safetensors, save_safetensors_streaming, temp_name_prefix, usual_permissions
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
    script = "qwen_image_train.py"
    weights_on_interrupt = False  # the state's trainable.safetensors is the DiT itself (loads as --dit)
    fused: FusedBackwardStep | None = None

    def __init__(self):
        self.model = None
        self.args = None
        self.metadata: dict[str, str] = {}

    def dit_dtype(self, args) -> torch.dtype:
        return torch.bfloat16 if args.full_bf16 else torch.float32

    def validate(self, args, version) -> None:
        if args.scale_weight_norms:
            raise UserError("--scale_weight_norms applies to LoRA networks (qwen_image_train_network.py), not to full "
                            "finetuning")
        self.version = version

    def setup(self, transformer, args) -> list[dict]:
        self.sharded = bool(getattr(args, "fsdp", False))
        if self.sharded:
            self._shard(transformer, args)
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

    @staticmethod
    def _shard(transformer, args) -> None:
        """FSDP2 FULL_SHARD: each transformer block is its own unit (gathered just for its forward/backward), the
        rest of the model the root unit."""
        from torch.distributed.fsdp import fully_shard

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise UserError("--fsdp shards the model across processes: launch with accelerate launch --multi_gpu "
                            "--num_processes N (or the FSDP example config)")
        for flag in ("fused_backward_pass", "blocks_to_swap"):
            if getattr(args, flag):
                raise UserError(f"--{flag} cannot be combined with --fsdp (FSDP already spreads the model)")
        for block in transformer.transformer_blocks:
            fully_shard(block)
        fully_shard(transformer)
        logger.info("FSDP: %d blocks sharded over %d processes", len(transformer.transformer_blocks),
                    dist.get_world_size())

    def save_sharded_state(self, folder: Path, state, optimizer, scheduler, is_main: bool, extra: dict | None = None,
                           rng: dict | None = None) -> Path:
        """Sharded weights and optimizer state through torch.distributed.checkpoint (every rank writes its shard),
        plus the usual counters; written to a temporary folder and renamed once every rank is done."""
        import shutil

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from .checkpoints import replace_folder, write_state_meta

        folder = Path(folder)
        tmp = folder.with_name(f"{temp_name_prefix(folder)}sharded{TMP_SUFFIX}")  # the same name on every rank
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        dist.barrier()
        if is_main:
            write_state_meta(tmp, state, scheduler, {**(extra or {}), "sharded": True}, rng)
            usual_permissions(tmp, folder=True)
            replace_folder(tmp, folder)
        dist.barrier()
        return folder

    def load_sharded_state(self, folder: Path, optimizer) -> None:
        """The sharded weights and optimizer state, read without unpickling anything but DCP's metadata classes
        (training.safe_dcp)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from .safe_dcp import SafeLoadPlanner, SafeReader, read_metadata

        if not (folder / "dcp").is_dir():
            raise UserError(f"--resume: {folder} holds no sharded (FSDP) state; resume it without --fsdp")
        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        saved = read_metadata(folder / "dcp").state_dict_metadata
        missing = [k for k in model_sd if f"model.{k}" not in saved]
        if missing:
            raise UserError(f"--resume: {folder} lacks model weights {missing[:3]} (another model or version?)")
        # partial: parameters that never received a gradient (the last block's text outputs) have no optimizer state
        dcp.load({"model": model_sd, "optim": optim_sd}, storage_reader=SafeReader(str(folder / "dcp")),
                 planner=SafeLoadPlanner(allow_partial_load=True))
        set_state_dict(self.model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)

    def attach_optimizer(self, optimizer, params) -> None:
        if self.args.fused_backward_pass:
            self.fused = FusedBackwardStep(optimizer, params, self.args.max_grad_norm)

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def save(self, path: Path, dtype, metadata) -> Path:
        """The DiT in diffusers key names (also a ComfyUI single file); streamed with --mem_eff_save. Under FSDP the
        full weights are gathered to rank 0 (a collective: every rank calls this) and rank 0 writes."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if dist.get_rank() != 0:
                return path
        else:
            sd = self.model.state_dict()
        if getattr(self, "version", None) is not None and self.version.zero_cond_t:
            # the Edit-2511 marker of ComfyUI files, so other tools load the result as Edit-2511 (ours drops it)
            from ..qwen_image.model_files import ZERO_COND_MARKER

            sd = {**sd, ZERO_COND_MARKER: torch.tensor([])}
        if self.args.mem_eff_save:
            return save_safetensors_streaming(sd, path, metadata, dtype)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        return save_safetensors({k: v.cpu() for k, v in sd.items()}, path, metadata)
