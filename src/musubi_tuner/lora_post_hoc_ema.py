"""Post-hoc EMA of a run's LoRA checkpoints into one smoother LoRA (musubi-tuner's lora_post_hoc_ema.py).

    python src/musubi_tuner/lora_post_hoc_ema.py OUT/name-step*.safetensors --beta 0.95 --output_file ema.safetensors
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package from src/, not this folder's siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from musubi_tuner import cli_options as opts  # noqa: E402
from musubi_tuner.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=opts.HelpFormatter)
    p.add_argument("path", nargs="+", help="the LoRA checkpoints of one run")
    p.add_argument("--no_sort", action="store_true", help="take the files in the given order (default: oldest first, "
                   "by modification time)")
    p.add_argument("--beta", type=float, default=0.95, help="EMA decay for each file")
    p.add_argument("--beta2", type=float, default=None, help="with --beta: the decay goes linearly from --beta (first "
                   "file) to this (last file)")
    p.add_argument("--sigma_rel", type=float, default=None, help="power-function EMA of this relative width "
                   "(Karras et al. 2023; e.g. 0.05 to 0.2) instead of --beta")
    p.add_argument("--output_file", required=True, help="the averaged LoRA (.safetensors)")
    return p


@cli_main
def main(argv=None):
    args = opts.parse_args(build_parser(), argv)
    from musubi_tuner.tools.post_hoc_ema import post_hoc_ema

    return post_hoc_ema(args.path, args.output_file, args.beta, args.beta2, args.sigma_rel, args.no_sort)


if __name__ == "__main__":
    main()
