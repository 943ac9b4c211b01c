"""Metadata of saved weights, in the names musubi-tuner and the usual LoRA managers read: kohya's `ss_*` training
settings, the SAI model spec (`modelspec.*`), and (added when a LoRA is written) the `sshs_*` model hashes."""

from __future__ import annotations

import datetime
import json
import random
import time
from pathlib import Path

from ..models.version import ModelVersion

MINIMUM_KEYS = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


def training_metadata(args, version: ModelVersion, mode, cached, configs, total_steps: int, steps_per_epoch: int,
                      num_epochs: int) -> dict[str, str]:
    """The ss_* settings of a run (strings, as kohya's trainers write them)."""
    datasets = []
    for cfg in configs:
        d = {"resolution": list(cfg.resolution), "caption_extension": cfg.caption_extension,
             "batch_size_per_device": cfg.batch_size, "num_repeats": cfg.num_repeats,
             "enable_bucket": cfg.enable_bucket, "bucket_no_upscale": cfg.bucket_no_upscale,
             "num_images": sum(1 for c in cached if c.dataset == cfg.index)}
        for key in ("image_directory", "image_jsonl_file", "control_directory", "control_resolution"):
            if getattr(cfg, key):
                d[key] = getattr(cfg, key) if not isinstance(getattr(cfg, key), tuple) else list(getattr(cfg, key))
        if cfg.no_resize_control:
            d["no_resize_control"] = True
        if cfg.multiple_target:
            d["multiple_target"] = True
        datasets.append(d)
    md = {
        "ss_session_id": random.randint(0, 2**32), "ss_training_started_at": int(time.time()),
        "ss_output_name": args.output_name, "ss_learning_rate": args.learning_rate,
        "ss_num_train_items": sum(c.num_repeats for c in cached), "ss_num_batches_per_epoch": steps_per_epoch,
        "ss_num_epochs": num_epochs, "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_checkpointing_cpu_offload": args.gradient_checkpointing_cpu_offload,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps, "ss_max_train_steps": total_steps,
        "ss_max_train_epochs": args.max_train_epochs, "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler_type or args.lr_scheduler,
        "ss_base_model_version": version.architecture, "ss_model_version": version.name,
        "ss_training_mode": mode.name, "ss_mixed_precision": args.mixed_precision, "ss_seed": args.seed,
        "ss_optimizer": args.optimizer_type + (f"({','.join(args.optimizer_args)})" if args.optimizer_args else ""),
        "ss_max_grad_norm": args.max_grad_norm, "ss_fp8_base": bool(args.fp8_base),
        "ss_fp8_scaled": bool(args.fp8_scaled), "ss_full_fp16": False, "ss_full_bf16": bool(getattr(args, "full_bf16",
                                                                                                       False)),
        "ss_weighting_scheme": args.weighting_scheme, "ss_logit_mean": args.logit_mean, "ss_logit_std": args.logit_std,
        "ss_mode_scale": args.mode_scale, "ss_guidance_scale": 1.0, "ss_timestep_sampling": args.timestep_sampling,
        "ss_sigmoid_scale": args.sigmoid_scale, "ss_discrete_flow_shift": args.discrete_flow_shift,
        "ss_min_timestep": args.min_timestep, "ss_max_timestep": args.max_timestep,
        "ss_remove_first_image_from_target": bool(args.remove_first_image_from_target),
        "ss_datasets": json.dumps(datasets), "ss_num_train_images": len(cached),
        "ss_sd_model_name": Path(args.dit).name, **({"ss_vae_name": Path(args.vae).name} if args.vae else {}),
        "ss_training_comment": args.training_comment,
        **getattr(mode, "metadata", {}),
    }
    return {k: str(v) for k, v in md.items()}


def modelspec(args, version: ModelVersion, is_lora: bool, resolution: tuple[int, int] | None) -> dict[str, str]:
    """SAI model spec 1.0.0 fields (title, architecture, date, resolution, ... and the --metadata_* options)."""
    arch = args.metadata_arch or version.modelspec_arch
    if is_lora:
        arch += "/lora"
    md = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
          "modelspec.implementation": version.implementation,
          "modelspec.title": args.metadata_title or args.output_name,
          "modelspec.date": datetime.datetime.fromtimestamp(int(time.time())).isoformat()}
    reso = args.metadata_reso
    if reso:
        parts = [int(x) for x in str(reso).replace("x", ",").split(",") if x.strip()]
        resolution = (parts[0], parts[-1])
    if resolution:
        md["modelspec.resolution"] = f"{resolution[0]}x{resolution[1]}"
    for key in ("author", "description", "license", "tags"):
        value = getattr(args, f"metadata_{key}")
        if value is not None:
            md[f"modelspec.{key}"] = value
    if args.min_timestep > 0 or args.max_timestep < 1000:
        md["modelspec.timestep_range"] = f"{int(args.min_timestep)},{int(args.max_timestep)}"
    return md


def weights_metadata(base: dict[str, str], args, steps: int, epoch: int, spec: dict[str, str]) -> dict[str, str]:
    """What one saved file carries: all ss_* settings (only the minimum with --no_metadata), its step and epoch, and
    the model spec."""
    md = {**base, "ss_training_finished_at": str(time.time()), "ss_steps": str(steps), "ss_epoch": str(epoch)}
    if args.no_metadata:
        md = {k: v for k, v in md.items() if k in MINIMUM_KEYS}
    return {**md, **spec}
