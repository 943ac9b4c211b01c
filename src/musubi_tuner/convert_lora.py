"""Convert a Qwen-Image LoRA between key formats (kohya `lora_unet_*` <-> diffusers `diffusion_model.` /
`transformer.` lora_A/B), keeping ranks, alphas and metadata.

    python src/musubi_tuner/convert_lora.py --input lora.safetensors --output lora_diffusers.safetensors --target diffusers
"""

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package from src/, not this folder's siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from musubi_tuner.errors import UserError, cli_main  # noqa: E402

TARGETS = {"kohya": "kohya", "diffusers": "diffusion_model", "transformer": "transformer"}


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="LoRA file in any supported format")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--target", choices=list(TARGETS), required=True,
                   help="kohya (lora_unet_*, default of the trainer), diffusers (diffusion_model.* lora_A/B + alpha, "
                        "loads in diffusers and ComfyUI) or transformer (transformer.* lora_A/B, alpha folded in)")
    args = p.parse_args(argv)
    import torch
    from safetensors import safe_open

    from musubi_tuner.networks.lora_files import canonical_lora, save_lora
    from musubi_tuner.models.registry import lora_family
    from musubi_tuner.qwen_image.model_files import expect
    from musubi_tuner.qwen_image.weights import load_tensors

    if Path(args.output).resolve() == Path(args.input).resolve():
        raise UserError("--output must differ from --input")
    files = expect(args.input, "--input", "lora").files
    state = load_tensors(files, None)
    with safe_open(str(files[0]), "pt") as f:
        metadata = f.metadata() or {}
    blocks = [int(m[1]) for k in state if (m := re.search(r"transformer_blocks[._](\d+)[._]", k))]
    num_layers = max(blocks, default=0) + 1
    names = lora_family(metadata, state).linear_names(num_layers)
    lora = canonical_lora(state, names, source=args.input)
    dtype = next(iter(state.values())).dtype
    save_lora(lora, args.output, TARGETS[args.target], {**metadata, "converted_to": args.target},
              dtype if dtype != torch.float32 else None)
    print(f"wrote {args.output}: {len(lora)} modules, format {args.target}")
    return Path(args.output)


if __name__ == "__main__":
    main()
