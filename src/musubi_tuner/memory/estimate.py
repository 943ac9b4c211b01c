"""Peak GPU memory of LoRA training, estimated on the CPU without a GPU.

The real model code (diffusers' QwenImageTransformer2DModel, our LoRA network, fp8 layers, block swap and gradient
checkpointing) runs on fake tensors (torch FakeTensorMode: shapes and dtypes, no data), and a dispatch mode adds up
the bytes of every live tensor storage. Two training steps give the steady-state peak, with the phase where it happens.

It counts tensors only: no CUDA context, cuBLAS / attention workspaces or allocator rounding. On the H200 the
measured `max_memory_allocated` of 1024x1024, batch 1, rank 16, fp32 AdamW was 42.48 GiB against 41.95 GiB estimated
here, so OVERHEAD_GIB is added to plans.

A configuration is "+"-joined words: adamw | adamw8bit, fp8 (--fp8_scaled), swapN (--blocks_to_swap N: our
BlockSwapper with blocks in CPU memory held as uncounted tensors). adamw8bit allocates bitsandbytes' AdamW8bit state
layout (two uint8 moments + one float32 absmax per 256 values); its kernels cannot run on fake tensors.

`quick_estimate` runs the model with 1 and 2 blocks and extends the per-block cost to the real count (memory is linear
in the block count), so a plan over many option sets takes seconds instead of minutes; `plan` picks the fastest
options that fit a GPU.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from accelerate import init_empty_weights
from diffusers import QwenImageTransformer2DModel
from diffusers.models.attention_dispatch import attention_backend
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from . import fp8 as fp8mod
from .attention import enable_checkpointing
from .block_swap import BlockSwapper

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive at each op, and the peak with the phase it happened in."""

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.host = WeakIdKeyDictionary()  # storages standing for CPU memory (block swap), not counted
        self.current = self.peak = 0
        self.phase = self.peak_phase = ""
        self.hosting = False

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self.live or storage in self.host:
            return
        n = storage.nbytes()
        self.live[storage] = n
        self.current += n
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.current -= n

    def host_tensor(self, like: torch.Tensor) -> torch.Tensor:
        self.hosting = True
        try:
            t = torch.empty(like.shape, dtype=like.dtype)
        finally:
            self.hosting = False
        self.host[t.untyped_storage()] = True
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.hosting:
            return out
        tree_map_only(torch.Tensor, self.track, out)
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
        return out


class AdamW8bitStates(torch.optim.Optimizer):
    """bitsandbytes AdamW8bit's state tensors (blockwise 8-bit, block 256) without its kernels."""

    def __init__(self, params, lr=1e-4):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not self.state[p]:
                    blocks = math.ceil(p.numel() / 256)
                    self.state[p].update(state1=torch.empty(p.shape, dtype=torch.uint8),
                                         state2=torch.empty(p.shape, dtype=torch.uint8),
                                         absmax1=torch.empty(blocks), absmax2=torch.empty(blocks))


class FakeHost:
    """Block swap's mover for fake tensors: a block in CPU memory holds new tensors that the meter does not count,
    one brought to the device gets new counted ones."""

    def __init__(self, meter: LiveBytes):
        self.meter = meter

    def to_host(self, module):
        for t in [*module.parameters(), *module.buffers()]:
            t.data = self.meter.host_tensor(t)

    def to_device(self, module):
        for t in [*module.parameters(), *module.buffers()]:
            t.data = torch.empty(t.shape, dtype=t.dtype)

    def wait(self, event):
        pass


def fake_model(layers: int, fp8: bool, config: dict | None = None) -> QwenImageTransformer2DModel:
    """The DiT of `config` (default: the 20B Qwen-Image) with `layers` blocks, as bf16 fake parameters."""
    with init_empty_weights():
        model = QwenImageTransformer2DModel(**{**(config or {}), "num_layers": layers})
    for name, p in list(model.named_parameters()):
        mod, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod), attr,
                torch.nn.Parameter(torch.empty(p.shape, dtype=torch.bfloat16), requires_grad=False))
    if fp8:  # the --fp8_scaled layout: fp8 weight + per-channel float32 scale for the block Linears
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("transformer_blocks."):
                fp8mod.make_fp8_linear(m, torch.empty(m.weight.shape, dtype=fp8mod.FP8),
                                       torch.empty(m.out_features, 1))
    return model


