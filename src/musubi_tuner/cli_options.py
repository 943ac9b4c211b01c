"""Command-line option groups shared by the five qwen_image_* scripts: each option is defined once, here."""

from __future__ import annotations

import argparse

from .errors import UserError
from .qwen_image.versions import VERSIONS, ModelVersion, resolve_version


def add_model_args(p: argparse.ArgumentParser, dit: bool = True, vae: bool = True, text_encoder: bool = True) -> None:
    g = p.add_argument_group("models")
    if dit:
        g.add_argument("--dit", help="DiT weights: diffusers file/folder/first shard or ComfyUI single file (bf16)")
    if vae:
        g.add_argument("--vae", help="VAE weights: diffusers or ComfyUI/Wan layout (the layered VAE for layered)")
    if text_encoder:
        g.add_argument("--text_encoder", help="Qwen2.5-VL weights: ComfyUI single file or transformers folder")
        g.add_argument("--tokenizer", help="folder with the Qwen tokenizer/processor files (default: beside the text "
                                           "encoder, else the Hugging Face hub)")
    add_version_args(p)


def add_version_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model version")
    g.add_argument("--model_version", choices=list(VERSIONS), default=None,
                   help="original (default), edit, edit-2509, edit-2511, layered")
    g.add_argument("--edit", action="store_true", help="same as --model_version edit (backward compatibility)")
    g.add_argument("--edit_plus", action="store_true", help="same as --model_version edit-2509 (backward compatibility)")


def version_from_args(args: argparse.Namespace) -> ModelVersion:
    return resolve_version(args.model_version, args.edit, args.edit_plus)


def add_memory_args(p: argparse.ArgumentParser, training: bool = False) -> None:
    g = p.add_argument_group("memory")
    if training:
        g.add_argument("--fp8_base", action="store_true", help="keep DiT block Linear weights in float8_e4m3fn, "
                       "compute in bf16")
    g.add_argument("--fp8_scaled", action="store_true", help="quantise DiT block Linear weights to fp8 with "
                   "per-channel scales at load (better than plain --fp8_base)")
    g.add_argument("--fp8_vl", action="store_true", help="run the Qwen2.5-VL text encoder in fp8")
    g.add_argument("--blocks_to_swap", type=int, default=0, help="keep this many DiT blocks in CPU memory and "
                   "stream them in when used (training: also in backward)")
    g.add_argument("--disable_numpy_memmap", action="store_true",
                   help="read weight files with plain reads instead of memory mapping (more RAM, sometimes faster)")
    c = p.add_argument_group("torch.compile")
    c.add_argument("--compile", action="store_true", help="torch.compile each transformer block (hooks such as "
                   "block swap stay outside the compiled code)")
    c.add_argument("--compile_backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    c.add_argument("--compile_mode", default=None, choices=["default", "reduce-overhead", "max-autotune",
                                                             "max-autotune-no-cudagraphs"], help="torch.compile mode")
    c.add_argument("--compile_dynamic", action="store_true",
                   help="compile for dynamic shapes from the start (mixed bucket sizes recompile less)")
    c.add_argument("--compile_fullgraph", action="store_true", help="fail instead of falling back on graph breaks")
    c.add_argument("--compile_cache_size_limit", type=int, default=None,
                   help="torch._dynamo cache_size_limit (raise it when many bucket sizes cause recompiles)")


def add_vae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae_enable_tiling", action="store_true", help="encode/decode the VAE in tiles (large images)")


