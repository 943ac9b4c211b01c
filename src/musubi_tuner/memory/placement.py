"""Apply the memory options to a loaded DiT in one place, for inference and training alike:
fp8 weights (--fp8_base / --fp8_scaled), block swap (--blocks_to_swap), attention (--split_attn, backends),
gradient checkpointing with optional CPU offload, torch.compile."""

from __future__ import annotations

import logging

import torch

from ..errors import UserError
from ..qwen_image.dit import load_dit
from ..qwen_image.versions import ModelVersion
from .attention import enable_checkpointing, enable_split_attention
from .block_swap import enable_block_swap

logger = logging.getLogger(__name__)


def fp8_mode(args) -> str | None:
    if getattr(args, "fp8_scaled", False):
        return "channel"
    if getattr(args, "fp8_base", False):
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
    model = load_dit(args.dit, version, dtype, "cpu" if swap else device,
                     disable_mmap=getattr(args, "disable_numpy_memmap", False), fp8_mode=mode, compute_device=device,
                     check_config=check_swap)
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


def check_compile(args) -> None:
    """Refuse --compile settings that cannot work, before any model is loaded."""
    if not getattr(args, "compile", False):
        return
    backends = torch._dynamo.list_backends(exclude_tags=())
    if args.compile_backend not in backends:
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
                   dynamic=True if args.compile_dynamic else None, fullgraph=args.compile_fullgraph)
    for block in blocks:
        block.forward = torch.compile(block.forward, **options)
    logger.info("torch.compile (%s, mode %s) on %d blocks; the first steps compile", args.compile_backend,
                args.compile_mode or "default", len(blocks))
