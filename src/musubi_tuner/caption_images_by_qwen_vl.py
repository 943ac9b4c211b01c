"""Caption a folder of images with Qwen2.5-VL (Qwen-Image's text encoder with its language-model head), as
musubi-tuner's caption_images_by_qwen_vl.py: a JSONL for `image_jsonl_file`, or a .txt beside each image.

    python src/musubi_tuner/caption_images_by_qwen_vl.py --image_dir images --model_path qwen_2.5_vl_7b \
        --output_format text
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
    p.add_argument("--image_dir", required=True, help="folder of images (its top level)")
    p.add_argument("--model_path", required=True, help="Qwen2.5-VL: a transformers folder or a single file with "
                   "lm_head.weight")
    p.add_argument("--tokenizer", default=None, help="tokenizer / processor folder (default: beside the model)")
    p.add_argument("--output_file", default=None, help="the JSONL to write (--output_format jsonl)")
    p.add_argument("--output_format", choices=["jsonl", "text"], default="jsonl",
                   help="jsonl: one file of {image_path, caption}; text: a caption file beside each image")
    p.add_argument("--caption_extension", default=".txt", help="extension of the caption files (text format)")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="longest caption, in tokens")
    p.add_argument("--prompt", default=None, help="instruction for the model (\\n for line breaks; default: "
                   "musubi-tuner's image-annotator prompt)")
    p.add_argument("--max_size", type=int, default=1280, help="images are resized to at most this squared, in pixels")
    p.add_argument("--fp8_vl", action="store_true", help="fp8 weights for the VL model (less memory)")
    p.add_argument("--overwrite", action="store_true", help="caption images that already have a caption again")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return p


@cli_main
def main(argv=None):
    args = opts.parse_args(build_parser(), argv)
    from musubi_tuner.tools.caption import caption_folder

    return caption_folder(args.image_dir, args.model_path, args.output_file, args.output_format, args.prompt,
                          args.max_new_tokens, args.max_size, args.fp8_vl, args.tokenizer, args.overwrite,
                          args.caption_extension, args.device)


if __name__ == "__main__":
    main()
