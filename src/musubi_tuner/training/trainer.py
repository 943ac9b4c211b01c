"""The training loop shared by LoRA training and full finetuning.

A `Mode` says what is trained (a LoRA network over the frozen DiT, or the DiT itself) and how it is saved; everything
else (data, timesteps, loss, optimizer, schedule, accumulation, logging, sampling, saving, resuming) lives here once.

Nothing is lost to a late error: every input is checked before any model loads, and after training has started any
exception, SIGINT or SIGTERM saves an interrupted state at the last optimizer-step boundary (never inside an
accumulation window), from which --resume continues exactly as if nothing had happened.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import cli_options as opts
from ..dataset.config import load_dataset_config
from ..dataset.holdout import split_items
from ..dataset.items import collect_items
from ..dataset.loader import CachedBatches, check_caches, make_loader
from ..errors import UserError, describe_error, is_environment_error, plural
from ..fileio import DTYPE_NAMES, check_writable_folder, remove_path
from ..memory.attention import check_attention, set_attention
from ..memory.placement import check_compile, load_dit_with_options
from ..networks.lora_files import check_multipliers
from ..qwen_image.model_files import expect
from ..models.version import ModelVersion
from .checkpoints import (
    TrainState, check_resume_settings, load_state, load_trainable, read_state_meta, rng_states, save_state,
)
from .hub import Uploader, check_hub_options, download_state
from .interrupt import StopRequest
from .loss import flow_matching_loss, sample_generators
from .metadata import modelspec, training_metadata, weights_metadata
from .optim import build_optimizer, build_scheduler
from .outputs import (
    LossLog, RunLock, checkpoint_name, existing_outputs, keep_copy, loss_log_path, loss_plot_path, prune,
    remove_leftovers, validation_log_path,
)
from .plot import update_loss_plot
from .validation import Validator, check_validation_options, default_sigmas, validation_seed

logger = logging.getLogger(__name__)

ATTENTION_FLAGS = {"xformers": "xformers", "flash_attn": "flash", "sage_attn": "sageattn"}  # -> --attn_mode names
LOSS_COLUMNS = ["step", "epoch", "loss", "lr"]


def attention_mode(args) -> tuple[str, str | None]:
    """(--attn_mode name, the flag that chose it) from --sdpa / --xformers / --flash_attn / --sage_attn."""
    if getattr(args, "flash3", False):
        raise UserError("--flash3: FlashAttention 3 cannot be used with Qwen-Image; use --flash_attn, --sage_attn, "
                        "--xformers or --sdpa")
    chosen = [flag for flag in ATTENTION_FLAGS if getattr(args, flag)]
    if len(chosen) > 1:
        raise UserError(f"choose one attention backend, not {' and '.join('--' + f for f in chosen)}")
    return (ATTENTION_FLAGS[chosen[0]], "--" + chosen[0]) if chosen else ("sdpa", None)


def tracker_init_kwargs(args) -> dict:
    """accelerate's init_kwargs: --log_tracker_config's tables (as musubi-tuner: the file replaces the defaults), else
    the wandb run name."""
    if args.log_tracker_config:
        from ..fileio import parse_toml, read_text

        where = f"--log_tracker_config {args.log_tracker_config}"
        data = parse_toml(read_text(args.log_tracker_config, "--log_tracker_config"), where)
        bad = [k for k, v in data.items() if not isinstance(v, dict)]
        if bad:
            raise UserError(f"{where}: {bad[0]} must be a table of one tracker's options, e.g. [wandb] entity = \"me\"")
        return data
    return {"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {}


def check_trackers(args) -> None:
    """The tracker options work before any model loads: wandb installed when asked for, the tracker config readable."""
    import importlib.util

    wandb = args.log_with in ("wandb", "all")
    if wandb and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--log_with {args.log_with}: the wandb package is not installed; pip install wandb, or use "
                        "--log_with tensorboard")
    if args.wandb_api_key and not wandb:
        raise UserError("--wandb_api_key needs --log_with wandb (or all)")
    tracker_init_kwargs(args)


def after_optimizer_step(step: int) -> None:
    """Called after every optimizer step (a seam for tests that simulate Ctrl-C)."""


class Mode:
    """What is trained. Subclasses: LoraMode (networks) and FullMode (finetuning)."""

    name = "base"
    script = ""
    weights_on_interrupt = True  # also write a weights file beside an interrupted state (cheap for a LoRA)

    def validate(self, args, version: ModelVersion) -> None:
        """Mode-specific checks that need no model."""

    def resume_settings(self, args) -> dict:
        """Settings a state records that must match when it is resumed."""
        return {}

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

    def after_step(self, args, device) -> dict:
        """After each optimizer step (LoRA: --scale_weight_norms); returns values to log."""
        return {}

    def attach_optimizer(self, optimizer, params) -> None:
        """Called once the optimizer exists (full finetuning hooks the fused backward pass here)."""

    fused = None  # set when the optimizer steps inside backward
    sharded = False  # FSDP: gradients are reduced by FSDP; saving and state are collective (every rank takes part)

    def save_sharded_state(self, folder: Path, state, optimizer, scheduler, is_main: bool, extra: dict | None = None,
                           rng: dict | None = None) -> Path:
        raise NotImplementedError

    def load_sharded_state(self, folder: Path, optimizer) -> None:
        raise NotImplementedError


def save_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else DTYPE_NAMES[name]


def check_ranges(args) -> None:
    """Numeric options that would fail or silently misbehave late."""
    def need(ok: bool, option: str, rule: str):
        if not ok:
            raise UserError(f"--{option} {getattr(args, option)} {rule}")

    need(args.learning_rate >= 0 and math.isfinite(args.learning_rate), "learning_rate", "must be >= 0")
    need(args.max_train_steps >= 1, "max_train_steps", "must be at least 1")
    need(args.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be at least 1")
    need(math.isfinite(args.discrete_flow_shift) and args.discrete_flow_shift > 0, "discrete_flow_shift",
         "must be a finite number > 0")
    need(args.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
    need(args.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
    need(args.blocks_to_swap >= 0, "blocks_to_swap", "must be >= 0")
    need(0 <= args.min_timestep < args.max_timestep <= 1000, "min_timestep",
         f"and --max_timestep {args.max_timestep} must satisfy 0 <= min < max <= 1000")
    need(args.sigmoid_scale > 0, "sigmoid_scale", "must be > 0")
    need(args.logit_std > 0, "logit_std", "must be > 0")
    need(args.mode_scale >= 0, "mode_scale", "must be >= 0")
    need(args.lr_decay_steps >= 0, "lr_decay_steps", "must be >= 0")
    need(args.lr_scheduler_num_cycles > 0, "lr_scheduler_num_cycles", "must be > 0")
    need(args.lr_scheduler_power > 0, "lr_scheduler_power", "must be > 0")
    need(args.max_data_loader_n_workers >= 0, "max_data_loader_n_workers", "must be >= 0")
    if args.lr_scheduler_min_lr_ratio is not None:
        need(0 <= args.lr_scheduler_min_lr_ratio <= 1, "lr_scheduler_min_lr_ratio", "must be between 0 and 1")
    if args.scale_weight_norms is not None:
        need(args.scale_weight_norms > 0, "scale_weight_norms", "must be > 0")
    for option in ("max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
                   "save_last_n_steps", "save_last_n_epochs_state", "save_last_n_steps_state", "sample_every_n_epochs",
                   "sample_every_n_steps", "num_timestep_buckets", "lr_scheduler_timescale", "ddp_timeout"):
        if getattr(args, option, None) is not None:
            need(getattr(args, option) >= 1, option, "must be at least 1")
    check_multipliers(args.base_weights_multiplier, "--base_weights_multiplier")


@dataclass
class Checked:
    """What validate() found: the dataset configs, the cached items and the planned sample jobs."""

    configs: list
    cached: list
    sample_jobs: list | None
    validation: list = ()  # held-out CachedItems


def validate(args, version: ModelVersion, mode: Mode) -> Checked:
    """All checks that need no model, before anything heavy is loaded: files by their headers, option ranges,
    sample prompts, caches, the output folder."""
    opts.require(args, "dit", "dataset_config", "output_dir")
    missing = [f"--{n}" for n in ("vae", "text_encoder") if not getattr(args, n)]
    if args.sample_prompts and missing:  # the caches hold everything else: these two are only for samples
        raise UserError(f"--sample_prompts needs {' and '.join(missing)} to encode the prompts and decode the samples")
    expect(args.dit, "--dit", "dit", version, num_layers=args.num_layers)
    if args.vae:
        expect(args.vae, "--vae", "vae", version)
    if args.text_encoder:
        expect(args.text_encoder, "--text_encoder", "text_encoder", version)
    if args.remove_first_image_from_target and not version.layer_targets:
        raise UserError("--remove_first_image_from_target only applies to --model_version layered")
    check_ranges(args)
    check_validation_options(args)
    for bw in args.base_weights or []:
        expect(bw, "--base_weights", "lora", version)
    if args.base_weights_multiplier and len(args.base_weights_multiplier) not in (1, len(args.base_weights or [])):
        raise UserError("--base_weights_multiplier: give one value or one per --base_weights")
    mode.validate(args, version)
    check_attention(*attention_mode(args))
    check_compile(args)
    check_trackers(args)
    check_hub_options(args)
    check_writable_folder(args.output_dir, "--output_dir")
    if args.resume_from_huggingface:  # from here on --resume is the downloaded folder
        args.resume = str(download_state(args))
    configs = load_dataset_config(args.dataset_config)
    check_output_not_in_dataset(args.output_dir, configs)
    jobs = None
    if args.sample_prompts:
        from .sampling import plan_samples

        jobs = plan_samples(args, version, configs[0])
    items = collect_items(configs, version)
    train, held = split_items(items, args.validation_split, validation_seed(args))
    if held:
        logger.info("validation: %s held out (never trained on)", plural(len(held), "item"))
    return Checked(configs, check_caches(train, version, args.vae, args.text_encoder), jobs,
                   check_caches(held, version, args.vae, args.text_encoder) if held else [])


def check_output_not_in_dataset(output_dir: str, configs: list) -> None:
    """The run writes pictures beside its checkpoints (the loss plot): in a dataset's image or control folder they
    would become training images of the next caching run."""
    out = Path(output_dir).resolve()
    for cfg in configs:
        for key in ("image_directory", "control_directory"):
            folder = getattr(cfg, key, None)
            if folder and Path(folder).resolve() == out:
                raise UserError(f"--output_dir {output_dir} is the {key} of {cfg.where}: the run's files (its loss "
                                "plot) would become training images; choose another folder")


def resume_check(args, mode: Mode, version: ModelVersion, total_steps: int) -> int | None:
    """The step of --resume's state (None without --resume), checked against this run before any model loads."""
    if not args.resume:
        return None
    meta = read_state_meta(args.resume)
    check_resume_settings(args.resume, meta, {"training script": mode.script, "--model_version": version.name,
                                              "--optimizer_type": args.optimizer_type, **mode.resume_settings(args)})
    if bool(meta.get("sharded")) != bool(mode.sharded or getattr(args, "fsdp", False)):
        raise UserError(f"--resume: {args.resume} is a {'sharded (FSDP)' if meta.get('sharded') else 'plain'} state; "
                        f"resume it {'with' if meta.get('sharded') else 'without'} --fsdp")
    step = int(meta["global_step"])
    if step >= total_steps:
        raise UserError(f"--resume: {args.resume} is at step {step}, but this run ends at step {total_steps}; raise "
                        "--max_train_steps / --max_train_epochs to continue training it")
    return step


