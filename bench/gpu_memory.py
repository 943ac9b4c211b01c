"""GPU memory / speed of LoRA training on the full 20B Qwen-Image DiT config with random weights (1024x1024, batch 1,
gradient checkpointing, LoRA rank 16), for: no options, --fp8_scaled, + --blocks_to_swap 16, + --blocks_to_swap 45.
Published figures to beat (FACTS.md): 42 / 30 / 24 / 12 GB.

Also two correctness checks on the GPU first: block swap gives bit-identical outputs and gradients (with and without
gradient checkpointing), and the fp8 `_scaled_mm` inference path against the dequantising path (speed and error).

    python bench/gpu_memory.py [--steps 3] [--configs none,fp8,fp8+swap16,fp8+swap45]
    python bench/gpu_memory.py --tiny          # CPU dry run of the same code
    python bench/gpu_memory.py --model 2.1 --configs none,fp8,fp8+swap16   # Qwen-Image-2.1's DiT (32 blocks)

A configuration is "+"-joined words: none | fp8 (--fp8_scaled) | swapN (--blocks_to_swap N) | 8bit (bitsandbytes
AdamW8bit instead of fp32 AdamW; the published figures were taken with adamw8bit) | compile (torch.compile blocks).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from accelerate import init_empty_weights  # noqa: E402
from diffusers import QwenImageTransformer2DModel  # noqa: E402

from musubi_tuner.memory import fp8 as fp8mod  # noqa: E402
from musubi_tuner.memory.attention import enable_checkpointing  # noqa: E402
from musubi_tuner.memory.block_swap import enable_block_swap  # noqa: E402
from musubi_tuner.memory.placement import compile_blocks  # noqa: E402
from musubi_tuner.training.optim import build_optimizer  # noqa: E402
from musubi_tuner.networks.lora_qwen_image import create_network  # noqa: E402


MODEL = "original"  # or "2.1" (--model)


def random_dit(layers: int, device, tiny: bool, seed: int = 0) -> QwenImageTransformer2DModel:
    cfg = dict(num_layers=layers)
    if tiny:
        cfg.update(attention_head_dim=32, num_attention_heads=4, axes_dims_rope=(4, 14, 14))
        cfg.update(context_in_dim=256) if MODEL == "2.1" else cfg.update(joint_attention_dim=256)
    with init_empty_weights():
        if MODEL == "2.1":
            from diffusers import QwenImage21Transformer2DModel

            model = QwenImage21Transformer2DModel(**cfg)
        else:
            model = QwenImageTransformer2DModel(**cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        t = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        mod, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod), attr, torch.nn.Parameter(t, requires_grad=False))
    return model.eval()


def inputs(device, tiny: bool, size: int = 1024, txt: int = 128, seed: int = 1):
    g = torch.Generator(device=device).manual_seed(seed)
    n = (size // 16) ** 2
    if MODEL == "2.1":  # unpatched 16x latents; the text sequence, then one slot per 2x2 target tokens
        return dict(hidden_states=torch.randn(1, n, 64, generator=g, device=device, dtype=torch.bfloat16),
                    encoder_hidden_states=torch.randn(1, txt, 256 if tiny else 4096, generator=g, device=device,
                                                      dtype=torch.bfloat16),
                    timestep=torch.full((1,), 0.5, device=device, dtype=torch.bfloat16),
                    img_shapes=[[(1, size // 16, size // 16)]], return_dict=False,
                    img_mask=torch.cat([torch.zeros(1, txt, dtype=torch.bool, device=device),
                                        torch.ones(1, n // 4, dtype=torch.bool, device=device)], dim=1))
    d_txt = 256 if tiny else 3584
    return dict(hidden_states=torch.randn(1, n, 64, generator=g, device=device, dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(1, txt, d_txt, generator=g, device=device, dtype=torch.bfloat16),
                timestep=torch.full((1,), 0.5, device=device, dtype=torch.bfloat16),
                img_shapes=[[(1, size // 16, size // 16)]], return_dict=False)


def lora_step(model, net, opt, x):
    out = model(**x)[0]
    loss = out.float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_config(name: str, layers: int, device, tiny: bool, steps: int, size: int) -> dict:
    words = set(name.split("+"))
    fp8 = "fp8" in words
    swap = next((int(w[4:]) for w in words if w.startswith("swap")), 0)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model = random_dit(layers, device, tiny)
    if fp8:
        fp8mod.quantize_linears(model, mode="channel", device=device)
    swapper = enable_block_swap(model, swap, device) if swap else None
    enable_checkpointing(model)
    if "compile" in words:
        compile_blocks(model.transformer_blocks, argparse.Namespace(
            compile_backend="inductor", compile_mode=None, compile_dynamic=False, compile_fullgraph=False,
            compile_cache_size_limit=None))
    model.train()
    net = create_network(1.0, 16, 16, None, None, model)
    net.apply_to(None, model)
    net.to(device)
    opt = build_optimizer("adamw8bit" if "8bit" in words else "adamw", net.parameters(), 1e-4)
    x = inputs(device, tiny, size)
    sync(device)
    setup = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()  # drop what setup cached (the real loader never holds the whole bf16 model)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):  # sampling-style forward
        model(**x)
        sync(device)
        tf = time.perf_counter()
        for _ in range(steps):
            model(**x)
        sync(device)
    fwd = (time.perf_counter() - tf) / steps
    with torch.autocast(device.type, dtype=torch.bfloat16):
        lora_step(model, net, opt, x)  # warm-up
        sync(device)
        t1 = time.perf_counter()
        for _ in range(steps):
            lora_step(model, net, opt, x)
        sync(device)
    sec = (time.perf_counter() - t1) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else float("nan")
    if swapper:
        swapper.remove()
    del model, net, opt, swapper, x
    return {"config": name, "peak_allocated_gib": round(peak, 2), "peak_reserved_gib": round(reserved, 2),
            "s_per_it": round(sec, 3), "forward_s": round(fwd, 3), "setup_s": round(setup, 1)}


def check_swap_exact(device, tiny: bool) -> dict:
    """fwd+bwd with LoRA on 6 full-width blocks: block swap (3) against no swap, next to no swap against itself (the
    run-to-run noise of the GPU kernels); max relative difference over outputs and LoRA gradients."""
    res = {}
    for ckpt in (False, True):
        grads = []
        for swap in (0, 0, 3):
            torch.manual_seed(0)
            model = random_dit(6, device, tiny, seed=3)
            swapper = enable_block_swap(model, swap, device) if swap else None
            if ckpt:
                enable_checkpointing(model)
            model.train()
            net = create_network(1.0, 8, 8, None, None, model)
            net.apply_to(None, model)
            net.to(device)
            for l in net.unet_loras:
                torch.nn.init.normal_(l.lora_up.weight, std=0.01)
            x = inputs(device, tiny, 512)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                for _ in range(2):
                    out = model(**x)[0]
                    out.float().pow(2).mean().backward()
            grads.append([p.grad.detach().clone() for p in net.parameters() if p.grad is not None] + [out.detach()])
            if swapper:
                swapper.remove()
            del model, net
        def rel(a, b):
            return max(((x.float() - y.float()).norm() / y.float().norm().clamp(min=1e-12)).item() for x, y in zip(a, b))

        res[f"checkpointing={ckpt}"] = {"noswap_vs_noswap": rel(grads[1], grads[0]),
                                         "swap_vs_noswap": rel(grads[2], grads[0]), "n": len(grads[2])}
    return res


def check_fp8_matmul(device, tiny: bool) -> dict:
    model = random_dit(4, device, tiny, seed=5)
    x = inputs(device, tiny, 1024)
    with torch.no_grad():
        ref = model(**x)[0].float()
        fp8mod.quantize_linears(model, mode="channel", device=device)
        out = {}
        for use in (False, True):
            fp8mod.USE_SCALED_MM = use
            y = model(**x)[0]
            sync(device)
            t = time.perf_counter()
            for _ in range(5):
                y = model(**x)[0]
            sync(device)
            out[use] = ((time.perf_counter() - t) / 5, ((y.float() - ref).norm() / ref.norm()).item())
    fp8mod.USE_SCALED_MM = True
    return {"scaled_mm_available": fp8mod.scaled_mm_available(device),
            "dequant_s": round(out[False][0], 4), "dequant_rel_err": round(out[False][1], 4),
            "scaled_mm_s": round(out[True][0], 4), "scaled_mm_rel_err": round(out[True][1], 4)}


def check_host_to_device(device) -> dict:
    """Pinned host -> device copy bandwidth, one fp8 block's worth (340 MB) at a time: the floor of what block swap
    costs per swapped block in the forward pass where it cannot hide behind compute."""
    if device.type != "cuda":
        return {}
    host = torch.empty(340 * 2**20, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device=device)
    dev.copy_(host, non_blocking=True)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        dev.copy_(host, non_blocking=True)
    sync(device)
    sec = (time.perf_counter() - t) / 10
    return {"pinned_h2d_gb_s": round(host.numel() / sec / 1e9, 1), "ms_per_340MB": round(sec * 1e3, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small dims on CPU (dry run)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--configs", default="none,fp8,fp8+swap16,fp8+swap45")
    p.add_argument("--skip_checks", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--model", choices=["original", "2.1"], default="original",
                   help="the 20B Qwen-Image DiT (60 blocks) or Qwen-Image-2.1's (32 blocks)")
    args = p.parse_args()
    global MODEL
    MODEL = args.model
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    layers = (60 if not args.tiny else 48) if MODEL == "original" else (32 if not args.tiny else 24)
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    if not args.skip_checks:
        results["swap_exact"] = check_swap_exact(device, args.tiny)
        print("block swap vs no swap (max rel diff):", results["swap_exact"], flush=True)
        results["fp8_matmul"] = check_fp8_matmul(device, args.tiny)
        print("fp8 matmul:", results["fp8_matmul"], flush=True)
        results["host_to_device"] = check_host_to_device(device)
        print("host to device:", results["host_to_device"], flush=True)
    rows = []
    for name in args.configs.split(","):
        try:
            rows.append(run_config(name, layers, device, args.tiny, args.steps, args.size if not args.tiny else 128))
        except Exception as e:  # report and go on with the other configurations
            rows.append({"config": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(rows[-1], flush=True)
    results["rows"] = rows
    targets = {"none": 42, "fp8": 30, "fp8+swap16": 24, "fp8+swap45": 12} if MODEL == "original" else {}
    targets.update({f"{k}+8bit": v for k, v in targets.items()})  # published figures exist for Qwen-Image only
    print(f"\n{'config':<14}{'peak GiB':>10}{'target GB':>10}{'s/it':>8}")
    for r in rows:
        print(f"{r['config']:<14}{r.get('peak_allocated_gib', float('nan')):>10}{targets.get(r['config'], ''):>10}"
              f"{r.get('s_per_it', float('nan')):>8}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
