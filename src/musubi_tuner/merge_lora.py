"""Merge LoRA / LoHa / LoKr files into a Qwen-Image DiT file (musubi-tuner's merge_lora.py options), written in the
input's layout: a single file stays a single file with its key names, diffusers shards become a folder of shards.

    python src/musubi_tuner/merge_lora.py --dit DIT --lora_weight a.safetensors b.safetensors \
        --lora_multiplier 1.0 0.5 --save_merged_model merged.safetensors
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
    g = p.add_argument_group("models")
    g.add_argument("--dit", required=True, help="the DiT: a single file or diffusers shards (folder or first shard)")
    g.add_argument("--model_version", choices=list(opts.VERSIONS), default=None,
                   help="original (default), edit, edit-2509, edit-2511, layered or 2.1")
    p.add_argument("--lora_weight", nargs="*", default=None, help="LoRA / LoHa / LoKr files to merge")
    p.add_argument("--lora_multiplier", type=float, nargs="*", default=None, help="one multiplier, or one per LoRA "
                   "(default 1.0)")
    p.add_argument("--include_patterns", nargs="*", default=None, help="merge only LoRA keys these regexes find")
    p.add_argument("--exclude_patterns", nargs="*", default=None, help="do not merge LoRA keys these regexes find")
    p.add_argument("--save_merged_model", required=True, help="the merged DiT: a .safetensors file (single-file input) "
                   "or a folder (diffusers shards)")
    p.add_argument("--save_precision", choices=["float", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16"],
                   default=None, help="dtype of the merged weights (default: the DiT file's)")
    p.add_argument("--fp8_scaled", action="store_true", help="write ComfyUI's scaled fp8 layout (fp8 Linear weights "
                   "with a per-layer scale_weight): half the size, for ComfyUI; single-file input only")
    p.add_argument("--device", type=str, action=opts.Inert, why="merging runs on the CPU as the weights stream in")
    p.add_argument("--dit_in_channels", type=int, action=opts.Inert, why="HunyuanVideo only")
    return p


@cli_main
def main(argv=None):
    args = opts.parse_args(build_parser(), argv)
    from musubi_tuner.models.registry import resolve_version
    from musubi_tuner.tools.merge import merge_into_dit

    version = resolve_version(args.model_version, False, False)
    return merge_into_dit(args.dit, args.lora_weight or [], args.lora_multiplier, args.save_merged_model, version,
                          args.save_precision, args.include_patterns, args.exclude_patterns, args.fp8_scaled)


if __name__ == "__main__":
    main()