def require(args: argparse.Namespace, *names: str) -> None:
    missing = [n for n in names if not getattr(args, n, None)]
    if missing:
        raise UserError(f"missing required option(s): {', '.join('--' + n for n in missing)}")


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """Options of the two caching scripts."""
    g = p.add_argument_group("dataset / caching")
    g.add_argument("--dataset_config", help="dataset TOML")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--batch_size", type=int, default=1, help="items per model call")
    g.add_argument("--skip_existing", action="store_true", help="keep caches that are still fresh")
    g.add_argument("--keep_cache", action="store_true", help="do not delete orphaned cache files")


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Options shared by qwen_image_train_network.py (LoRA) and qwen_image_train.py (full finetune)."""
    from .training.optim import SCHEDULERS
    from .training.timesteps import METHODS, WEIGHTING

    add_model_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--dataset_config", help="dataset TOML (caches must exist: run the two caching scripts first)")
    d.add_argument("--max_data_loader_n_workers", type=int, default=2, help="DataLoader worker processes")
    d.add_argument("--persistent_data_loader_workers", action="store_true", help="keep workers alive between epochs")
    d.add_argument("--remove_first_image_from_target", action="store_true",
                   help="layered: train on the layer images only (the composite stays the condition)")
    a = p.add_argument_group("attention / precision")
    a.add_argument("--sdpa", action="store_true", help="PyTorch scaled dot product attention (default)")
    a.add_argument("--xformers", action="store_true", help="xformers attention")
    a.add_argument("--flash_attn", action="store_true", help="FlashAttention")
    a.add_argument("--sage_attn", action="store_true", help="SageAttention")
    a.add_argument("--split_attn", action="store_true", help="attention one sample at a time (less memory)")
    a.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="autocast precision")
    a.add_argument("--gradient_checkpointing", action="store_true", help="recompute block activations in backward")
    a.add_argument("--gradient_checkpointing_cpu_offload", action="store_true", help="keep block inputs on the CPU")
    add_memory_args(p, training=True)
    t = p.add_argument_group("timesteps / loss")
    t.add_argument("--timestep_sampling", choices=list(METHODS), default="shift", help="how t is drawn")
    t.add_argument("--discrete_flow_shift", type=float, default=2.2, help="shift S for shift / sigma sampling")
    t.add_argument("--weighting_scheme", choices=list(WEIGHTING), default="none", help="density / loss weighting")
    t.add_argument("--logit_mean", type=float, default=0.0)
    t.add_argument("--logit_std", type=float, default=1.0)
    t.add_argument("--mode_scale", type=float, default=1.29)
    t.add_argument("--sigmoid_scale", type=float, default=1.0)
    t.add_argument("--min_timestep", type=float, default=0.0, help="lowest t, in 0..1000")
    t.add_argument("--max_timestep", type=float, default=1000.0, help="highest t, in 0..1000")
    o = p.add_argument_group("optimizer / schedule")
    o.add_argument("--optimizer_type", default="adamw", help="adamw, adamw8bit, adafactor or module.Class")
    o.add_argument("--optimizer_args", nargs="*", default=[], help="key=value arguments of the optimizer")
    o.add_argument("--learning_rate", type=float, default=2e-6)
    o.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1)
    o.add_argument("--lr_scheduler", choices=list(SCHEDULERS), default="constant")
    o.add_argument("--lr_warmup_steps", type=float, default=0, help="warmup steps, or a fraction (< 1) of all steps")
    o.add_argument("--lr_scheduler_num_cycles", type=float, default=1.0, help="cosine_with_restarts cycles")
    o.add_argument("--lr_scheduler_power", type=float, default=1.0, help="polynomial power")
    o.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=0.0, help="floor of the schedule (x base lr)")
    r = p.add_argument_group("run length / saving / logging")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--max_train_epochs", type=int, default=None)
    r.add_argument("--max_train_steps", type=int, default=1600)
    r.add_argument("--save_every_n_epochs", type=int, default=None)
    r.add_argument("--save_every_n_steps", type=int, default=None)
    r.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last n epoch checkpoints")
    r.add_argument("--save_last_n_steps", type=int, default=None, help="keep step checkpoints of the last n steps")
    r.add_argument("--save_state", action="store_true", help="also save resumable training state at each save")
    r.add_argument("--save_state_on_train_end", action="store_true", help="save the state at the end")
    r.add_argument("--resume", help="state folder to resume from")
    r.add_argument("--output_dir", help="folder for checkpoints, samples and logs")
    r.add_argument("--output_name", default="qwen_image", help="checkpoint base name")
    r.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run with the same "
                   "--output_dir and --output_name (otherwise that is refused)")
    r.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None, help="dtype of saved weights")
    r.add_argument("--logging_dir", default=None, help="log folder (default: <output_dir>/logs)")
    r.add_argument("--log_with", choices=["tensorboard", "wandb", "all"], default="tensorboard")
    r.add_argument("--log_prefix", default="", help="prefix of the run name")
    s = p.add_argument_group("sampling during training")
    s.add_argument("--sample_prompts", help="prompt file (one per line: --w --h --d --s --l --n --fs --ci --f)")
    s.add_argument("--sample_every_n_epochs", type=int, default=None)
    s.add_argument("--sample_every_n_steps", type=int, default=None)
    s.add_argument("--sample_at_first", action="store_true", help="sample before training starts")
    s.add_argument("--device", default=None, help=argparse.SUPPRESS)
