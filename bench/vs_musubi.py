"""Speed race with musubi-tuner: its own Qwen-Image model, LoRA network and loader against ours, on the same
full-width blocks (3072 wide, 24 heads) and the same inputs, measured side by side in one run.

- `train`: one LoRA training step (forward, backward, AdamW step), rank 16, on `--blocks` blocks, a `--size`² image
  (its packed tokens) and `--txt` text tokens;
- `denoise`: one denoising step of generation (a DiT forward under inference mode, no LoRA);
- `load`: loading a bf16 DiT file of `--blocks` blocks (ComfyUI layout) into bf16, each load in a fresh process.

Each side runs in its own process (both packages are named musubi_tuner), started once for `train` and `denoise`; the
parent alternates the two (one step of ours, one of musubi's, ...) so that both see the same machine noise, and prints
the ratio of the medians (ours / musubi: below 1 is faster). Also `diffusers+peft` (diffusers' model with a PEFT LoRA)
for the training step. Compute dtype: float32 on the CPU, bf16 on CUDA.

    python bench/vs_musubi.py --musubi PATH [--device cpu|cuda] [--blocks 2] [--size 512] [--repeats 7]

PATH is a checkout of kohya-ss/musubi-tuner (its `src/` is put on the path of musubi's worker only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]


# the worker: one implementation, one task, steps on demand ----------------------------------------------------------

def _inputs(size: int, txt: int, device, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    n = (size // 16) ** 2
    return (torch.randn(1, n, 64, generator=g).to(device, dtype), torch.randn(1, txt, 3584, generator=g).to(device, dtype),
            torch.tensor([0.5], device=device, dtype=dtype), [(1, size // 16, size // 16)])


def _randomise(model, seed: int = 0) -> None:
    """Materialise (meta tensors from init_empty_weights) and fill every weight with the same seeded values."""
    import torch

    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _model(impl: str, blocks: int, device, dtype):
    import torch

    torch.manual_seed(0)
    if impl == "musubi":
        from musubi_tuner.qwen_image import qwen_image_model as qm

        model = qm.create_model("torch", False, False, False, False, None, num_layers=blocks)
    else:
        from diffusers import QwenImageTransformer2DModel

        model = QwenImageTransformer2DModel(num_layers=blocks)
    _randomise(model)
    if impl == "ours":
        from musubi_tuner.memory.attention import set_attention

        set_attention(model, "sdpa")
    return model.to(device, dtype).requires_grad_(False)


def _forward(impl: str, model, x):
    noisy, text, t, shapes = x
    if impl == "ours":
        from musubi_tuner.qwen_image.denoise import predict_velocity

        return predict_velocity(model, noisy, t, text, None, shapes)
    if impl == "musubi":  # as its call_dit: batch 1 without a mask, timestep in [0, 1]
        return model(hidden_states=noisy, timestep=t, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                     img_shapes=[shapes], txt_seq_lens=[text.shape[1]])
    return model(hidden_states=noisy, timestep=t, encoder_hidden_states=text, img_shapes=[shapes], return_dict=False)[0]


def _train_step(impl: str, blocks: int, x, device, dtype, rank: int):
    import torch

    model = _model(impl, blocks, device, dtype).train()
    if impl == "ours":
        from musubi_tuner.networks.lora_qwen_image import create_network

        net = create_network(1.0, rank, rank, None, None, model)
        net.apply_to(None, model)
        params = list(net.parameters())
    elif impl == "musubi":
        from musubi_tuner.networks.lora_qwen_image import create_arch_network

        net = create_arch_network(1.0, rank, rank, None, None, model)
        net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
        net.to(device, dtype)
        params = [p for p in net.parameters()]
    else:
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=True))
        params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        out = _forward(impl, model, x)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def _denoise_step(impl: str, blocks: int, x, device, dtype):
    import torch

    model = _model(impl, blocks, device, dtype).eval()

    def step():
        with torch.inference_mode():
            _forward(impl, model, x)

    return step, 0


def worker(a) -> None:
    import torch

    if a.impl == "musubi":
        sys.path.insert(0, str(Path(a.musubi) / "src"))
    else:
        sys.path.insert(0, str(SRC))
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = _inputs(a.size, a.txt, device, dtype)
    if a.task == "train":
        step, n = _train_step(a.impl, a.blocks, x, device, dtype, a.rank)
    else:
        step, n = _denoise_step(a.impl, a.blocks, x, device, dtype)
    step()  # warm-up
    print("@@", json.dumps({"ready": True, "trainable": n}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print("@@", json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


LOAD = r"""
import json, sys, time, torch
impl, path, src, blocks, device = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, src)
if device == "cuda":
    torch.zeros(1, device="cuda")
