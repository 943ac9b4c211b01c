"""python -m musubi_tuner.nano build --output DIR [--quick] [--versions original edit-2509 edit-2511 layered]
python -m musubi_tuner.nano dataset --output DIR [--version original|edit-2511|layered]

build: rebuilds the nano models from scratch (see musubi_tuner.nano.build) and prints the scores; an interrupted build
resumes: run the same command again. dataset: writes a dataset of the shapes world with its dataset.toml, to cache and
train a LoRA on (docs/first_lora.md)."""

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from musubi_tuner.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m musubi_tuner.nano", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="rebuild every nano model file")
    b.add_argument("--output", required=True, help="folder for the files (and a work/ folder of datasets, caches)")
    b.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test, not the models)")
    b.add_argument("--versions", nargs="*", default=["original", "edit-2509", "edit-2511", "layered"],
                   help="which DiTs (none: the text encoder and VAEs only)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    d = sub.add_parser("dataset", help="write a training dataset of the shapes world (the demo's) with its "
                       "dataset config, to cache and train on with the scripts (docs/first_lora.md)")
    d.add_argument("--version", choices=["original", "edit-2511", "layered"], default="original",
                   help="original: purple shapes; edit-2511: 'make it large' edits; layered: diamonds in layers")
    d.add_argument("--output", required=True, help="folder for the images, captions, caches and dataset.toml")
    d.add_argument("--items", type=int, default=48, help="examples of the new concept (as many known ones beside)")
    d.add_argument("--batch_size", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    return p


def write_dataset(args) -> Path:
    from musubi_tuner.errors import UserError
    from musubi_tuner.nano.build import set_batch_size
    from musubi_tuner.nano.stories import STORIES

    if args.items < 1 or args.batch_size < 1:
        raise UserError("--items and --batch_size must be at least 1")
    toml = STORIES[args.version].write_dataset(Path(args.output).resolve(), args.items, args.seed)
    set_batch_size(toml, args.batch_size)
    print(f"dataset config: {toml}")
    return toml


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "dataset":
        return write_dataset(args)
    import torch

    from musubi_tuner.nano.build import Plan, build

    if args.threads:
        torch.set_num_threads(args.threads)

    logging.getLogger().setLevel(logging.INFO)
    info = build(Path(args.output), Plan.quick() if args.quick else Plan(), tuple(args.versions))
    print(json.dumps(info["scores"], indent=2))
    print(f"seconds: {info['seconds']}")
    return info


if __name__ == "__main__":
    main()
