"""Train a LoRA (or any kohya-style network module) for Qwen-Image / Edit / Edit-2509 / Edit-2511 / Layered."""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package from src/, not this folder's siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from musubi_tuner import cli_options as opts  # noqa: E402
from musubi_tuner.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=opts.HelpFormatter)
    opts.add_training_args(p)
    n = p.add_argument_group("network")
    n.add_argument("--network_module", default="networks.lora_qwen_image", help="network module import path")
    n.add_argument("--network_dim", type=int, default=4, help="LoRA rank")
    n.add_argument("--network_alpha", type=float, default=1.0, help="LoRA alpha (scale = alpha / rank)")
    n.add_argument("--network_dropout", type=float, default=None, help="dropout on the LoRA hidden (neurons)")
    n.add_argument("--network_args", nargs="*", default=[], help="key=value network arguments (exclude_patterns=..., "
                   "include_patterns=..., rank_dropout=..., module_dropout=..., loraplus_lr_ratio=...)")
    n.add_argument("--network_weights", help="continue training this LoRA file")
    n.add_argument("--dim_from_weights", action="store_true", help="take ranks/alphas from --network_weights")
    return p


@cli_main
def main(argv=None):
    args = opts.parse_args(build_parser(), argv)
    from musubi_tuner.training.lora import LoraMode
    from musubi_tuner.training.trainer import run_training

    return run_training(args, LoraMode())


if __name__ == "__main__":
    main()