def estimate(config: str, layers: int, size: int, text_tokens: int, rank: int, steps: int = 2,
             dit_config: dict | None = None, batch: int = 1, checkpointing: bool = True) -> dict:
    """Run `steps` LoRA training steps of the configuration (see the module doc) on fake tensors; GiB figures."""
    from ..networks.lora_qwen_image import create_network

    words = set(config.split("+"))
    swap = next((int(w[4:]) for w in words if w.startswith("swap")), 0)
    with FakeTensorMode():
        meter = LiveBytes()
        model = fake_model(layers, "fp8" in words, dit_config)
        swapper = BlockSwapper(model.transformer_blocks, swap, "cpu", mover=FakeHost(meter)) if swap else None
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        net = create_network(1.0, rank, rank, None, None, model)
        net.apply_to(None, model)
        params = list(net.parameters())
        opt = AdamW8bitStates(params) if "adamw8bit" in words else torch.optim.AdamW(params, lr=1e-4)
        n = (size // 16) ** 2
        channels = model.config.in_channels
        x = dict(hidden_states=torch.randn(batch, n, channels, dtype=torch.bfloat16),
                 encoder_hidden_states=torch.randn(batch, text_tokens, model.config.joint_attention_dim,
                                                   dtype=torch.bfloat16),
                 timestep=torch.full((batch,), 0.5, dtype=torch.bfloat16),
                 img_shapes=[[(1, size // 16, size // 16)]] * batch, return_dict=False)
        for t in [*model.parameters(), *model.buffers(), *params, x["hidden_states"], x["encoder_hidden_states"]]:
            meter.track(t)
        weights = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]
                      if t.untyped_storage() not in meter.host)  # resident weights
        # torch SDPA, whatever backend another model of this process set (diffusers' choice is process-wide)
        with meter, attention_backend("native"):
            for _ in range(steps):
                meter.phase = "forward"
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(**x)[0].float().pow(2).mean()
                meter.phase = "backward"
                loss.backward()
                meter.phase = "optimizer step"
                opt.step()
                opt.zero_grad(set_to_none=True)
                meter.phase = ""
        del swapper
        states = sum(t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values()
                     if isinstance(t, torch.Tensor) and t.ndim > 0)
    return {"config": config, "weights_gib": weights / GIB, "lora_gib": sum(p.numel() * 4 for p in params) / GIB,
            "optimizer_gib": states / GIB, "peak_gib": meter.peak / GIB, "peak_in": meter.peak_phase}


OVERHEAD_GIB = 0.6  # CUDA context, workspaces and allocator rounding (H200: measured 42.48 vs 41.95 estimated)


def _frozen(config: dict | None) -> tuple:
    return tuple(sorted((config or {}).items(), key=lambda kv: kv[0]))


@lru_cache(maxsize=256)
def _small(config: str, blocks: int, size: int, text_tokens: int, rank: int, dit_config: tuple, batch: int,
           checkpointing: bool) -> dict:
    return estimate(config, blocks, size, text_tokens, rank, dit_config=dict(dit_config) or None, batch=batch,
                    checkpointing=checkpointing)


def quick_estimate(layers: int, size: int, text_tokens: int = 128, rank: int = 16, fp8: bool = False, swap: int = 0,
                   optimizer: str = "adamw", batch: int = 1, checkpointing: bool = True,
                   dit_config: dict | None = None) -> dict:
    """The estimate for `layers` blocks from runs with 1 and 2 blocks (GiB; peak_gib without OVERHEAD_GIB). Swapped
    blocks leave the device except the two that can be on it at once (the one in use and the next one coming in)."""
    words = f"fp8+{optimizer}" if fp8 else optimizer
    key = (size, text_tokens, rank, _frozen(dit_config), batch, checkpointing)
    one, two = _small(words, 1, *key), _small(words, 2, *key)
    per_block = {k: two[k] - one[k] for k in ("weights_gib", "lora_gib", "optimizer_gib", "peak_gib")}
    out = {k: one[k] + per_block[k] * (layers - 1) for k in per_block}
    if swap:
        block_weights = per_block["weights_gib"]
        out["weights_gib"] -= block_weights * swap
        out["peak_gib"] -= block_weights * max(0, swap - 2)
    out["total_gib"] = out["peak_gib"] + OVERHEAD_GIB
    return out


@dataclass
class Plan:
    fits: bool
    options: list[str]  # the training options, as command-line words
    batch_size: int  # for the dataset config
    estimate: dict  # quick_estimate's figures of the chosen options
    tried: list[dict] = field(default_factory=list)  # every option set looked at, in order, with its total


def plan(gpu_gib: float, layers: int, size: int, text_tokens: int = 128, rank: int = 16, max_batch: int = 4,
         optimizer: str = "adamw8bit", dit_config: dict | None = None, headroom: float = 0.92) -> Plan:
    """The fastest options whose estimate fits `headroom` of `gpu_gib`: plain, then gradient checkpointing, then fp8
    weights, then more and more swapped blocks; then the largest batch size up to `max_batch` that still fits."""
    budget = gpu_gib * headroom
    candidates = [dict(fp8=False, swap=0, checkpointing=False), dict(fp8=False, swap=0, checkpointing=True),
                  dict(fp8=True, swap=0, checkpointing=True)]
    step = max(1, layers // 8)
    candidates += [dict(fp8=True, swap=s, checkpointing=True) for s in range(step, layers, step)]
    candidates.append(dict(fp8=True, swap=layers - 1, checkpointing=True))
    tried = []
    for c in candidates:
        est = quick_estimate(layers, size, text_tokens, rank, optimizer=optimizer, dit_config=dit_config, **c)
        tried.append({**c, "batch": 1, "total_gib": round(est["total_gib"], 2)})
        if est["total_gib"] <= budget:
            break
    else:  # not even every option fits: the last set, the closest
        return Plan(False, options_of(c, optimizer), 1, est, tried)
    batch = 1
    for b in range(2, max_batch + 1):
        bigger = quick_estimate(layers, size, text_tokens, rank, optimizer=optimizer, batch=b, dit_config=dit_config,
                                **c)
        tried.append({**c, "batch": b, "total_gib": round(bigger["total_gib"], 2)})
        if bigger["total_gib"] > budget:
            break
        est, batch = bigger, b
    return Plan(True, options_of(c, optimizer), batch, est, tried)


def options_of(c: dict, optimizer: str) -> list[str]:
    words = ["--optimizer_type", optimizer]
    if c["checkpointing"]:
        words.append("--gradient_checkpointing")
    if c["fp8"]:
        words += ["--fp8_base", "--fp8_scaled"]
    if c["swap"]:
        words += ["--blocks_to_swap", str(c["swap"])]
    return words
