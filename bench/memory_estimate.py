"""Peak memory of LoRA training on the full 20B Qwen-Image DiT, estimated on the CPU without a GPU.

The real model code (diffusers' QwenImageTransformer2DModel, our LoRA network, fp8 layers and gradient
checkpointing) runs on fake tensors (torch FakeTensorMode: shapes and dtypes, no data), and a dispatch mode adds up
the bytes of every live tensor storage. Two training steps (1024x1024, batch 1, 128 text tokens, rank 16, bf16
autocast) give the steady-state peak, with the phase where it happens.

It counts tensors only: no CUDA context, cuBLAS / attention workspaces or allocator rounding. On the H200 the
measured `max_memory_allocated` of the same configuration (bench/gpu_memory.py, "none", fp32 AdamW) was 42.48 GiB
against 41.95 GiB estimated here, so add about 0.5 GiB.

    python bench/memory_estimate.py [--configs adamw,adamw8bit,fp8+adamw,fp8+adamw8bit,...] [--layers 60]

A configuration is "+"-joined words: adamw | adamw8bit, fp8 (--fp8_scaled), swapN (--blocks_to_swap N: our
BlockSwapper with blocks in CPU memory held as uncounted meta tensors). adamw8bit allocates bitsandbytes' AdamW8bit state layout (two uint8 moments + one float32 absmax per 256 values);
its kernels cannot run on fake tensors. "weights" is what is resident before the first step.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from accelerate import init_empty_weights  # noqa: E402
from diffusers import QwenImageTransformer2DModel  # noqa: E402

from musubi_tuner.memory import fp8 as fp8mod  # noqa: E402
from musubi_tuner.memory.attention import enable_checkpointing  # noqa: E402
from musubi_tuner.memory.block_swap import BlockSwapper  # noqa: E402
from musubi_tuner.networks.lora_qwen_image import create_network  # noqa: E402

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


def fake_model(layers: int, fp8: bool) -> QwenImageTransformer2DModel:
    with init_empty_weights():
        model = QwenImageTransformer2DModel(num_layers=layers)
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


def estimate(config: str, layers: int, size: int, text_tokens: int, rank: int, steps: int = 2) -> dict:
    words = set(config.split("+"))
    swap = next((int(w[4:]) for w in words if w.startswith("swap")), 0)
    with FakeTensorMode():
        meter = LiveBytes()
        model = fake_model(layers, "fp8" in words)
        swapper = BlockSwapper(model.transformer_blocks, swap, "cpu", mover=FakeHost(meter)) if swap else None
        enable_checkpointing(model)
        model.train()
        net = create_network(1.0, rank, rank, None, None, model)
        net.apply_to(None, model)
        params = list(net.parameters())
        opt = AdamW8bitStates(params) if "adamw8bit" in words else torch.optim.AdamW(params, lr=1e-4)
        n = (size // 16) ** 2
        x = dict(hidden_states=torch.randn(1, n, 64, dtype=torch.bfloat16),
                 encoder_hidden_states=torch.randn(1, text_tokens, 3584, dtype=torch.bfloat16),
                 timestep=torch.full((1,), 0.5, dtype=torch.bfloat16), img_shapes=[[(1, size // 16, size // 16)]],
                 return_dict=False)
        for t in [*model.parameters(), *model.buffers(), *params, x["hidden_states"], x["encoder_hidden_states"]]:
            meter.track(t)
        weights = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]
                      if t.untyped_storage() not in meter.host)  # resident weights
        with meter:
            for step in range(steps):
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="adamw,adamw8bit,fp8+adamw,fp8+adamw8bit,fp8+swap16+adamw,fp8+swap45+adamw,"
                                        "fp8+swap16+adamw8bit,fp8+swap45+adamw8bit")
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--text_tokens", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    print(f"{'config':<22}{'weights':>9}{'LoRA':>7}{'optim':>7}{'peak GiB':>10}  peak in      (s)")
    for config in args.configs.split(","):
        t = time.perf_counter()
        r = estimate(config, args.layers, args.size, args.text_tokens, args.rank)
        print(f"{config:<22}{r['weights_gib']:>9.2f}{r['lora_gib']:>7.2f}{r['optimizer_gib']:>7.2f}"
              f"{r['peak_gib']:>10.2f}  {r['peak_in']:<12} {time.perf_counter() - t:.0f}", flush=True)


if __name__ == "__main__":
    main()
