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
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


from musubi_tuner.memory.estimate import estimate  # noqa: E402


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
