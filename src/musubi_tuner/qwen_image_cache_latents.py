"""Cache VAE latents of a dataset (targets; control images for edit; all layers for layered)."""

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
    opts.add_model_args(p, dit=False, text_encoder=False)
    opts.add_vae_args(p)
    opts.add_latent_cache_compat_args(p)
    p.add_argument("--debug_mode", choices=["image", "console", "video"], default=None, help="show the prepared "
                   "dataset instead of caching it: console prints bucket and sizes per item, image writes the "
                   "prepared pictures to <cache_directory>/debug/, video (musubi-tuner's name) writes each prepared "
                   "image as <cache name>.jpg beside where its cache goes")
    return p


@cli_main
def main(argv=None):
    args = opts.parse_args(build_parser(), argv)
    opts.require(args, "dataset_config", *(() if args.debug_mode else ("vae",)))
    from musubi_tuner.dataset.caching import cache_latents

    return cache_latents(args, opts.version_from_args(args))


if __name__ == "__main__":
    main()
