"""Apply the memory options to a loaded DiT in one place, for inference and training alike:
fp8 weights (--fp8_base / --fp8_scaled), block swap (--blocks_to_swap), attention (--split_attn, backends),
gradient checkpointing with optional CPU offload, torch.compile."""

from __future__ import annotations

import logging

import torch

from ..errors import UserError
from ..models.registry import family_of
from ..qwen_image.dit import LoraMerge
from ..models.version import ModelVersion
from .attention import enable_checkpointing, enable_split_attention
from .block_swap import enable_block_swap

logger = logging.getLogger(__name__)


def fp8_mode(args) -> str | None:
    if getattr(args, "fp8_scaled", False):
        return "channel"
    if getattr(args, "fp8_base", False) or getattr(args, "fp8", False):  # --fp8: generation's name of --fp8_base
        return "tensor"
    return None


def load_dit_with_options(args, version: ModelVersion, dtype: torch.dtype, device: torch.device,
                          training: bool = False):
    """Returns (model, swapper or None). With block swap the model is loaded into CPU memory first and only the
    resident blocks go to the device, so peak device memory never holds the whole model."""
    swap = getattr(args, "blocks_to_swap", 0) or 0

    def check_swap(config: dict) -> None:  # before the weights are read
        n = config["num_layers"]
        if swap and not 0 < swap < n:
            raise UserError(f"--blocks_to_swap must be between 1 and {n - 1} for this DiT ({n} blocks), got {swap}")

    mode = fp8_mode(args)
    model = family_of(version).load_dit(args.dit, version, dtype, "cpu" if swap else device,
                   disable_mmap=getattr(args, "disable_numpy_memmap", False), fp8_mode=mode, compute_device=device,
                   check_config=check_swap, loras=lora_merges_from_args(args))
    if mode:
        logger.info("fp8 (%s): Linear weights of the transformer blocks quantised while loading", mode)
    swapper = enable_block_swap(model, swap, device) if swap else None
    if getattr(args, "split_attn", False):
        enable_split_attention(model)
    if training and getattr(args, "gradient_checkpointing", False):
        enable_checkpointing(model, getattr(args, "gradient_checkpointing_cpu_offload", False))
    elif training and getattr(args, "gradient_checkpointing_cpu_offload", False):
        raise UserError("--gradient_checkpointing_cpu_offload needs --gradient_checkpointing")
    if getattr(args, "compile", False):
        compile_blocks(model.transformer_blocks, args)
    return model, swapper


def lora_merges_from_args(args) -> list[LoraMerge]:
    """LoRAs merged into the DiT as it loads: generation's --lora_weight / --lora_multiplier (with
    --include_patterns / --exclude_patterns), training's --base_weights / --base_weights_multiplier."""
    for files, mults, option in ((getattr(args, "lora_weight", None), getattr(args, "lora_multiplier", None),
                                  "--lora_weight"),
                                 (getattr(args, "base_weights", None), getattr(args, "base_weights_multiplier", None),
                                  "--base_weights")):
        if files:
            mults = list(mults or [1.0])
            return [LoraMerge(f, mults[i] if i < len(mults) else mults[-1], option,
                              getattr(args, "include_patterns", None), getattr(args, "exclude_patterns", None))
                    for i, f in enumerate(files)]
    return []


def check_compile(args) -> None:
    """Refuse --compile settings that cannot work, before any model is loaded."""
    if not getattr(args, "compile", False):
        return
    backends = torch._dynamo.list_backends(exclude_tags=())
    if args.compile_backend not in backends:
        if getattr(args, "dynamo_backend", "NO") != "NO":  # musubi-tuner's name for the same setting
            raise UserError(f"--dynamo_backend {args.dynamo_backend}: not a torch.compile backend here; choose from "
                            f"{', '.join(b.upper() for b in backends)} or NO")
        raise UserError(f"--compile_backend {args.compile_backend!r} is not a torch.compile backend here; "
                        f"choose from {', '.join(backends)}")
    if args.compile_mode == "reduce-overhead" and getattr(args, "blocks_to_swap", 0):
        raise UserError("--compile_mode reduce-overhead records CUDA graphs on fixed weight addresses and cannot "
                        "follow --blocks_to_swap; use --compile_mode default or max-autotune-no-cudagraphs")


def compile_blocks(blocks, args) -> None:
    """torch.compile each block's forward (not its __call__), so module hooks such as block swap's run eagerly
    around the compiled code. Blocks of one class share the compiled graphs (parameters are graph inputs)."""
    if args.compile_cache_size_limit:
        torch._dynamo.config.cache_size_limit = args.compile_cache_size_limit
    options = dict(backend=args.compile_backend, mode=None if args.compile_mode == "default" else args.compile_mode,
                   dynamic={"true": True, "false": False}.get(args.compile_dynamic), fullgraph=args.compile_fullgraph)
    for block in blocks:
        block.forward = torch.compile(block.forward, **options)
    logger.info("torch.compile (%s, mode %s) on %d blocks; the first steps compile", args.compile_backend,
                args.compile_mode or "default", len(blocks))
