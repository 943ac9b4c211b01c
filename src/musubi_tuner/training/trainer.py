"""The training loop shared by LoRA training and full finetuning.

A `Mode` says what is trained (a LoRA network over the frozen DiT, or the DiT itself) and how it is saved; everything
else (data, timesteps, loss, optimizer, schedule, accumulation, logging, sampling, saving, resuming) lives here once.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import cli_options as opts
from ..dataset.config import load_dataset_config
from ..dataset.items import collect_items
from ..dataset.loader import CachedBatches, check_caches, make_loader
from ..errors import UserError
from ..memory.attention import check_attention, set_attention
from ..memory.placement import check_compile, load_dit_with_options
from ..qwen_image.versions import ModelVersion
from .checkpoints import TrainState, checkpoint_name, load_state, prune, save_state
from .loss import flow_matching_loss, sample_generators
from .optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

ATTENTION_FLAGS = {"xformers": "xformers", "flash_attn": "flash", "sage_attn": "sageattn"}  # -> --attn_mode names


def attention_mode(args) -> tuple[str, str | None]:
    """(--attn_mode name, the flag that chose it) from --sdpa / --xformers / --flash_attn / --sage_attn."""
    chosen = [flag for flag in ATTENTION_FLAGS if getattr(args, flag)]
    if len(chosen) > 1:
        raise UserError(f"choose one attention backend, not {' and '.join('--' + f for f in chosen)}")
    return (ATTENTION_FLAGS[chosen[0]], "--" + chosen[0]) if chosen else ("sdpa", None)


def after_optimizer_step(step: int) -> None:
    """Called after every optimizer step (a seam for tests that simulate Ctrl-C)."""


class Mode:
    """What is trained. Subclasses: LoraMode (networks) and FullMode (finetuning)."""

    name = "base"

    def dit_dtype(self, args) -> torch.dtype:
        raise NotImplementedError

    def setup(self, transformer, args) -> list[dict]:
        """Make the trainable parameters; return optimizer param groups."""
        raise NotImplementedError

    def trainable_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def save(self, path: Path, dtype: torch.dtype | None, metadata: dict[str, str]) -> Path:
        raise NotImplementedError

    def extension(self) -> str:
        return ".safetensors"

    def attach_optimizer(self, optimizer, params) -> None:
        """Called once the optimizer exists (full finetuning hooks the fused backward pass here)."""

    fused = None  # set when the optimizer steps inside backward
    sharded = False  # FSDP: gradients are reduced by FSDP; saving and state are collective (every rank takes part)

    def save_sharded_state(self, folder: Path, state, optimizer, scheduler, is_main: bool) -> Path:
        raise NotImplementedError

    def load_sharded_state(self, folder: Path, optimizer) -> None:
        raise NotImplementedError


def save_dtype(name: str | None) -> torch.dtype | None:
    return {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def validate(args, version: ModelVersion) -> list:
    """All checks that need no model, before anything heavy is loaded."""
    opts.require(args, "dit", "vae", "text_encoder", "dataset_config", "output_dir")
    for n in ("dit", "vae", "text_encoder"):
        if not Path(getattr(args, n)).exists():
            raise UserError(f"--{n}: file not found: {getattr(args, n)}")
    if args.remove_first_image_from_target and not version.is_layered:
        raise UserError("--remove_first_image_from_target only applies to --model_version layered")
    if args.gradient_accumulation_steps < 1:
        raise UserError("--gradient_accumulation_steps must be >= 1")
    check_attention(*attention_mode(args))
    check_compile(args)
    items = collect_items(load_dataset_config(args.dataset_config), version)
    return check_caches(items, version, args.vae, args.text_encoder)


def run_training(args: argparse.Namespace, mode: Mode) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    version = opts.version_from_args(args)
    cached = validate(args, version)
    output_dir = Path(args.output_dir)
    logging_dir = Path(args.logging_dir) if args.logging_dir else output_dir / "logs"
    if not torch.distributed.is_initialized():  # a new run in the same process (library use) gets a fresh state
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.log_with is None else ([args.log_with] if args.log_with != "all" else "all"),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
        cpu=args.device == "cpu" or not torch.cuda.is_available(),
    )
    set_seed(args.seed)
    device = accelerator.device
    dtype = mode.dit_dtype(args)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)

    sampler = None
    if args.sample_prompts:
        from .sampling import TrainingSampler

        sampler = TrainingSampler(args, version, device, compute_dtype)

    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:  # an accelerate config with distributed_type: FSDP
        if mode.name != "full":
            raise UserError("FSDP shards full finetuning (qwen_image_train.py); train LoRAs with a MULTI_GPU config")
        args.fsdp = True
    if args.blocks_to_swap and mode.name == "full" and not args.fused_backward_pass:
        raise UserError("--blocks_to_swap in full finetuning needs --fused_backward_pass (each block is updated "
                        "while it is on the device)")
    transformer, _ = load_dit_with_options(args, version, dtype, device, training=True)
    set_attention(transformer, attention_mode(args)[0])
    groups = mode.setup(transformer, args)
    trainable = mode.trainable_module()
    params = [p for g in groups for p in g["params"]]

    dataset = CachedBatches(cached, args.seed, accelerator.num_processes, accelerator.process_index)
    loader, epoch_sampler = make_loader(dataset, args.max_data_loader_n_workers, args.persistent_data_loader_workers)
    ga = args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(dataset) / ga)
    total_steps = args.max_train_epochs * steps_per_epoch if args.max_train_epochs else args.max_train_steps
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    optimizer = build_optimizer(args.optimizer_type, groups, args.learning_rate, args.optimizer_args)
    scheduler = build_scheduler(optimizer, args.lr_scheduler, total_steps, args.lr_warmup_steps,
                                args.lr_scheduler_num_cycles, args.lr_scheduler_power, args.lr_scheduler_min_lr_ratio)

    mode.attach_optimizer(optimizer, params)
    state = TrainState()
    if args.resume:
        state, weights, _ = load_state(args.resume, optimizer, scheduler, tensors=not mode.sharded)
        if mode.sharded:
            mode.load_sharded_state(Path(args.resume), optimizer)
        else:
            trainable.load_state_dict(weights, strict=True)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", args.resume, state.global_step,
                    state.epoch + 1, state.batch)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(f"{args.log_prefix}{mode.name}", config=config)
    loss_log = output_dir / "loss_log.csv"
    if accelerator.is_main_process and not args.resume:
        loss_log.unlink(missing_ok=True)  # a new run starts a new log; a resumed one appends
    metadata = training_metadata(args, version, mode, cached)

    def write_state(folder: Path) -> Path:
        if mode.sharded:
            return mode.save_sharded_state(folder, state, optimizer, scheduler, accelerator.is_main_process)
        return save_state(folder, state, trainable.state_dict(), optimizer, scheduler)

    def save(tag_epoch: int | None = None, tag_step: int | None = None, final: bool = False) -> None:
        if not accelerator.is_main_process and not mode.sharded:
            return
        name = checkpoint_name(args.output_name, None if final else tag_epoch, None if final else tag_step)
        md = {**metadata, "ss_steps": str(state.global_step), "ss_epoch": str(state.epoch + (1 if final else 0))}
        path = mode.save(output_dir / (name + mode.extension()), save_dtype(args.save_precision), md)
        if accelerator.is_main_process:
            logger.info("saved %s", path)
        if args.save_state or (final and args.save_state_on_train_end):
            write_state(output_dir / f"{name}-state")

    if sampler and args.sample_at_first and accelerator.is_main_process and not args.resume:
        sampler(transformer, 0, 0, accelerator)

    trainable.train()
    trace = Trace(accelerator.process_index)
    losses: list[float] = []
    bar = tqdm(total=total_steps, initial=state.global_step, desc="steps", disable=not accelerator.is_local_main_process)
    start_batch = state.batch
    try:
        for epoch in range(state.epoch, num_epochs):
            if state.global_step >= total_steps:
                break
            state.epoch = epoch
            epoch_sampler.epoch, epoch_sampler.start = epoch, start_batch
            micro = epoch_sampler.start
            for batch in loader:
                is_last = micro == len(dataset) - 1
                with accelerator.autocast():
                    loss = flow_matching_loss(transformer, batch, version, args,
                                              sample_generators(args.seed, batch["sample_keys"]), device, compute_dtype)
                if not torch.isfinite(loss):
                    raise UserError(f"loss is {loss.item()} at step {state.global_step + 1} (epoch {epoch + 1}); "
                                    "lower --learning_rate, use --mixed_precision bf16 or check the caches")
                accelerator.backward(loss / ga)
                trace.record(batch["items"])
                micro += 1
                state.batch = micro
                losses.append(loss.item())
                if micro % ga and not is_last:
                    continue
                if mode.fused is None:  # the fused backward pass has already stepped every parameter
                    if not mode.sharded:  # FSDP has reduced the gradients already
                        sync_gradients(accelerator, params)
                    if args.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.global_step += 1
                step_loss = sum(losses[-ga:]) / len(losses[-ga:])
                lr = scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", avg=f"{sum(losses) / len(losses):.4f}", lr=f"{lr:.2e}")
                accelerator.log({"loss/current": step_loss, "lr": lr, "epoch": epoch + 1}, step=state.global_step)
                if accelerator.is_main_process:
                    append_loss(loss_log, state.global_step, epoch + 1, step_loss, lr)
                after_optimizer_step(state.global_step)
                if args.save_every_n_steps and state.global_step % args.save_every_n_steps == 0 \
                        and state.global_step < total_steps:
                    save(tag_step=state.global_step)
                    if args.save_last_n_steps and accelerator.is_main_process:
                        prune(output_dir, args.output_name, "step", state.global_step - args.save_last_n_steps + 1)
                if sampler and args.sample_every_n_steps and state.global_step % args.sample_every_n_steps == 0 \
                        and accelerator.is_main_process:
                    sampler(transformer, epoch + 1, state.global_step, accelerator)
                if state.global_step >= total_steps:
                    break
            state.batch, start_batch = 0, 0
            if state.global_step >= total_steps and micro < len(dataset):
                break
            state.epoch = epoch + 1
            if args.save_every_n_epochs and (epoch + 1) % args.save_every_n_epochs == 0 and epoch + 1 < num_epochs:
                save(tag_epoch=epoch + 1)
                if args.save_last_n_epochs and accelerator.is_main_process:
                    prune(output_dir, args.output_name, "epoch", epoch + 2 - args.save_last_n_epochs)
            if sampler and args.sample_every_n_epochs and (epoch + 1) % args.sample_every_n_epochs == 0 \
                    and accelerator.is_main_process:
                sampler(transformer, epoch + 1, state.global_step, accelerator)
    except KeyboardInterrupt:
        bar.close()
        if mode.sharded:  # collectives after an interrupt are not safe: the last periodic state is the resume point
            print(f"interrupted at step {state.global_step}; resume from the last saved -state folder")
        elif accelerator.is_main_process:
            folder = write_state(output_dir / f"{args.output_name}-interrupted-state")
            print(f"interrupted at step {state.global_step}: state saved to {folder}; continue with --resume {folder}")
        accelerator.end_training()
        raise SystemExit(130) from None
    bar.close()
    trace.write(trainable)
    save(final=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    final = output_dir / (args.output_name + mode.extension())
    return {"final": final, "losses": losses, "steps": state.global_step, "loss_log": loss_log,
            "logging_dir": logging_dir, "sample_dir": output_dir / "sample"}


class Trace:
    """With MUSUBI_TUNER_TRACE_DIR set, each process writes the items it trained on and a checksum of its trainable
    weights (used by the multi-process tests; costs nothing otherwise)."""

    def __init__(self, rank: int):
        import os

        self.dir, self.rank, self.items = os.environ.get("MUSUBI_TUNER_TRACE_DIR"), rank, []

    def record(self, items: list[int]) -> None:
        if self.dir:
            self.items.append(items)

    def write(self, module: torch.nn.Module) -> None:
        if not self.dir:
            return
        with torch.no_grad():
            values = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in module.state_dict().values()]
            checksum = float(sum(p.double().sum() for p in values if p.is_floating_point()))
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        (Path(self.dir) / f"rank{self.rank}.json").write_text(json.dumps({"items": self.items, "checksum": checksum}))


def sync_gradients(accelerator, params: list[torch.Tensor]) -> None:
    """Average gradients across processes (plain all-reduce: no DDP wrapper needed around patched modules)."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= accelerator.num_processes


