"""python -m musubi_tuner.nano build --output DIR [--quick] [--versions original edit-2509 edit-2511 layered]

Rebuilds the nano models from scratch (see musubi_tuner.nano.build) and prints the scores. An interrupted build
resumes: run the same command again."""

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
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
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
