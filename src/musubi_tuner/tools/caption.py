"""Captions for a folder of images with Qwen2.5-VL, the model that is Qwen-Image's text encoder (musubi-tuner's
caption_images_by_qwen_vl.py): a `.txt` beside each image (`--output_format text`) or one JSONL file that a dataset
config's `image_jsonl_file` reads.

As musubi-tuner: its annotator prompt (or `--prompt`, `\\n` for line breaks), the image resized to a multiple of 28
pixels between 256² and `--max_size`² pixels (the nearest aspect-ratio bucket, resized and centre-cropped as the
dataset does), greedy decoding (Qwen2.5-VL-Instruct's generation settings) of at most `--max_new_tokens`. The model
file may be a transformers folder or a single file that keeps `lm_head.weight` (ComfyUI's text-encoder file leaves it
out and cannot caption: checked from the header first). Images that already have a caption (a `.txt`, or an entry in
the JSONL) are skipped unless `--overwrite`; every caption is written as soon as it exists (atomically), so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import UserError
from ..fileio import atomic_path, check_writable_folder

logger = logging.getLogger(__name__)

IMAGE_FACTOR = 28
DEFAULT_MAX_SIZE = 1280
DEFAULT_MAX_NEW_TOKENS = 1024
DEFAULT_PROMPT = """# Image Annotator
You are a professional image annotator. Please complete the following task based on the input image.
## Create Image Caption
1. Write the caption using natural, descriptive text without structured formats or rich text.
2. Enrich caption details by including: object attributes, vision relations between objects, and environmental details.
3. Identify the text visible in the image, without translation or explanation, and highlight it in the caption with quotation marks.
4. Maintain authenticity and accuracy, avoid generalizations."""


def chat_text(prompt: str) -> str:
    """Qwen2.5-VL's chat template for one user turn of an image then the prompt (what the processor's
    apply_chat_template makes of [{"type": "image"}, {"type": "text", "text": prompt}])."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")


def caption_size(size: tuple[int, int], max_size: int = DEFAULT_MAX_SIZE) -> tuple[int, int]:
    """musubi-tuner's bucket for the VL model: sides multiples of 28, area between 256² and max_size², the candidate
    of nearest aspect ratio."""
    f, min_area, max_area = IMAGE_FACTOR, 256 * 256, max_size * max_size
    width, height = size
    w, h = int(width / f + 0.5) * f, int(height / f + 0.5) * f
    if w * h < min_area:
        s = math.sqrt(min_area / (w * h))
        nw, nh = math.ceil(width * s / f) * f, math.ceil(height * s / f) * f
        candidates = [(nw, nh), (nw + f, nh), (nw, nh + f)]
    elif w * h > max_area:
        s = math.sqrt(max_area / (w * h))
        nw, nh = math.floor(width * s / f) * f, math.floor(height * s / f) * f
        candidates = [(nw, nh), (nw - f, nh), (nw, nh - f)]
    else:
        candidates = [(w, h), (w - f, h), (w, h - f), (w + f, h), (w, h + f)]
    candidates = [(a, b) for a, b in candidates if min_area <= a * b <= max_area] or candidates[:1]
    return min(candidates, key=lambda c: abs(c[0] / c[1] - width / height))


def read_jsonl(path: Path) -> dict[str, str]:
    """image path -> caption of an existing JSONL (a broken last line of a killed writer is ignored)."""
    out = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            out[str(entry["image_path"])] = str(entry["caption"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


class Captioner:
    """The VL model with its processor, loaded once."""

    def __init__(self, model_path: str, tokenizer: str | None, device, fp8_vl: bool, max_size: int):
        from ..qwen_image.text_encoder import load_processor, load_text_encoder, load_tokenizer

        self.device = device
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        self.processor = load_processor(load_tokenizer(tokenizer, model_path), tokenizer, model_path)
        self.model = load_text_encoder(model_path, dtype, device)
        if fp8_vl:
            from ..memory.fp8 import quantize_text_encoder

            quantize_text_encoder(self.model, device)
        self.max_size = max_size

    @torch.no_grad()
    def __call__(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
        from ..dataset.buckets import resize_crop
        from ..qwen_image.captioning import generation_settings

        image = resize_crop(image, caption_size(image.size, self.max_size))
        inputs = {k: v.to(self.device) for k, v in self.processor(chat_text(prompt), [image]).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens,
                                  **generation_settings(self.model, self.processor.tokenizer))
        new = ids[0, inputs["input_ids"].shape[1]:]
        return self.processor.tokenizer.decode(new, skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False).strip()


def caption_folder(image_dir: str, model_path: str, output_file: str | None = None, output_format: str = "jsonl",
                   prompt: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   max_size: int = DEFAULT_MAX_SIZE, fp8_vl: bool = False, tokenizer: str | None = None,
                   overwrite: bool = False, caption_extension: str = ".txt", device: str | None = None) -> dict:
    from ..dataset.items import IMAGE_EXTS, images_in, load_image
    from ..qwen_image.captioning import check_caption_model

    folder = Path(image_dir)
    if not folder.is_dir():
        raise UserError(f"--image_dir {image_dir} is not a folder")
    if output_format == "jsonl" and not output_file:
        raise UserError("--output_format jsonl needs --output_file FILE.jsonl (or use --output_format text)")
    if max_new_tokens < 1 or max_size < 256:
        raise UserError("--max_new_tokens must be at least 1 and --max_size at least 256")
    images = images_in(folder)
    if not images:
        raise UserError(f"--image_dir {image_dir}: no images ({', '.join(sorted(IMAGE_EXTS))})")
    check_caption_model(model_path, "--model_path")
    prompt = (prompt or DEFAULT_PROMPT).replace("\\n", "\n")
    existing: dict[str, str] = {}
    if output_format == "jsonl":
        out = Path(output_file)
        check_writable_folder(out.parent if str(out.parent) else Path("."), "--output_file")
        existing = {} if overwrite else read_jsonl(out)
        todo = [p for p in images if str(p.resolve()) not in existing]
    else:
        check_writable_folder(folder, "--image_dir")
        todo = [p for p in images if overwrite or not p.with_suffix(caption_extension).is_file()]
    skipped = len(images) - len(todo)
    if skipped:
        logger.info("%d image(s) already captioned are skipped (--overwrite captions them again)", skipped)
    if not todo:
        print(f"every image in {folder} is captioned already")
        return {"captioned": 0, "skipped": skipped}
    from ..dataset.prepare import image_size

    for path in todo:  # every file is an image it can read (its header), before the model loads
        image_size(path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    captioner = Captioner(model_path, tokenizer, dev, fp8_vl, max_size)
    done = {}
    for path in tqdm(todo, desc="captioning", unit="image"):
        text = captioner(load_image(path, "RGB"), prompt, max_new_tokens)
        done[str(path.resolve())] = text
        if output_format == "jsonl":
            entries = {**existing, **done}
            with atomic_path(Path(output_file)) as tmp:
                tmp.write_text("".join(json.dumps({"image_path": k, "caption": v}, ensure_ascii=False) + "\n"
                                       for k, v in entries.items()), encoding="utf-8")
        else:
            with atomic_path(path.with_suffix(caption_extension)) as tmp:
                tmp.write_text(text + "\n", encoding="utf-8")
    where = output_file if output_format == "jsonl" else f"{caption_extension} files beside the images"
    print(f"{len(done)} caption(s) written to {where}")
    return {"captioned": len(done), "skipped": skipped, "captions": done}
