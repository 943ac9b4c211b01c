"""LoRA training step: our path (our LoRA network + predict_velocity) vs the plain diffusers path
(QwenImageTransformer2DModel + a PEFT LoRA adapter) on the same config: full-width 3072-dim blocks, 512x512 image
(1024 tokens), 64 text tokens, rank 16, fp32 on CPU. Runs alternate, the ratio of medians is printed.

    python bench/train_step.py [--blocks 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers import QwenImageTransformer2DModel  # noqa: E402

from musubi_tuner.networks.lora_qwen_image import create_network  # noqa: E402
from musubi_tuner.qwen_image.denoise import predict_velocity  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]


def build(blocks: int):
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(num_layers=blocks).train().requires_grad_(False)


def data(size: int, txt: int):
    g = torch.Generator().manual_seed(0)
    n = (size // 16) ** 2
    return (torch.randn(1, n, 64, generator=g), torch.randn(1, txt, 3584, generator=g), torch.tensor([0.5]),
            [(1, size // 16, size // 16)])


def ours(blocks, x):
    model = build(blocks)
    net = create_network(1.0, 16, 16, None, None, model)
    net.apply_to(None, model)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    noisy, text, t, shapes = x

    def step():
        out = predict_velocity(model, noisy, t, text, None, shapes)
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    return step


def reference(blocks, x):
    from peft import LoraConfig

    model = build(blocks)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    noisy, text, t, shapes = x

    def step():
        out = model(hidden_states=noisy, timestep=t, encoder_hidden_states=text, img_shapes=[shapes],
                    return_dict=False)[0]
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--txt", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x = data(a.size, a.txt)
    steps = {"ours": ours(a.blocks, x), "diffusers+peft": reference(a.blocks, x)}
    for s in steps.values():
        s()  # warm-up
    times = {k: [] for k in steps}
    for _ in range(a.repeats):
        for k, s in steps.items():  # alternate: both see the same machine noise
            t0 = time.perf_counter()
            s()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'path':<16}{'median s/step':>14}")
    for k, v in med.items():
        print(f"{k:<16}{v:>14.3f}")
    print(f"ratio ours / diffusers+peft = {med['ours'] / med['diffusers+peft']:.3f}")


if __name__ == "__main__":
    main()
