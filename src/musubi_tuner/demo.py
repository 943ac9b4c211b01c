"""The main job on the embedded default: a tiny Qwen-Image-architecture model made on the spot (no download),
then text-to-image generation with the real command-line entry point.

    python -m musubi_tuner.demo [--output outputs/demo]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .errors import cli_main
from .qwen_image.tiny import write_tiny_models


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="outputs/demo", help="folder for the tiny models and the images")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = p.parse_args(argv)
    out = Path(args.output)
    models = write_tiny_models(out / "models")
    print(f"tiny model set: {out / 'models'}")

    from .qwen_image_generate_image import main as generate

    t0 = time.perf_counter()
    argv = ["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder", str(models["text_encoder"]),
            "--prompt", "a red circle on a white background", "--negative_prompt", " ", "--image_size", "256", "256",
            "--infer_steps", "20", "--guidance_scale", "4.0", "--seed", "42", "--save_path", str(out / "images")]
    if args.device:
        argv += ["--device", args.device]
    saved = generate(argv)
    print(f"generated {len(saved)} image(s) in {time.perf_counter() - t0:.1f}s:")
    for s in saved:
        print(f"  {s}")
    return saved


if __name__ == "__main__":
    main()