if impl == "musubi":
    from musubi_tuner.qwen_image.qwen_image_model import load_qwen_image_model
else:
    from musubi_tuner.qwen_image.dit import load_dit
    from musubi_tuner.models.registry import VERSIONS
t0 = time.perf_counter()
if impl == "musubi":
    m = load_qwen_image_model(device, path, "torch", False, False, False, False, device, torch.bfloat16,
                              num_layers=blocks)
else:
    m = load_dit(path, VERSIONS["original"], torch.bfloat16, device=device)
if device == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


# the parent: start both sides, alternate, compare ------------------------------------------------------------------

class Side:
    def __init__(self, impl: str, a, task: str):
        cmd = [sys.executable, __file__, "--worker", impl, "--task", task, "--musubi", a.musubi, "--blocks",
               str(a.blocks), "--size", str(a.size), "--txt", str(a.txt), "--rank", str(a.rank), "--threads",
               str(a.threads), "--device", a.device]
        self.impl = impl
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        while True:  # the packages print their own lines too; the worker's answers start with @@
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"the {self.impl} worker failed (its error is above)")
            if line.startswith("@@ "):
                return json.loads(line[3:])

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def race(a, task: str, impls: list[str]) -> dict[str, float]:
    sides = [Side(i, a, task) for i in impls]
    times = {s.impl: [] for s in sides}
    try:
        for _ in range(a.repeats):
            for s in sides:
                times[s.impl].append(s.step())
    finally:
        for s in sides:
            s.close()
    params = {s.impl: s.info["trainable"] for s in sides}
    if task == "train":
        print("trainable LoRA parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in params.items()))
    return {k: statistics.median(v) for k, v in times.items()}


def race_load(a) -> dict[str, float]:
    sys.path.insert(0, str(SRC))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from load import make_checkpoint

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "dit_bf16.safetensors"
        size = make_checkpoint(path, a.blocks)
        print(f"load: {size / 2**30:.2f} GiB bf16 file ({a.blocks} full-width blocks)")
        times = {"ours": [], "musubi": []}
        for _ in range(a.repeats):
            for impl, src in (("ours", str(SRC)), ("musubi", str(Path(a.musubi) / "src"))):
                r = subprocess.run([sys.executable, "-c", LOAD, impl, str(path), src, str(a.blocks), a.device],
                                   capture_output=True, text=True, timeout=1800)
                if r.returncode:
                    raise SystemExit(f"{impl} load failed: {r.stderr[-500:]}")
                times[impl].append(json.loads(r.stdout.strip().splitlines()[-1])["seconds"])
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--musubi", required=True, help="a checkout of kohya-ss/musubi-tuner")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--txt", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads per side (default: all cores)")
    p.add_argument("--tasks", default="train,denoise,load")
    p.add_argument("--worker", choices=["ours", "musubi", "diffusers+peft"], help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads is None:
        import os

        a.threads = os.cpu_count() or 1
    if a.worker:
        a.impl = a.worker
        return worker(a)
    if not (Path(a.musubi) / "src" / "musubi_tuner" / "qwen_image").is_dir():
        raise SystemExit(f"--musubi {a.musubi}: not a musubi-tuner checkout (no src/musubi_tuner/qwen_image)")
    print(f"{a.blocks} full-width blocks, {a.size}x{a.size} image ({(a.size // 16) ** 2} tokens), {a.txt} text tokens, "
          f"rank {a.rank}, {a.device}, {a.threads} threads, median of {a.repeats} alternating runs")
    rows = []
    tasks = a.tasks.split(",")
    if "train" in tasks:
        med = race(a, "train", ["ours", "musubi", "diffusers+peft"])
        rows.append(("LoRA training step", med["ours"], med["musubi"], med["diffusers+peft"]))
    if "denoise" in tasks:
        med = race(a, "denoise", ["ours", "musubi"])
        rows.append(("denoising step", med["ours"], med["musubi"], None))
    if "load" in tasks:
        med = race_load(a)
        rows.append(("DiT load (bf16)", med["ours"], med["musubi"], None))
    print(f"\n{'row':<22}{'ours s':>9}{'musubi s':>10}{'ours/musubi':>13}{'ours/diffusers+peft':>21}")
    for name, ours, musubi, ref in rows:
        r = f"{ours / ref:>21.3f}" if ref else f"{'':>21}"
        print(f"{name:<22}{ours:>9.3f}{musubi:>10.3f}{ours / musubi:>13.3f}{r}")


if __name__ == "__main__":
    main()
