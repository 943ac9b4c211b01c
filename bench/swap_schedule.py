"""Block swap schedule on a simulated GPU: how long a LoRA training step (gradient checkpointing) and a sampling
step take with N swapped blocks, for the swapped blocks at the end of the model vs spread between resident ones.

Our real BlockSwapper hooks run on a 60-block model (tiny widths, CPU); a simulated mover replaces the GPU with two
clocks, the compute stream and one copy engine, and reproduces what the CUDA mover enqueues:
- a copy to the device waits for the compute enqueued so far (wait_stream), then for the copy engine, and takes
  `copy_ms`; frozen weights go back to the host without a copy;
- using a block waits for its copy, then adds its compute: `fwd_ms` in forward (and again for the checkpoint
  recompute), `bwd_ms` for its backward.
Defaults are the H200 figures: fwd 7.0 ms per fp8 block at 1024x1024 (0.421 s for 60 blocks without gradients), bwd
10.5 ms (1.47 s per step without swap = 60 x (2 fwd + bwd)); copy_ms is the one unknown (pinned host-to-device time of
one fp8 block, ~340 MB; bench/gpu_memory.py measures it). With the blocks at the end, copy 14 ms reproduces the
measured +5% (16 blocks) and +24% (45 blocks).

    python bench/swap_schedule.py [--copy_ms 14] [--fwd_ms 7] [--bwd_ms 10.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers import QwenImageTransformer2DModel  # noqa: E402

from musubi_tuner.memory import block_swap  # noqa: E402
from musubi_tuner.qwen_image.tiny import TINY_DIT  # noqa: E402


class SimulatedGPU:
    """The TensorMover interface with clocks instead of copies (weights stay where they are).

    A block's compute is charged when the swapper reports its use, but its kernels count as enqueued only once the
    host moves on (its post-hook, or the next wait): a prefetch issued in the same hook does not wait for it, as on
    the GPU, where wait_stream only covers kernels already launched."""

    def __init__(self, copy_ms: float):
        self.copy_ms = copy_ms
        self.compute = 0.0  # when the compute stream finishes what was launched so far
        self.pending = 0.0  # the current block's compute, not launched yet
        self.copy_free = 0.0

    def launch(self):
        self.compute += self.pending
        self.pending = 0.0

    def use(self, ms: float):
        self.launch()
        self.pending = ms

    def to_device(self, module):
        start = max(self.compute, self.copy_free)
        self.copy_free = start + self.copy_ms
        return self.copy_free

    def to_host(self, module):
        if not block_swap._in_backward():  # forward post-hook: the block's kernels are launched
            self.launch()
        return self.compute  # frozen weights: nothing to copy back

    def wait(self, event):
        self.launch()
        if event is not None:
            self.compute = max(self.compute, event)


def simulate(layout: str, num_swap: int, copy_ms: float, fwd_ms: float, bwd_ms: float, train: bool) -> float:
    """ms for one step: training = checkpointed forward + backward; sampling = one forward without gradients."""
    cfg = dict(TINY_DIT, num_layers=60)
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**cfg)
    model.requires_grad_(False)
    model.img_in.requires_grad_(True)  # something upstream needs gradients, as with LoRA
    if train:
        model.enable_gradient_checkpointing()
        model.train()
    gpu = SimulatedGPU(copy_ms)
    charged = set()

    def on_use(i, resident):
        backward = block_swap._in_backward()
        key = (i, backward, "recompute" if backward and i in recomputing else "")
        if key in charged:
            return
        charged.add(key)
        gpu.use(fwd_ms if not backward or key[2] else bwd_ms)

    recomputing: set[int] = set()
    original = block_swap.swapped_blocks
    if layout == "end":
        block_swap.swapped_blocks = lambda n, k: set(range(n - k, n))
    try:
        swapper = block_swap.BlockSwapper(model.transformer_blocks, num_swap, "cpu", mover=gpu, on_use=on_use)
    finally:
        block_swap.swapped_blocks = original
    # the grad hook fires before a block's checkpoint recompute; the recompute's pre-hook is the second use
    for i, b in enumerate(model.transformer_blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: recomputing.add(i) if block_swap._in_backward() else None,
                                    prepend=True)
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 16, 64, generator=g), timestep=torch.full((1,), 0.4),
             encoder_hidden_states=torch.randn(1, 7, 256, generator=g), img_shapes=[[(1, 4, 4)]], return_dict=False)
    times = []
    for _ in range(3):  # steady state: the third step
        start = gpu.compute
        charged.clear()
        recomputing.clear()
        if train:
            model(**x)[0].pow(2).mean().backward()
        else:
            with torch.no_grad():
                model(**x)
        gpu.launch()
        times.append(gpu.compute - start)
    swapper.remove()
    return times[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copy_ms", type=float, default=14.0)
    p.add_argument("--fwd_ms", type=float, default=7.0)
    p.add_argument("--bwd_ms", type=float, default=10.5)
    p.add_argument("--swaps", default="16,45")
    args = p.parse_args()
    base = {True: 60 * (2 * args.fwd_ms + args.bwd_ms), False: 60 * args.fwd_ms}
    print(f"simulated GPU: fwd {args.fwd_ms} ms, bwd {args.bwd_ms} ms per block, copy {args.copy_ms} ms per block")
    print(f"{'step':<10}{'swap':>5}{'no swap ms':>12}{'at end ms':>11}{'spread ms':>11}{'end +%':>8}{'spread +%':>10}")
    for train in (True, False):
        for n in map(int, args.swaps.split(",")):
            end = simulate("end", n, args.copy_ms, args.fwd_ms, args.bwd_ms, train)
            spread = simulate("spread", n, args.copy_ms, args.fwd_ms, args.bwd_ms, train)
            b = base[train]
            print(f"{'training' if train else 'sampling':<10}{n:>5}{b:>12.0f}{end:>11.0f}{spread:>11.0f}"
                  f"{100 * (end / b - 1):>8.1f}{100 * (spread / b - 1):>10.1f}")


if __name__ == "__main__":
    main()