def prepare_output(args, resume_step: int | None) -> tuple[RunLock, LossLog]:
    """Main process: lock the output name, clear leftovers of killed saves, refuse to overwrite another run's
    results unless asked, start the loss log."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, args.output_name)
    lock.acquire()
    try:
        remove_leftovers(out, args.output_name)
        earlier = existing_outputs(out, args.output_name)
        if earlier and resume_step is None:
            if not args.overwrite:
                shown = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
                raise UserError(f"--output_dir {out} already holds results of a run named {args.output_name!r} "
                                f"({shown}); pass --overwrite to replace them, --resume <state folder> to continue "
                                "that run, or choose another --output_name")
            for p in earlier:
                remove_path(p)
            logger.info("--overwrite: removed %d earlier result(s) of %s", len(earlier), args.output_name)
        log = LossLog(loss_log_path(out, args.output_name), LOSS_COLUMNS)
        log.start(resume_step)
    except BaseException:
        lock.release()
        raise
    return lock, log


@dataclass
class Boundary:
    """The training state at the last optimizer-step boundary: what an interrupted state records."""

    state: TrainState
    rng: dict


class Stopped(Exception):
    """Raised inside the loop when a stop was requested; handled at the loop's edge."""


def run_training(args: argparse.Namespace, mode: Mode) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

    if int(os.environ.get("RANK", "0") or 0) != 0:  # under accelerate launch: one copy of the log lines, from rank 0,
        logging.getLogger().setLevel(logging.WARNING)  # also of those before the Accelerator exists

    version = opts.version_from_args(args)
    if args.show_timesteps:
        from .timesteps import show_timesteps

        check_ranges(args)
        show_timesteps(args, args.show_timesteps, args.output_dir or ".")
        return {}
    checked = validate(args, version, mode)
    if args.cuda_allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.cuda_cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    output_dir = Path(args.output_dir)
    logging_dir = Path(args.logging_dir) if args.logging_dir else output_dir / "logs"
    if not torch.distributed.is_initialized():  # a new run in the same process (library use) gets a fresh state
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    handlers = []
    if args.ddp_timeout:
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.log_with is None else ([args.log_with] if args.log_with != "all" else "all"),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
        cpu=args.device == "cpu" or not torch.cuda.is_available(), kwargs_handlers=handlers,
    )
    if not accelerator.is_main_process:  # one copy of the log lines, from the main process
        logging.getLogger().setLevel(logging.WARNING)
    if accelerator.distributed_type == DistributedType.FSDP:  # an accelerate config with distributed_type: FSDP
        if mode.name != "full":
            raise UserError("FSDP shards full finetuning (qwen_image_train.py); train LoRAs with a MULTI_GPU config")
        args.fsdp = True
    if args.blocks_to_swap and mode.name == "full" and not args.fused_backward_pass:
        raise UserError("--blocks_to_swap in full finetuning needs --fused_backward_pass (each block is updated "
                        "while it is on the device)")
    set_seed(args.seed)

    dataset = CachedBatches(checked.cached, args.seed, accelerator.num_processes, accelerator.process_index)
    ga = args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(dataset) / ga)
    total_steps = args.max_train_epochs * steps_per_epoch if args.max_train_epochs else args.max_train_steps
    resume_step = resume_check(args, mode, version, total_steps)

    lock = log = None
    if accelerator.is_main_process:
        lock, log = prepare_output(args, resume_step)
    try:
        return _train(args, mode, version, checked, accelerator, dataset, total_steps, log)
    finally:
        if lock is not None:
            lock.release()


