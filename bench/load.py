"""Load time and peak RSS of a multi-GB synthetic DiT checkpoint (ComfyUI layout, bf16, full-width blocks), side by
side in one run, each measurement in a fresh process with the file in the page cache:

- `cat FILE > /dev/null`: what the storage and page cache give;
- `load_file` + copying every tensor into the model (`load_state_dict` without assign): the plain way, touching every
  byte;
- ours, bf16 -> bf16 (`load_dit`: mapped file, tensors kept as copy-on-write views of the page cache);
- ours, bf16 -> fp8 scaled (`load_dit(fp8_mode="channel")`: quantised as the file streams) and `load_file` + the same
  quantisation after loading.

    python bench/load.py [--blocks 6] [--device cuda]     # 6 blocks ~ 3.9 GB
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

PROBE = r"""
import json, sys, time, torch
sys.path.insert(0, %r)
def rss(f):
    for line in open("/proc/self/status"):
        if line.startswith(f):
            return int(line.split()[1]) * 1024
from musubi_tuner.models.registry import VERSIONS
from musubi_tuner.memory.fp8 import quantize_linears
path, way, fp8, device = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
cuda = device == "cuda"
if cuda:
    torch.zeros(1, device="cuda")  # the CUDA context outside the timed part
if way == "load_file":  # imports outside the timed part, for both
    from safetensors.torch import load_file
    from diffusers import QwenImageTransformer2DModel
    from accelerate import init_empty_weights
    from safetensors import safe_open
else:
    from musubi_tuner.qwen_image.dit import load_dit
base = rss("VmRSS:")
t0 = time.perf_counter()
if way == "ours":
    model = load_dit(path, VERSIONS["original"], torch.bfloat16, device=device, fp8_mode="channel" if fp8 else None)
else:
    with safe_open(path, "pt") as f:
        n = 1 + max(int(k.split(".")[1]) for k in f.keys() if k.startswith("transformer_blocks."))
    with init_empty_weights():
        model = QwenImageTransformer2DModel(num_layers=n).to(torch.bfloat16)
    model.to_empty(device=device)  # bf16 memory, allocated (not yet touched)
    sd = load_file(path, device=device)
    model.load_state_dict(sd)  # copies every tensor into the model's memory
    del sd
    if fp8:
        quantize_linears(model)
if cuda:
    torch.cuda.synchronize()
sec = time.perf_counter() - t0
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
gpu = torch.cuda.max_memory_allocated() if cuda else 0
print(json.dumps({"seconds": sec, "peak_rss_growth": rss("VmHWM:") - base, "model_bytes": size, "peak_gpu": gpu}))
""" % SRC


def make_checkpoint(path: Path, blocks: int) -> int:
    import torch

    sys.path.insert(0, SRC)
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    from musubi_tuner.fileio import save_safetensors_streaming

    with init_empty_weights():
        model = QwenImageTransformer2DModel(num_layers=blocks)
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_safetensors_streaming(sd, path)
    return path.stat().st_size


def cat_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"cat '{path}' > /dev/null", shell=True, check=True)
    return time.perf_counter() - t0


def probe(path: Path, way: str, fp8: bool, device: str = "cpu") -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(path), way, "1" if fp8 else "0", device], capture_output=True,
                       text=True, timeout=1800)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-300:]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3, help="rounds; each figure is its best round")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="load into this device (cuda: the file "
                   "streams through pinned staging buffers and fp8 is quantised on the GPU)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "dit_bf16.safetensors"
        size = make_checkpoint(path, a.blocks)
        print(f"checkpoint: {size / 2**30:.2f} GiB ({a.blocks} full-width blocks), loading into {a.device}")
        runs = {"cat": [], "load_file+copy": [], "ours bf16": [], "load_file+copy fp8": [], "ours fp8": []}
        rss, gpu = {}, {}
        for _ in range(a.repeats):  # interleaved rounds, so that drift in the machine's load hits every row alike
            runs["cat"].append(cat_seconds(path))
            for name, way, fp8 in (("load_file+copy", "load_file", False), ("ours bf16", "ours", False),
                                   ("load_file+copy fp8", "load_file", True), ("ours fp8", "ours", True)):
                r = probe(path, way, fp8, a.device)
                if "error" in r:
                    print(f"{name}: error {r['error']}")
                    return
                runs[name].append(r["seconds"])
                rss[name] = min(rss.get(name, r["peak_rss_growth"]), r["peak_rss_growth"])
                gpu[name] = r["peak_gpu"]
        best = {k: min(v) for k, v in runs.items()}
        print(f"\n{'loader':<22}{'seconds':>9}{'GB/s':>7}{'peak RSS growth / bf16 file':>30}")
        for k, sec in best.items():
            r = f"{rss[k] / size:>30.2f}" if k in rss else f"{'':>30}"
            print(f"{k:<22}{sec:>9.2f}{size / sec / 1e9:>7.2f}{r}")
        print(f"\nbf16 -> bf16: ours / cat = {best['ours bf16'] / best['cat']:.2f} (goal <= 1.1), "
              f"ours / load_file+copy = {best['ours bf16'] / best['load_file+copy']:.2f} (goal <= 1), "
              f"peak RSS / model = {rss['ours bf16'] / size:.2f} (goal <= 1.05)")
        print(f"bf16 -> fp8 scaled: ours fp8 / ours bf16 = {best['ours fp8'] / best['ours bf16']:.2f} (goal <= 1.3), "
              f"ours fp8 / load_file+copy fp8 = {best['ours fp8'] / best['load_file+copy fp8']:.2f}, "
              f"peak RSS / bf16 file = {rss['ours fp8'] / size:.2f} (goal <= 0.6)")
        if a.device == "cuda":
            print("peak GPU memory / bf16 file: " + ", ".join(f"{k} {v / size:.2f}" for k, v in gpu.items()))


if __name__ == "__main__":
    main()
