"""The main job on the embedded default, end to end with the real entry points and no download:

1. a tiny Qwen-Image-architecture model set (DiT, VAE, Qwen2.5-VL text encoder, tokenizer) is generated;
2. a small dataset of coloured shapes with captions is generated;
3. latents and text-encoder outputs are cached;
4. a LoRA is trained;
5. images are generated before and after, with the same prompt and seed.

    python -m musubi_tuner.demo [--output outputs/demo] [--steps 200]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .errors import cli_main
from .qwen_image.tiny import write_tiny_models


def command_line(module: str, argv: list[str]) -> str:
    """The command a user can paste to run the same step: the script path when run from the repository, else the
    module."""
    import shlex

    script = Path("src/musubi_tuner") / (module.rsplit(".", 1)[-1] + ".py")
    head = ["python", str(script)] if script.is_file() else ["python", "-m", module]
    return shlex.join(head + argv)


def _run(title: str, fn, argv: list[str]):
    print(f"\n== {title}\n   {command_line(fn.__module__, argv)}", flush=True)
    return fn(argv)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="outputs/demo", help="folder for models, data, caches, LoRA and images")
    p.add_argument("--steps", type=int, default=200, help="LoRA training steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    from .dataset.synthetic import write_shapes_dataset
    from .qwen_image_cache_latents import main as cache_latents
    from .qwen_image_cache_text_encoder_outputs import main as cache_text
    from .qwen_image_generate_image import main as generate
    from .qwen_image_train_network import main as train

    out = Path(args.output)
    models = write_tiny_models(out / "models")
    data = write_shapes_dataset(out / "data", n=8, size=(64, 64), colours=["red"])
    toml = out / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [64, 64]\nbatch_size = 2\ncaption_extension = ".txt"\n\n'
                    f'[[datasets]]\nimage_directory = "{data}"\ncache_directory = "{out / "cache"}"\nnum_repeats = 1\n')
    print(f"tiny models: {out / 'models'}\ndataset: {data} (8 images, config {toml})")
    dev = ["--device", args.device]
    _run("cache latents", cache_latents, ["--dataset_config", str(toml), "--vae", str(models["vae"]), *dev,
                                          "--skip_existing"])
    _run("cache text-encoder outputs", cache_text, ["--dataset_config", str(toml), "--text_encoder",
                                                    str(models["text_encoder"]), *dev, "--skip_existing"])
    prompts = out / "sample_prompts.txt"
    prompts.write_text("a red circle on a white background --w 64 --h 64 --s 20 --d 7 --l 1.0\n")
    result = _run("train LoRA", train, [
        "--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder", str(models["text_encoder"]),
        "--dataset_config", str(toml), "--output_dir", str(out / "lora"), "--output_name", "demo_lora",
        "--network_module", "networks.lora_qwen_image", "--network_dim", "16", "--network_alpha", "16",
        "--learning_rate", "1e-2", "--timestep_sampling", "uniform", "--max_train_steps", str(args.steps),
        "--save_every_n_steps", str(max(1, args.steps // 2)), "--sample_prompts", str(prompts),
        "--sample_every_n_steps", str(max(1, args.steps // 2)), "--sample_at_first", "--seed", "42",
        "--max_data_loader_n_workers", "0", "--overwrite", *dev])
    gen = ["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder", str(models["text_encoder"]),
           "--prompt", "a red circle on a white background", "--image_size", "64", "64", "--infer_steps", "20",
           "--guidance_scale", "1.0", "--seed", "7", "--output_type", "latent_images", *dev]
    before = _run("generate without the LoRA", generate, gen + ["--save_path", str(out / "images" / "before")])
    after = _run("generate with the LoRA", generate, gen + ["--save_path", str(out / "images" / "after"),
                                                            "--lora_weight", str(result["final"])])

    losses = result["losses"]
    k = max(1, len(losses) // 10)
    print(f"\nDone in {time.perf_counter() - t0:.0f}s.")
    print(f"training loss: first {k} steps {sum(losses[:k]) / k:.3f} -> last {k} steps {sum(losses[-k:]) / k:.3f}")
    print(f"loss log: {result['loss_log']} (tensorboard: {result['logging_dir']})")
    print(f"LoRA: {result['final']}")
    print(f"samples during training: {result['sample_dir']}")
    import torch
    from safetensors.torch import load_file

    from .dataset.cache import read_latent_cache

    train = torch.stack([read_latent_cache(f)[0] for f in (out / "cache").glob("*_qi.safetensors")]).mean(0)
    dist = {tag: (load_file(str(next(f for f in files if f.suffix == ".safetensors")))["latent"] - train).pow(2).mean()
            for tag, files in (("before", before), ("after", after))}
    print(f"latent MSE to the mean training image: before {dist['before']:.3f} -> after {dist['after']:.3f}")
    print("images before / after:")
    for f in [f for f in before + after if f.suffix == ".png"]:
        print(f"  {f}")
    return {"before": before, "after": after, **result}


if __name__ == "__main__":
    main()