def _train(args, mode: Mode, version: ModelVersion, checked: Checked, accelerator, dataset, total_steps: int,
           loss_log: LossLog | None) -> dict:
    device = accelerator.device
    output_dir = Path(args.output_dir)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    sampler = None
    if checked.sample_jobs:
        from .sampling import TrainingSampler

        sampler = TrainingSampler(args, version, device, compute_dtype, checked.sample_jobs)

    validator = make_validator(args, checked.validation, accelerator.is_main_process, version)
    transformer, _ = load_dit_with_options(args, version, mode.dit_dtype(args), device, training=True)
    set_attention(transformer, attention_mode(args)[0])
    groups = mode.setup(transformer, args)
    trainable = mode.trainable_module()
    params = [p for g in groups for p in g["params"]]
    loader, epoch_sampler = make_loader(dataset, args.max_data_loader_n_workers, args.persistent_data_loader_workers)
    ga = args.gradient_accumulation_steps
    num_epochs = math.ceil(total_steps / math.ceil(len(dataset) / ga))

    optimizer = build_optimizer(args.optimizer_type, groups, args.learning_rate, args.optimizer_args)
    scheduler = build_scheduler(optimizer, args.lr_scheduler, total_steps, args.lr_warmup_steps,
                                args.lr_scheduler_num_cycles, args.lr_scheduler_power, args.lr_scheduler_min_lr_ratio,
                                args.lr_decay_steps, args.lr_scheduler_timescale, args.lr_scheduler_type,
                                args.lr_scheduler_args, args.learning_rate)
    mode.attach_optimizer(optimizer, params)
    state = TrainState()
    if args.resume:
        state, weights, _ = load_state(args.resume, optimizer, scheduler, tensors=not mode.sharded)
        if mode.sharded:
            mode.load_sharded_state(Path(args.resume), optimizer)
        else:
            load_trainable(trainable, weights, args.resume)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", args.resume, state.global_step,
                    state.epoch + 1, state.batch)
    start_step = state.global_step

    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        if args.log_config:
            logger.info("options: %s", json.dumps(config, sort_keys=True))
        if args.log_with in ("wandb", "all"):
            import wandb

            os.environ.setdefault("WANDB_DIR", str(accelerator.logging_dir))
            if args.wandb_api_key:
                wandb.login(key=args.wandb_api_key)
        init = tracker_init_kwargs(args)
        accelerator.init_trackers(args.log_tracker_name or f"{args.log_prefix}{mode.name}", config=config,
                                  init_kwargs=init)
        if args.log_with in ("tensorboard", "all"):
            logger.info("TensorBoard logs in %s (watch the run: tensorboard --logdir %s); the loss is also drawn in "
                        "%s at each save", accelerator.logging_dir, accelerator.logging_dir,
                        loss_plot_path(output_dir, args.output_name))
    steps_per_epoch = math.ceil(len(dataset) / ga)
    metadata = training_metadata(args, version, mode, checked.cached, checked.configs, total_steps, steps_per_epoch,
                                 num_epochs)
    spec = modelspec(args, version, mode.name == "lora", checked.configs[0].resolution)
    settings = {"training script": mode.script, "--model_version": version.name,
                "--optimizer_type": args.optimizer_type, **mode.resume_settings(args)}

    uploader = Uploader(args)

    def write_state(folder: Path, at: Boundary) -> Path:
        extra = {"settings": settings}
        if mode.sharded:
            return mode.save_sharded_state(folder, at.state, optimizer, scheduler, accelerator.is_main_process, extra,
                                           at.rng)
        return save_state(folder, at.state, trainable.state_dict(), optimizer, scheduler, extra, at.rng)

    def epoch_number(s: TrainState) -> int:  # completed epochs at an epoch end, else the epoch in progress (1-based)
        return s.epoch if s.batch == 0 else s.epoch + 1

    doing = [None]  # what the run is doing besides training (a save): named if it fails

    def save(name: str, at: Boundary, with_state: bool, weights: bool = True) -> Path | None:
        """Weights (main process; a collective under FSDP) and optionally the resumable state."""
        path = output_dir / (name + mode.extension())
        if weights and (accelerator.is_main_process or mode.sharded):
            doing[0] = f"saving {path.name} (after step {at.state.global_step})"
            md = weights_metadata(metadata, args, at.state.global_step, epoch_number(at.state), spec)
            mode.save(path, save_dtype(args.save_precision), md)
            if accelerator.is_main_process:
                logger.info("saved %s", path)
        if with_state and (accelerator.is_main_process or mode.sharded):
            doing[0] = f"saving {name}-state (after step {at.state.global_step})"
            write_state(output_dir / f"{name}-state", at)
        doing[0] = None
        if accelerator.is_main_process and loss_log is not None:
            update_loss_plot(output_dir, args.output_name, validator is not None)
        if accelerator.is_main_process:
            if weights:
                uploader.upload(path)
            if with_state:
                uploader.upload(output_dir / f"{name}-state", state=True)
        return path

    def boundary() -> Boundary:
        return Boundary(replace(state), rng_states())

    def sample(epoch: int) -> None:
        if accelerator.is_main_process:
            sampler(transformer, epoch, state.global_step, accelerator)
        bar.unpause()  # the progress bar's rate counts training only

    validated_at = [None]

    def validation(epoch: int) -> None:
        result = validator.run(transformer, version, args, accelerator, device, compute_dtype, state.global_step,
                               epoch)
        validated_at[0] = state.global_step
        postfix["val"] = f"{result['mean']:.4f}"
        bar.set_postfix(postfix)
        bar.unpause()

    trainable.train()
    trace = Trace(accelerator.process_index)
    losses: list[float] = []
    # the progress bar's average covers the whole run, also across a resume (from the loss log)
    step_losses = [float(r["loss"]) for r in loss_log.rows()] if (loss_log is not None and args.resume) else []
    bar = tqdm(total=total_steps, initial=state.global_step, desc="steps", disable=not accelerator.is_local_main_process)
    postfix: dict[str, str] = {}  # the bar's figures: loss, avg, lr, and the last validation mean
    last = boundary()
    updating = False  # True while weights change (optimizer step, fused backward): no consistent state to save
    stop = StopRequest()
    try:
        with stop:
            if sampler and args.sample_at_first and not args.resume:
                sample(0)
            if validator and args.validate_at_start and not args.resume:
                validation(0)
            start_batch = state.batch
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
                                                  sample_generators(args.seed, batch["sample_keys"]), device,
                                                  compute_dtype)
                    if not torch.isfinite(loss):
                        raise UserError(f"loss is {loss.item()} at step {state.global_step + 1} (epoch {epoch + 1}); "
                                        "lower --learning_rate, use --mixed_precision bf16 or check the caches")
                    updating = mode.fused is not None  # the fused backward pass steps parameters as it goes
                    accelerator.backward(loss / ga)
                    trace.record([dataset.items[j].latent_path.name for j in batch["items"]])
                    micro += 1
                    losses.append(loss.item())
                    if micro % ga and not is_last:
                        updating = False
                        continue
                    updating = True
                    if mode.fused is None:  # the fused backward pass has already stepped every parameter
                        if not mode.sharded:  # FSDP has reduced the gradients already
                            sync_gradients(accelerator, params)
                        if args.max_grad_norm:
                            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step_logs = mode.after_step(args, device)
                    state.global_step += 1
                    state.batch = micro
                    updating = False
                    last = boundary()
                    step_loss = mean_over_processes(sum(losses[-ga:]) / len(losses[-ga:]), accelerator)
                    step_losses.append(step_loss)
                    lr = scheduler.get_last_lr()[0]
                    bar.update(1)
                    postfix.update(loss=f"{step_loss:.4f}", avg=f"{sum(step_losses) / len(step_losses):.4f}",
                                   lr=f"{lr:.2e}")
                    bar.set_postfix(postfix)
                    accelerator.log({"loss/current": step_loss, "lr": lr, "epoch": epoch + 1, **step_logs},
                                    step=state.global_step)
                    if loss_log is not None:
                        loss_log.append({"step": state.global_step, "epoch": epoch + 1, "loss": f"{step_loss:.6f}",
                                         "lr": f"{lr:.6g}"})
                    after_optimizer_step(state.global_step)
                    if args.save_every_n_steps and state.global_step % args.save_every_n_steps == 0 \
                            and state.global_step < total_steps:
                        save(checkpoint_name(args.output_name, step=state.global_step), last, args.save_state)
                        if accelerator.is_main_process:
                            prune_old(args, output_dir, "step", state.global_step + 1)
                    if stop.agreed(accelerator.num_processes, device):
                        raise Stopped
                    if sampler and args.sample_every_n_steps and state.global_step % args.sample_every_n_steps == 0:
                        sample(epoch + 1)
                    if validator and args.validate_every_n_steps and \
                            state.global_step % args.validate_every_n_steps == 0:
                        validation(epoch + 1)
                    if state.global_step >= total_steps:
                        break
                start_batch = 0
                if state.global_step >= total_steps and micro < len(dataset):
                    break
                state.epoch, state.batch = epoch + 1, 0
                last = boundary()
                if args.save_every_n_epochs and (epoch + 1) % args.save_every_n_epochs == 0 and epoch + 1 < num_epochs:
                    save(checkpoint_name(args.output_name, epoch=epoch + 1), last, args.save_state)
                    if accelerator.is_main_process:
                        prune_old(args, output_dir, "epoch", epoch + 2)
                if stop.agreed(accelerator.num_processes, device):
                    raise Stopped
                if sampler and args.sample_every_n_epochs and (epoch + 1) % args.sample_every_n_epochs == 0:
                    sample(epoch + 1)
                if validator and validated_at[0] != state.global_step and (
                        (epoch + 1) % args.validate_every_n_epochs == 0 if args.validate_every_n_epochs
                        else not args.validate_every_n_steps):
                    validation(epoch + 1)
        if validator and validated_at[0] != state.global_step:  # the trained model's figure
            validation(epoch_number(state))
        bar.close()
        trace.write(trainable)
        last = boundary()
        with_state = args.save_state or args.save_state_on_train_end
        final = save(args.output_name, last, with_state)
        if accelerator.is_main_process and state.batch == 0 and state.epoch > 0:
            # the run ended at an epoch's end: keep that epoch under its number too (hard links), so continuing to
            # more epochs in this folder never replaces it
            name = checkpoint_name(args.output_name, epoch=state.epoch)
            keep_copy(final, output_dir / (name + mode.extension()))
            logger.info("also kept as %s (a hard link: no extra disk), so that continuing this run to more epochs "
                        "in this folder keeps epoch %d's result", name + mode.extension(), state.epoch)
            if with_state:
                keep_copy(output_dir / f"{args.output_name}-state", output_dir / f"{name}-state")
    except BaseException as e:  # noqa: BLE001 - every way out of the loop keeps the progress made
        bar.close()
        _stop_and_save(e, stop, args, mode, accelerator, last, updating, start_step, save, doing[0])
        raise AssertionError("unreachable")  # _stop_and_save always exits
    uploader.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"final": final, "losses": losses, "steps": state.global_step,
            "loss_log": loss_log_path(output_dir, args.output_name), "logging_dir": Path(accelerator.logging_dir),
            "sample_dir": output_dir / "sample",
            "validation": validator.history if validator else [],
            "validation_log": validation_log_path(output_dir, args.output_name) if validator else None}


