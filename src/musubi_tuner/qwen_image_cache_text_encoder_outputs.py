"""Cache Qwen2.5-VL text-encoder outputs of a dataset's captions (with control images for edit versions)."""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package from src/, not this folder's siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from musubi_tuner import cli_options as opts  # noqa: E402
from musubi_tuner.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=opts.HelpFormatter)
    opts.add_dataset_args(p)
    opts.add_model_args(p, dit=False, vae=False)
    p.add_argument("--fp8_vl", action="store_true", help="fp8 weights for the text encoder (less VRAM)")
    return p


@cli_main
def main(argv=None):
    args = opts.parse_args(build_parser(), argv)
    opts.require(args, "dataset_config", "text_encoder")
    from musubi_tuner.dataset.caching import cache_text_encoder_outputs

    return cache_text_encoder_outputs(args, opts.version_from_args(args))


if __name__ == "__main__":
    main()
