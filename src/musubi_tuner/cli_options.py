"""Command-line option groups shared by the five qwen_image_* scripts: each option is defined once, here."""

from __future__ import annotations

import argparse

from .errors import UserError
from .fileio import DTYPE_NAMES
from .models.registry import VERSIONS, resolve_version
from .models.version import ModelVersion


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where the help text does not speak of the default itself and X says something."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, [], "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class Inert(argparse.Action):
    """A musubi-tuner option that has no effect on Qwen-Image (there either): accepted so that its command lines
    run, with a warning when given."""

    def __init__(self, option_strings, dest, why: str = "", **kw):
        self.why = why
        if kw.get("type") is None and kw.get("nargs") is None:
            kw["nargs"] = 0
        super().__init__(option_strings, dest, default=None, help=f"musubi-tuner option, no effect: {why}", **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        import logging

        logging.getLogger(__name__).warning("%s has no effect here: %s", option_string, self.why)
        setattr(namespace, self.dest, True if values == [] else values)


def add_num_layers_arg(g) -> None:
    g.add_argument("--num_layers", type=int, default=None, help="number of DiT blocks the --dit file must have "
                   "(musubi-tuner's option; the count is read from the file, so this only checks it)")


def add_model_args(p: argparse.ArgumentParser, dit: bool = True, vae: bool = True, text_encoder: bool = True) -> None:
    g = p.add_argument_group("models")
    if dit:
        g.add_argument("--dit", help="DiT weights: diffusers file/folder/first shard or ComfyUI single file (bf16)")
    if vae:
        g.add_argument("--vae", help="VAE weights: diffusers or ComfyUI/Wan layout (the layered VAE for layered)")
    if text_encoder:
        g.add_argument("--text_encoder", help="Qwen2.5-VL weights (2.1: Qwen3-VL): ComfyUI single file or "
                                              "transformers folder")
        g.add_argument("--tokenizer", help="folder with the Qwen tokenizer/processor files (default: beside the text "
                                           "encoder, else the Hugging Face hub)")
    add_version_args(p)


def add_version_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model version")
    g.add_argument("--model_version", choices=list(VERSIONS), default=None,
                   help="original (default), edit, edit-2509, edit-2511, layered, 2.1 (Qwen-Image-2.1)")
    g.add_argument("--edit", action="store_true", help="same as --model_version edit (backward compatibility)")
    g.add_argument("--edit_plus", action="store_true", help="same as --model_version edit-2509 (backward compatibility)")


def version_from_args(args: argparse.Namespace) -> ModelVersion:
    return resolve_version(args.model_version, args.edit, args.edit_plus)


def add_caption_args(g) -> None:
    """Automatic captions of layered inputs without a prompt (generation and sampling during training)."""
    g.add_argument("--automatic_prompt_lang_for_layered", choices=["en", "cn", "zh"], default=None,
                   help="layered: language of the automatic caption made when a prompt is left empty (the text encoder "
                        "describes the image to decompose, as diffusers' QwenImageLayeredPipeline does; default: cn, "
                        "the pipeline's default; needs a text encoder with its lm_head)")


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
    g.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help="swapped blocks live in pinned "
                   "CPU memory (always so here: accepted for musubi-tuner command lines)")
    if training:
        g.add_argument("--block_swap_h2d_only", action="store_true", help="frozen swapped weights are only copied host "
                       "to device, never back (always so here: accepted for musubi-tuner command lines)")
        g.add_argument("--block_swap_ring_size", type=int, default=2, choices=[2], help="device buffers for streamed "
                       "blocks: 2, one computing and one arriving (the only layout here)")
    g.add_argument("--disable_numpy_memmap", action="store_true",
                   help="read weight files with plain reads instead of memory mapping (more RAM, sometimes faster)")
    c = p.add_argument_group("torch.compile")
    c.add_argument("--compile", action="store_true", help="torch.compile each transformer block (hooks such as "
                   "block swap stay outside the compiled code)")
    c.add_argument("--compile_backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    c.add_argument("--compile_mode", default=None, choices=["default", "reduce-overhead", "max-autotune",
                                                             "max-autotune-no-cudagraphs"], help="torch.compile mode")
    c.add_argument("--compile_dynamic", nargs="?", const="true", default=None, type=str.lower,
                   choices=["true", "false", "auto"], help="dynamic shapes for torch.compile: true (mixed bucket sizes "
                   "recompile less), false, or auto (torch decides; the default). A bare --compile_dynamic means true")
    c.add_argument("--compile_fullgraph", action="store_true", help="fail instead of falling back on graph breaks")
    c.add_argument("--compile_cache_size_limit", type=int, default=None,
                   help="torch._dynamo cache_size_limit (raise it when many bucket sizes cause recompiles)")
    if training:
        c.add_argument("--dynamo_backend", default="NO", type=str.upper, help="musubi-tuner's accelerate dynamo "
                       "option: a backend other than NO means --compile with --compile_backend set to it (lower case)")
        c.add_argument("--dynamo_mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                       help="with --dynamo_backend: --compile_mode")
        c.add_argument("--dynamo_fullgraph", action="store_true", help="with --dynamo_backend: --compile_fullgraph")
        c.add_argument("--dynamo_dynamic", action="store_true", help="with --dynamo_backend: --compile_dynamic true")


def add_vae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae_enable_tiling", action="store_true", help="encode/decode the VAE in tiles (large images)")


def add_latent_cache_compat_args(p: argparse.ArgumentParser) -> None:
    """Options musubi-tuner's qwen_image_cache_latents.py accepts from its shared (HunyuanVideo) VAE parser."""
    g = p.add_argument_group("musubi-tuner options")
    g.add_argument("--vae_tiling", dest="vae_enable_tiling", action="store_true", help="same as --vae_enable_tiling")
    g.add_argument("--disable_cudnn_backend", action="store_true", help="turn cuDNN off (may help on AMD GPUs)")
    g.add_argument("--vae_dtype", default=None, help="refused, as in musubi-tuner: the Qwen-Image VAE runs in the "
                   "compute dtype")
    for name in ("--vae_chunk_size", "--vae_spatial_tile_sample_min_size"):
        g.add_argument(name, type=int, action=Inert, why="HunyuanVideo VAE only")
    for name, kind in (("--console_width", int), ("--console_back", str), ("--console_num_images", int)):
        g.add_argument(name, type=kind, action=Inert, why="--debug_mode console prints sizes and buckets here, not "
                       "pictures")


def require(args: argparse.Namespace, *names: str) -> None:
    missing = [n for n in names if not getattr(args, n, None)]
    if missing:
        raise UserError(f"missing required option(s): {', '.join('--' + n for n in missing)}")


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """Options of the two caching scripts."""
    g = p.add_argument_group("dataset / caching")
    g.add_argument("--dataset_config", help="dataset TOML or JSON")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--batch_size", type=int, default=1, help="items per model call")
    g.add_argument("--skip_existing", action="store_true", help="keep caches that are still fresh")
    g.add_argument("--keep_cache", action="store_true", help="do not delete orphaned cache files (files this tool "
                   "did not write are never deleted)")
    g.add_argument("--num_workers", type=int, default=None, help="threads that load and resize images ahead of the "
                   "model (default: 1)")


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Options shared by qwen_image_train_network.py (LoRA) and qwen_image_train.py (full finetune)."""
    from .training.optim import SCHEDULERS
    from .training.timesteps import METHODS, WEIGHTING

    add_config_file_arg(p)
    add_model_args(p)
    add_num_layers_arg(p)
    d = p.add_argument_group("data")
    d.add_argument("--dataset_config", help="dataset TOML or JSON (caches must exist: run the two caching scripts first)")
    d.add_argument("--max_data_loader_n_workers", type=int, default=2, help="DataLoader worker processes")
    d.add_argument("--persistent_data_loader_workers", action="store_true", help="keep workers alive between epochs")
    d.add_argument("--base_weights", nargs="*", help="LoRA / LoHa / LoKr files merged into the DiT as it loads")
    d.add_argument("--base_weights_multiplier", type=float, nargs="*", help="multipliers of --base_weights")
    d.add_argument("--training_comment", default=None, help="stored in the metadata of saved weights")
    d.add_argument("--remove_first_image_from_target", action="store_true",
                   help="layered: train on the layer images only (the composite stays the condition)")
    a = p.add_argument_group("attention / precision")
    a.add_argument("--sdpa", action="store_true", help="PyTorch scaled dot product attention (default)")
    a.add_argument("--xformers", action="store_true", help="xformers attention")
    a.add_argument("--flash_attn", action="store_true", help="FlashAttention")
    a.add_argument("--sage_attn", action="store_true", help="SageAttention")
    a.add_argument("--flash3", action="store_true", help="FlashAttention 3: cannot be used with Qwen-Image (refused; "
                   "accepted so that musubi-tuner commands name the problem)")
    a.add_argument("--split_attn", action="store_true", help="attention one sample at a time (less memory)")
    a.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="autocast precision")
    a.add_argument("--gradient_checkpointing", action="store_true", help="recompute block activations in backward")
    a.add_argument("--gradient_checkpointing_cpu_offload", action="store_true", help="keep block inputs on the CPU")
    a.add_argument("--vae_dtype", choices=sorted(DTYPE_NAMES), default=None, help="VAE dtype for sample images "
                   "(default: the training dtype on a GPU, float32 on the CPU)")
    a.add_argument("--img_in_txt_in_offloading", action=Inert, why="HunyuanVideo only")
    a.add_argument("--guidance_scale", type=float, action=Inert, why="embedded guidance, HunyuanVideo only")
    a.add_argument("--cuda_allow_tf32", action="store_true", help="allow TF32 matmuls and convolutions (Ampere+)")
    a.add_argument("--cuda_cudnn_benchmark", action="store_true", help="let cuDNN pick the fastest algorithms")
    a.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    add_memory_args(p, training=True)
    t = p.add_argument_group("timesteps / loss")
    t.add_argument("--timestep_sampling", choices=list(METHODS), default="shift", help="how t is drawn (shift with "
                   "--discrete_flow_shift 2.2 as musubi-tuner's Qwen-Image guide recommends; musubi-tuner's parser default is sigma)")
    t.add_argument("--discrete_flow_shift", type=float, default=2.2, help="shift S for shift / sigma sampling")
    t.add_argument("--weighting_scheme", choices=list(WEIGHTING), default="none", help="density / loss weighting")
    t.add_argument("--logit_mean", type=float, default=0.0, help="mean of logsnr / logit_normal")
    t.add_argument("--logit_std", type=float, default=1.0, help="std of logsnr / logit_normal")
    t.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode weighting scheme")
    t.add_argument("--sigmoid_scale", type=float, default=1.0, help="scale inside the sigmoid (sigmoid/shift sampling)")
    t.add_argument("--min_timestep", type=float, default=0.0, help="lowest t, in 0..1000")
    t.add_argument("--max_timestep", type=float, default=1000.0, help="highest t, in 0..1000")
    t.add_argument("--preserve_distribution_shape", action="store_true", help="keep t inside min/max timestep by "
                   "rejection sampling (the distribution keeps its shape) instead of rescaling [0, 1] onto the range")
    t.add_argument("--num_timestep_buckets", type=int, default=None, help="stratified sampling: each run of N "
                   "samples draws its uniform values from N equal strata (2 or more; not for sigma)")
    t.add_argument("--show_timesteps", choices=["image", "console"], default=None,
                   help="show the distribution of t these options give (console text or timesteps.png in "
                        "--output_dir) and exit without training")
    o = p.add_argument_group("optimizer / schedule")
    o.add_argument("--optimizer_type", default="adamw", help="adamw, adamw8bit, adafactor, a torch.optim class or "
                   "module.Class")
    o.add_argument("--optimizer_args", nargs="*", default=[], help="key=value arguments of the optimizer (Adafactor "
                   "without them: relative_step=True, its own schedule, as musubi-tuner)")
    o.add_argument("--learning_rate", type=float, default=2e-6)
    o.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1)
    o.add_argument("--lr_scheduler", choices=list(SCHEDULERS), default="constant")
    o.add_argument("--lr_warmup_steps", type=float, default=0, help="warmup steps, or a fraction (< 1) of all steps")
    o.add_argument("--lr_decay_steps", type=float, default=0, help="warmup_stable_decay: decay steps, or a fraction")
    o.add_argument("--lr_scheduler_num_cycles", type=float, default=1.0, help="cosine_with_restarts cycles")
    o.add_argument("--lr_scheduler_power", type=float, default=1.0, help="polynomial power")
    o.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None, help="floor of the schedule (x base lr); "
                   "cosine_with_min_lr and rex (default 0.01) use it as their minimum")
    o.add_argument("--lr_scheduler_timescale", type=int, default=None, help="inverse_sqrt timescale (default: warmup)")
    o.add_argument("--lr_scheduler_type", default="", help="any scheduler class (torch.optim.lr_scheduler name or "
                   "module.Class), built with --lr_scheduler_args; replaces --lr_scheduler")
    o.add_argument("--lr_scheduler_args", nargs="*", default=None, help="key=value arguments of the scheduler")
    o.add_argument("--scale_weight_norms", type=float, default=None, help="LoRA: after each step, scale down modules "
                   "whose weight delta norm exceeds this (max-norm regularisation; 1 is a good start)")
    r = p.add_argument_group("run length / saving / logging")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--max_train_epochs", type=int, default=None)
    r.add_argument("--max_train_steps", type=int, default=1600)
    r.add_argument("--save_every_n_epochs", type=int, default=None)
    r.add_argument("--save_every_n_steps", type=int, default=None)
    r.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last n epoch checkpoints")
    r.add_argument("--save_last_n_steps", type=int, default=None, help="keep step checkpoints of the last n steps")
    r.add_argument("--save_last_n_epochs_state", type=int, default=None,
                   help="keep only the last n epoch states (default: as --save_last_n_epochs)")
    r.add_argument("--save_last_n_steps_state", type=int, default=None,
                   help="keep step states of the last n steps (default: as --save_last_n_steps)")
    r.add_argument("--save_state", action="store_true", help="also save resumable training state at each save")
    r.add_argument("--save_state_on_train_end", action="store_true", help="save the state at the end")
    r.add_argument("--resume", help="state folder to resume from")
    r.add_argument("--output_dir", help="folder for checkpoints, samples and logs")
    r.add_argument("--output_name", default="qwen_image", help="checkpoint base name")
    r.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run with the same "
                   "--output_dir and --output_name (otherwise that is refused)")
    r.add_argument("--save_precision", choices=["float", "fp32", "fp16", "bf16"], default=None,
                   help="dtype of saved weights (default: as trained)")
    r.add_argument("--no_metadata", action="store_true", help="save weights without training metadata")
    for field, what in (("title", "title (default: --output_name)"), ("author", "author"),
                        ("description", "description"), ("license", "license"), ("tags", "tags, comma separated"),
                        ("reso", "resolution, e.g. 1024,1024 (default: the dataset's)"),
                        ("arch", "architecture (default: by model version)")):
        r.add_argument(f"--metadata_{field}", default=None, help=f"model card {what} (modelspec.* metadata)")
    r.add_argument("--logging_dir", default=None, help="log folder (default: <output_dir>/logs)")
    r.add_argument("--log_with", choices=["tensorboard", "wandb", "all"], default="tensorboard",
                   help="trackers for loss, learning rate, validation and sample images (default tensorboard, in "
                   "--logging_dir: watch with `tensorboard --logdir <output_dir>/logs`); the loss is also in "
                   "<output_name>_loss_log.csv and drawn in <output_name>_loss.png at each save")
    r.add_argument("--log_prefix", default="", help="prefix of the run name")
    r.add_argument("--log_tracker_name", default=None, help="tracker project name (default: network or finetune)")
    r.add_argument("--wandb_run_name", default=None, help="name of the wandb run")
    r.add_argument("--log_config", action="store_true", help="log the options to the trackers and the console")
    r.add_argument("--log_tracker_config", default=None, help="TOML file of tracker init options, one table per "
                   "tracker (e.g. [wandb] entity = ..., [tensorboard] flush_secs = 30), as in musubi-tuner")
    r.add_argument("--wandb_api_key", default=None, help="log in to wandb with this key before training")
    m = p.add_argument_group("multiple processes")
    m.add_argument("--ddp_timeout", type=int, default=None, help="timeout of collective operations, minutes")
    m.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                   help="accepted for musubi-tuner command lines; gradients are all-reduced without DDP here")
    m.add_argument("--ddp_static_graph", action="store_true",
                   help="accepted for musubi-tuner command lines; gradients are all-reduced without DDP here")
    add_hub_args(p)
    s = p.add_argument_group("sampling during training")
    s.add_argument("--sample_prompts", help="prompt file (.txt lines with --w --h --d --s --l --n --fs --ci --f, or "
                   "musubi-tuner's .toml / .json)")
    s.add_argument("--sample_every_n_epochs", type=int, default=None)
    s.add_argument("--sample_every_n_steps", type=int, default=None)
    s.add_argument("--sample_at_first", action="store_true", help="sample before training starts")
    add_caption_args(s)
    v = p.add_argument_group(
        "validation loss", "The training loss on held-out items at fixed sigmas with fixed noise. A pass over N items "
        "and S sigmas costs N x S forward passes (N batches of S). Held-out items: a dataset's `validation = true`, "
        "its `validation_split`, else --validation_split; they are cached like the others and never trained on.")
    v.add_argument("--validation_split", type=float, default=0.0,
                   help="hold out this fraction of each dataset's items (datasets' own validation_split wins)")
    v.add_argument("--validation_seed", type=int, default=None,
                   help="seed of the split and of the validation noise (default: --seed)")
    v.add_argument("--validate_every_n_steps", type=int, default=None, help="a validation pass every n steps")
    v.add_argument("--validate_every_n_epochs", type=int, default=None,
                   help="a pass every n epochs (default: every epoch, when there are held-out items)")
    v.add_argument("--validate_at_start", action="store_true", help="a pass before the first step")
    v.add_argument("--max_validation_steps", type=int, default=None, help="at most this many held-out items per pass")
    v.add_argument("--validation_sigmas", type=float, nargs="+", default=None,
                   help="sigmas (t / 1000, in (0, 1]) to validate at (default: the 10/30/50/70/90 %% quantiles of "
                        "the timestep distribution training uses)")


def add_hub_args(p: argparse.ArgumentParser) -> None:
    """musubi-tuner's Hugging Face Hub options of training (see training/hub.py)."""
    g = p.add_argument_group("Hugging Face Hub")
    g.add_argument("--huggingface_repo_id", default=None, help="upload every saved checkpoint to this repository "
                   "(user/name; created, private unless --huggingface_repo_visibility public, when it does not exist)")
    g.add_argument("--huggingface_repo_type", default="model", choices=["model", "dataset", "space"],
                   help="repository type")
    g.add_argument("--huggingface_path_in_repo", default=None, help="folder in the repository (default: its root)")
    g.add_argument("--huggingface_token", default=None, help="access token (default: the logged-in user's)")
    g.add_argument("--huggingface_repo_visibility", default=None, choices=["public", "private"],
                   help="visibility of a repository created for the upload (default: private)")
    g.add_argument("--save_state_to_huggingface", action="store_true", help="also upload the state folders")
    g.add_argument("--resume_from_huggingface", action="store_true", help="--resume names a state in a Hub "
                   "repository: REPO_ID/PATH[:REVISION[:REPO_TYPE]]")
    g.add_argument("--async_upload", action="store_true", help="upload in the background while training goes on "
                   "(the run waits for the uploads at its end)")


def add_config_file_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config_file", default=None, help="TOML file of options (musubi-tuner's format: long option names "
                   "without dashes, at top level or in any table; `.toml` is appended when missing); options given on "
                   "the command line win")


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args with --config_file: the file's values become defaults, so the command line overrides them."""
    args = parser.parse_args(argv)
    if getattr(args, "config_file", None):
        values = read_config_file(args.config_file, parser)
        args = parser.parse_args(argv, namespace=argparse.Namespace(**values))
    check_finite(parser, args)
    from .models.locate import resolve_args

    version = resolve_version(args.model_version, getattr(args, "edit", False), getattr(args, "edit_plus", False)) \
        if hasattr(args, "model_version") else None
    resolve_args(args, version)
    return apply_dynamo_options(args)


def check_finite(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """No number option of any script takes nan or inf (they pass every `x > 0` test and poison a run late)."""
    import math

    for a in parser._actions:
        if a.type is not float or not a.option_strings:
            continue
        value = getattr(args, a.dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{a.option_strings[0]} {v}: give a finite number")


def apply_dynamo_options(args: argparse.Namespace) -> argparse.Namespace:
    """musubi-tuner's --dynamo_* options (accelerate's dynamo plugin, which compiles the whole model) become the
    --compile_* options here (each transformer block compiled, hooks such as block swap kept outside)."""
    backend = getattr(args, "dynamo_backend", "NO")
    if backend in (None, "NO"):
        return args
    import logging

    args.compile, args.compile_backend = True, backend.lower()
    args.compile_mode = args.dynamo_mode or args.compile_mode
    args.compile_fullgraph = args.compile_fullgraph or args.dynamo_fullgraph
    if args.dynamo_dynamic:
        args.compile_dynamic = "true"
    logging.getLogger(__name__).info("--dynamo_backend %s: torch.compile on each transformer block (as --compile "
                                     "--compile_backend %s)", backend, args.compile_backend)
    return args


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """Option values from a musubi-tuner style TOML config, checked against the parser's options."""
    from pathlib import Path

    from .fileio import parse_toml, read_text

    p = Path(path if path.endswith(".toml") else path + ".toml")
    if not p.is_file():
        raise UserError(f"--config_file: {p} not found")
    data = parse_toml(read_text(p, "--config_file"), f"--config_file {p}")
    flat: dict = {}
    for key, value in data.items():  # tables are flattened into one namespace
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    unknown = sorted(k for k in flat if k not in actions)
    check_unknown_keys(unknown, actions, p)
    out = {}
    for key, value in flat.items():
        action = actions.get(key)
        if action is None or key == "config_file":
            continue
        out[key] = _config_value(action, value, f"--config_file {p}: {key}")
    return out


def check_unknown_keys(unknown: list[str], actions: dict, path) -> None:
    """Keys this script lacks: musubi-tuner options of other architectures are ignored with a warning (one config is
    often shared between models); anything else is a typo that would silently train with a default: an error."""
    import difflib
    import logging

    from .musubi_options import MUSUBI_OPTIONS

    typos = [k for k in unknown if k not in MUSUBI_OPTIONS]
    if typos:
        near = difflib.get_close_matches(typos[0], list(actions), n=1)
        hint = f"did you mean {near[0]}?" if near else "see --help for the options"
        raise UserError(f"--config_file {path}: {typos[0]} is not an option of this script or of musubi-tuner; {hint}")
    if unknown:
        logging.getLogger(__name__).warning("--config_file %s: ignoring musubi-tuner option(s) for other model "
                                            "architectures: %s", path, ", ".join(unknown))


def _config_value(action: argparse.Action, value, where: str):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or (
            isinstance(action, Inert) and action.nargs == 0):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    values = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise UserError(f"{where} takes one value, got a list")
    conv = action.type or str
    try:
        out = [v if isinstance(v, bool) or (conv is float and isinstance(v, (int, float))) or
               (conv is int and isinstance(v, int)) else conv(str(v)) for v in values]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"{where}: {e}") from None
    if action.choices is not None:
        bad = [v for v in out if v not in action.choices]
        if bad:
            raise UserError(f"{where} {bad[0]!r} is not one of {', '.join(map(str, action.choices))}")
    return out if many else out[0]