def make_validator(args, items: list, is_main: bool, version: ModelVersion) -> Validator | None:
    """The validation set (held-out items sorted by name, at most --max_validation_steps), its sigmas and log."""
    if not items:
        if args.validate_every_n_steps or args.validate_every_n_epochs or args.validate_at_start:
            logger.warning("validation options given, but no item is held out: set validation_split or validation = "
                           "true in the dataset config, or --validation_split")
        return None
    items = sorted(items, key=lambda it: str(it.latent_path))[:args.max_validation_steps]
    latent_shape = items[0].layout[0]
    sigmas = args.validation_sigmas or default_sigmas(args, version.image_tokens(latent_shape[-2], latent_shape[-1]))
    log = None
    if is_main:
        log = LossLog(validation_log_path(args.output_dir, args.output_name), Validator.columns(sigmas))
        log.start(read_state_meta(args.resume)["global_step"] if args.resume else None)
    validator = Validator(items, sigmas, validation_seed(args), log)
    if args.resume:
        validator.resume()
    logger.info("validation: %s x sigmas %s per pass", plural(len(items), "item"), ", ".join(f"{s:g}" for s in sigmas))
    return validator


def _stop_and_save(error: BaseException, stop: StopRequest, args, mode: Mode, accelerator, last: Boundary,
                   updating: bool, start_step: int, save, doing: str | None = None) -> None:
    """Leave the loop with the progress kept: the state of the last finished step goes to
    <output_name>-interrupted-state (plus a usable weights file), then exactly one line says what stopped the run and
    what was saved; exits non-zero. Errors of the environment (disk full, file size limit, read-only folder) are that
    line alone; other exceptions (bugs) also log their traceback first."""
    stopped = isinstance(error, Stopped)
    interrupted = stopped or isinstance(error, KeyboardInterrupt)
    name = checkpoint_name(args.output_name, interrupted=True)
    folder = Path(args.output_dir) / f"{name}-state"
    weights_path = folder.parent / (name + mode.extension())
    step = last.state.global_step
    what = doing or f"training at step {step + 1}"
    if not stopped and not isinstance(error, (UserError, KeyboardInterrupt)) and not is_environment_error(error):
        logger.error("%s failed", what, exc_info=error)
    why_not = None
    if step <= start_step:
        why_not = "no step finished in this run"
    elif updating:
        why_not = "the weights were being updated when it stopped"
    elif mode.sharded and not stopped:
        why_not = "a sharded state can only be saved by all processes together"
    saved_weights = saved_state = False
    if why_not is None:
        try:
            if mode.weights_on_interrupt:
                save(name, last, with_state=False, weights=True)
                saved_weights = True
            save(name, last, with_state=True, weights=False)
            saved_state = True
        except BaseException as e:  # noqa: BLE001 - the original error is what the user must see
            why_not = f"saving it failed too: {describe_error(e)}"
    if saved_state:
        where = (f"the state after step {step} is saved in {folder}; continue with --resume {folder}"
                 + (f" (weights: {weights_path})" if mode.weights_on_interrupt else ""))
    elif saved_weights:
        where = (f"the weights after step {step} are saved in {weights_path}, but not the state ({why_not}); continue "
                 f"from them with --network_weights {weights_path}")
    else:
        where = f"nothing was saved ({why_not}); resume from the last periodic -state folder, if any"
    try:
        accelerator.end_training()
    except Exception as e:  # noqa: BLE001 - closing the trackers must not hide what happened
        logger.debug("closing the trackers failed: %s", e)
    if interrupted:
        if accelerator.is_main_process or saved_state:
            print(f"interrupted at step {step}: {where}", file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code() if stop.signum else 130) from None
    if isinstance(error, UserError):
        raise UserError(f"{error} ({where})") from None
    print(f"error: {what} failed: {describe_error(error)}; {where}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def prune_old(args, output_dir: Path, kind: str, upto: int) -> None:
    """--save_last_n_steps / --save_last_n_epochs (weights) and their _state variants (states; default: the same)."""
    if kind == "step":
        n_weights, n_states, unit = args.save_last_n_steps, args.save_last_n_steps_state, 1
    else:  # epochs: the last n saved ones
        n_weights, n_states, unit = args.save_last_n_epochs, args.save_last_n_epochs_state, args.save_every_n_epochs or 1
    n_states = n_states or n_weights
    if n_weights:
        prune(output_dir, args.output_name, kind, upto - n_weights * unit, "weights")
    if n_states:
        prune(output_dir, args.output_name, kind, upto - n_states * unit, "states")


class Trace:
    """With MUSUBI_TUNER_TRACE_DIR set, each process writes the items it trained on and a checksum of its trainable
    weights (used by the multi-process tests; costs nothing otherwise)."""

    def __init__(self, rank: int):
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


def mean_over_processes(value: float, accelerator) -> float:
    """The step loss of the whole global batch (what one process with all of it would log)."""
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    dist.all_reduce(t)
    return t.item() / accelerator.num_processes


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
