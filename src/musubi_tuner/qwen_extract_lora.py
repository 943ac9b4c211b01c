"""Extract a LoRA from a Qwen-Image full finetune: the difference to its base model, per Linear weight, by truncated
SVD (musubi-tuner's qwen_extract_lora.py options).

    python src/musubi_tuner/qwen_extract_lora.py --model_org base.safetensors --model_tuned finetuned.safetensors \
        --save_to extracted.safetensors --dim 16
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
    p.add_argument("--model_org", required=True, help="the base DiT (single file or diffusers shards)")
    p.add_argument("--model_tuned", required=True, help="the finetuned DiT (e.g. qwen_image_train.py's output)")
    p.add_argument("--save_to", required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--dim", type=int, default=4, help="LoRA rank")
    p.add_argument("--device", default=None, help="where the SVDs run (e.g. cuda; default cpu)")
    p.add_argument("--clamp_quantile", type=float, default=0.99, help="clamp the factors at this quantile of their "
                   "values (1: no clamp)")
    p.add_argument("--save_precision", choices=["float", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16"],
                   default=None, help="dtype of the LoRA weights (default float32)")
    p.add_argument("--mem_eff_safe_open", action=opts.Inert, why="the weights are always read one pair at a time")
    p.add_argument("--no_metadata", action="store_true", help="write no metadata")
    return p


@cli_main
def main(argv=None):
    args = opts.parse_args(build_parser(), argv)
    from musubi_tuner.tools.extract import extract_lora

    return extract_lora(args.model_org, args.model_tuned, args.save_to, args.dim, args.device, args.save_precision,
                        args.clamp_quantile, args.no_metadata)


if __name__ == "__main__":
    main()
