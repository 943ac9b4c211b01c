"""Generate images with Qwen-Image (text-to-image), Edit / Edit-2509 / Edit-2511 (editing, inpainting, RCM) and
Layered (RGBA layer decomposition). Run `python src/musubi_tuner/qwen_image_generate_image.py --help`."""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package from src/, not this folder's siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from musubi_tuner import cli_options as opts  # noqa: E402
from musubi_tuner.errors import cli_main  # noqa: E402
from musubi_tuner.memory.attention import ATTN_BACKENDS  # noqa: E402



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=opts.HelpFormatter)
    opts.add_model_args(p)
    opts.add_num_layers_arg(p)
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", help="prompt text (layered: leave it out to caption the image automatically)")
    g.add_argument("--negative_prompt", default=None, help="negative prompt for CFG (default: ' ')")
    opts.add_caption_args(g)
    g.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="height and width, multiples of 16 (default 1024 1024; edit/layered: from the first control)")
    g.add_argument("--infer_steps", type=int, default=None, help="number of denoising steps (default 25; 2.1: the "
                   "checkpoint's sample_sigmas, else 40)")
    g.add_argument("--guidance_scale", type=float, default=None, help="true CFG scale (1 disables CFG; default 4.0, "
                   "2.1: 1.0, the pipeline samples without CFG)")
    g.add_argument("--flow_shift", type=float, default=None, help="static shift; default: dynamic shift by image size")
    g.add_argument("--embedded_cfg_scale", type=float, action=opts.Inert, why="Qwen-Image has no embedded "
                   "(distilled) guidance; --guidance_scale is its CFG")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    g.add_argument("--from_file", help="prompt file, one prompt per line with --w --h --d --s --g/--l --fs --n --ci "
                                       "--f --rcm_th --rcm_rel_th --rcm_ks --rcm_ds")
    g.add_argument("--interactive", action="store_true", help="read prompt lines (with --w --h --d ... switches) from "
                   "the console and generate each; models stay loaded; Ctrl-D ends")
    g.add_argument("--attn_mode", choices=list(ATTN_BACKENDS), default="sdpa", help="attention implementation")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    o = p.add_argument_group("output")
    o.add_argument("--save_path", default=None, help="folder for the images / latents (required unless "
                   "--save_merged_model)")
    o.add_argument("--output_type", choices=["images", "latent", "latent_images"], default="images")
    o.add_argument("--latent_path", nargs="*", help="decode these saved latent files only (no DiT / text encoder)")
    o.add_argument("--no_metadata", action="store_true", help="write images and latent files without the prompt, "
                   "seed and settings in their metadata")
    o.add_argument("--bell", action="store_true", help="ring the terminal bell when done (interactive: after each "
                   "image)")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora_weight", nargs="*", help="LoRA files to merge (kohya or diffusers lora_A/B format)")
    lo.add_argument("--lora_multiplier", type=float, nargs="*", help="one multiplier, or one per LoRA (default 1.0)")
    lo.add_argument("--lycoris", action=opts.Inert, why="LoHa and LoKr files are read and merged without the "
                    "LyCORIS library")
    lo.add_argument("--include_patterns", nargs="*", default=None,
                    help="merge only the LoRA keys one of these regexes finds (re.search on the file's keys)")
    lo.add_argument("--exclude_patterns", nargs="*", default=None, help="do not merge LoRA keys these regexes find")
    lo.add_argument("--save_merged_model", default=None, metavar="FILE",
                    help="merge the LoRAs into the DiT, save it to FILE (.safetensors, in the DiT's precision) and stop "
                         "(no generation)")
    m = p.add_argument_group("memory")
    m.add_argument("--text_encoder_cpu", action="store_true", help="run the text encoder on the CPU")
    m.add_argument("--fp8", action="store_true", help="DiT block weights in float8_e4m3fn (as --fp8_base in training; "
                   "--fp8_scaled is more accurate)")
    opts.add_vae_args(p)
    opts.add_memory_args(p)
    e = p.add_argument_group("edit / layered / inpainting")
    e.add_argument("--control_image_path", nargs="*", help="control image(s) for edit (2509/2511: several, of any "
                   "size); the image to decompose for layered; 2.1: condition images")
    e.add_argument("--output_resolution", type=int, default=1024, help="2.1: the side of the square output and the "
                   "area (side^2) that condition images and an output without --image_size are resized to")
    e.add_argument("--no_kv_cache", action="store_true", help="2.1: recompute the text and condition-image tokens at "
                   "every step instead of caching their keys and values after the first (same image within rounding, "
                   "slower)")
    e.add_argument("--resize_control_to_official_size", action="store_true",
                   help="resize control images to ~1M pixels keeping aspect (recommended; expected by 2511)")
    e.add_argument("--resize_control_to_image_size", action="store_true",
                   help="resize control images to --image_size (recommended for layered)")
    e.add_argument("--append_original_name", action="store_true",
                   help="append the first control image's base name to the output file name")
    e.add_argument("--output_layers", type=int, default=None, help="layered: number of layers (N+1 images are "
                   "written: ..._composite.png and ..._layer1.png ...; default 4)")
    e.add_argument("--remove_first_image_from_target", action="store_true", help="layered: the model (or LoRA) "
                   "was trained without the composite, so every output frame is a layer (read from a LoRA's "
                   "metadata when it records it)")
    e.add_argument("--mask_path", help="inpainting mask: white = change, black = keep (edit versions)")
    e.add_argument("--rcm_threshold", type=float, default=None, help="enable the Reference Consistency Mask with "
                   "this difference threshold (absolute ~0.01-0.1, relative ~0.1-0.5)")
    e.add_argument("--rcm_relative_threshold", action="store_true", help="--rcm_threshold is relative to the "
                   "step's maximum difference")
    e.add_argument("--rcm_kernel_size", type=int, default=3, help="Gaussian blur kernel before thresholding")
    e.add_argument("--rcm_dilate_size", type=int, default=0, help="dilate the change region by this many latent px")
    e.add_argument("--rcm_debug_save", action="store_true", help="save each step's RCM mask as PNG")
    return p


@cli_main
def main(argv=None):
    args = opts.parse_args(build_parser(), argv)
    version = opts.version_from_args(args)
    from musubi_tuner.generation.pipeline import run

    return run(args, version)


if __name__ == "__main__":
    main()