def append_loss(path: Path, step: int, epoch: int, loss: float, lr: float) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", "epoch", "loss", "lr"])
        w.writerow([step, epoch, f"{loss:.6f}", f"{lr:.6g}"])


def training_metadata(args, version: ModelVersion, mode: Mode, cached) -> dict[str, str]:
    datasets = {}
    for c in cached:
        d = datasets.setdefault(str(c.dataset), {"images": 0, "num_repeats": c.num_repeats, "batch_size": c.batch_size})
        d["images"] += 1
    return {
        "ss_training_started_at": str(int(time.time())), "ss_base_model_version": f"qwen_image_{version.name}",
        "ss_model_version": version.name, "ss_training_mode": mode.name,
        "ss_dit": Path(args.dit).name, "ss_num_train_images": str(len(cached)), "ss_dataset": json.dumps(datasets),
        "ss_timestep_sampling": args.timestep_sampling, "ss_discrete_flow_shift": str(args.discrete_flow_shift),
        "ss_weighting_scheme": args.weighting_scheme, "ss_learning_rate": str(args.learning_rate),
        "ss_optimizer": args.optimizer_type + (f"({','.join(args.optimizer_args)})" if args.optimizer_args else ""),
        "ss_lr_scheduler": args.lr_scheduler, "ss_seed": str(args.seed), "ss_mixed_precision": args.mixed_precision,
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_max_train_steps": str(args.max_train_steps), "ss_max_train_epochs": str(args.max_train_epochs),
        **getattr(mode, "metadata", {}),
    }
