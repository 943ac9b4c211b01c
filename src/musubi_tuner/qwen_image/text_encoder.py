"""Qwen2.5-VL text encoder: loading (ComfyUI single file or transformers folder), tokenizer, prompt templates and
prompt encoding into the DiT's `encoder_hidden_states`."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from PIL import Image
from accelerate import init_empty_weights
from transformers import AutoTokenizer, GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..errors import UserError
from .model_files import expect
from .weights import load_tensors

logger = logging.getLogger(__name__)

HUB_TOKENIZER = ("Qwen/Qwen-Image", "tokenizer")

_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image that meets the "
    "user's requirements while maintaining consistency with the original input where appropriate.<|im_end|>\n"
)
TEMPLATES = {
    "t2i": (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
        "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "edit": _EDIT_SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n",
    "edit_plus": _EDIT_SYSTEM + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
}
DROP_IDX = {"t2i": 34, "edit": 64, "edit_plus": 64}
MAX_TOKENS = 1024  # after the drop
PLUS_IMAGE_PREFIX = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def format_prompt(template: str, prompt: str, num_images: int = 0) -> str:
    if template == "edit_plus":
        prompt = "".join(PLUS_IMAGE_PREFIX.format(i + 1) for i in range(num_images)) + prompt
    return TEMPLATES[template].format(prompt)


# 7B defaults; the loader overrides what tensor shapes determine (so pruned or tiny files load too)
TEXT_HEAD_DIM = 128
VISION_HEAD_DIM = 80


def infer_te_config(shapes: dict[str, tuple[int, ...]]) -> Qwen2_5_VLConfig:
    layers = {int(k.split(".")[3]) for k in shapes if k.startswith("model.language_model.layers.")}
    vblocks = {int(k.split(".")[3]) for k in shapes if k.startswith("model.visual.blocks.")}
    vocab, hidden = shapes["model.language_model.embed_tokens.weight"]
    kv = shapes["model.language_model.layers.0.self_attn.k_proj.weight"][0]
    text = dict(
        hidden_size=hidden,
        vocab_size=vocab,
        num_hidden_layers=max(layers) + 1,
        intermediate_size=shapes["model.language_model.layers.0.mlp.gate_proj.weight"][0],
        num_attention_heads=hidden // TEXT_HEAD_DIM,
        num_key_value_heads=kv // TEXT_HEAD_DIM,
        max_position_embeddings=128000,
        rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        rms_norm_eps=1e-6,
    )
    vision = {}
    if vblocks:
        vhidden = shapes["model.visual.patch_embed.proj.weight"][0]
        depth = max(vblocks) + 1
        vision = dict(
            depth=depth,
            hidden_size=vhidden,
            intermediate_size=shapes["model.visual.blocks.0.mlp.gate_proj.weight"][0],
            num_heads=vhidden // VISION_HEAD_DIM,
            out_hidden_size=shapes["model.visual.merger.mlp.2.weight"][0],
            fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < depth] or [depth - 1],
        )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)


def _comfy_key(k: str) -> str | None:
    """ComfyUI / original Qwen2.5-VL single-file names -> transformers 5 names."""
    if k.startswith("model.language_model.") or k.startswith("model.visual."):
        return k
    if k.startswith("model."):
        return "model.language_model." + k[len("model."):]
    if k.startswith("visual."):
        return "model." + k
    if k.startswith("lm_head."):
        return k
    return None


def load_text_encoder(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    option: str = "--text_encoder",
) -> Qwen2_5_VLForConditionalGeneration:
    info = expect(path, option, "text_encoder")
    files = info.files
    cfg_dir = files[0].parent
    shapes = {nk: v for k, v in info.shapes.items() if (nk := _comfy_key(k)) is not None}
    if (cfg_dir / "config.json").exists():
        config = Qwen2_5_VLConfig.from_pretrained(cfg_dir)
    else:
        config = infer_te_config(shapes)
    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(config)
    state = load_tensors(files, dtype, device, key_map=_comfy_key)
    model.has_lm_head = "lm_head.weight" in state or bool(getattr(config, "tie_word_embeddings", False))
    if "lm_head.weight" not in state:  # tied or stripped: the encoder output does not use it (captioning does)
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    missing = set(model.state_dict().keys()) - state.keys()
    if missing:
        raise UserError(f"{option}: {files[0]} is missing {len(missing)} Qwen2.5-VL tensors (e.g. {sorted(missing)[0]})")
    model.load_state_dict(state, assign=True, strict=False)
    model.to(device)  # buffers created at init (e.g. rotary inv_freq) follow the weights
    model.generation_config_from_file = (cfg_dir / "generation_config.json").is_file()
    if model.generation_config_from_file:  # as from_pretrained reads it (automatic captions use it)
        model.generation_config = GenerationConfig.from_pretrained(cfg_dir)
    model.eval().requires_grad_(False)
    logger.info("loaded text encoder %s (%d layers, hidden %d)", files[0].name, config.text_config.num_hidden_layers,
                config.text_config.hidden_size)
    return model


def load_tokenizer(tokenizer: str | None, text_encoder: str | None = None):
    """--tokenizer PATH, else tokenizer files beside/inside the text encoder, else the hub id of FACTS.md."""
    candidates = []
    if tokenizer:
        candidates.append(Path(tokenizer))
    elif text_encoder:
        te = Path(text_encoder)
        te_dir = te if te.is_dir() else te.parent
        candidates += [te_dir, te_dir / "tokenizer", te_dir.parent / "tokenizer"]
    for c in candidates:
        if c.is_dir() and ((c / "tokenizer.json").exists() or (c / "vocab.json").exists()):
            return AutoTokenizer.from_pretrained(str(c))
        if c.is_dir() and (c / "tokenizer").is_dir():
            return AutoTokenizer.from_pretrained(str(c / "tokenizer"))
    if tokenizer:
        raise UserError(f"--tokenizer: {tokenizer} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    repo, sub = HUB_TOKENIZER
    try:
        return AutoTokenizer.from_pretrained(repo, subfolder=sub)
    except Exception as e:
        raise UserError(
            f"cannot load the tokenizer from the hub ({repo}, subfolder {sub}): {type(e).__name__}. When offline, "
            f"download that folder once and pass --tokenizer /path/to/tokenizer"
        ) from None


VL_AREA = {"edit": 1024 * 1024, "edit_plus": 384 * 384}  # pixels of each image shown to Qwen2.5-VL


def vl_image_size(size: tuple[int, int], template: str) -> tuple[int, int]:
    """(W, H) of a control image shown to the VL model: the template's area, aspect kept, multiples of 32."""
    w, h = size
    ratio = w / h
    width = math.sqrt(VL_AREA[template] * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


HUB_PROCESSOR = ("Qwen/Qwen-Image-Edit", "processor")


def processor_settings(folder: Path) -> dict | None:
    """The image-processor settings a model folder holds: `preprocessor_config.json` (flat), or the nested
    `image_processor` of `processor_config.json` (what transformers 5 writes)."""
    import json

    for name in ("preprocessor_config.json", "processor_config.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{f}: invalid JSON ({e})") from None
        if name == "processor_config.json":
            data = data.get("image_processor") if isinstance(data.get("image_processor"), dict) else None
        if data:
            return data
    return None


def processor_folders(tokenizer_path: str | None, text_encoder_path: str | None) -> list[Path]:
    """Where processor settings are looked for: --tokenizer, then beside the text encoder (as for the tokenizer)."""
    out = []
    if tokenizer_path:
        t = Path(tokenizer_path)
        out += [t, t / "processor"]
    if text_encoder_path:
        te = Path(text_encoder_path)
        d = te if te.is_dir() else te.parent
        out += [d, d / "processor", d / "tokenizer", d.parent / "processor", d.parent / "tokenizer"]
    return [p for p in out if p.is_dir()]


def image_processor_class():
    """transformers' Qwen2-VL image processor: the torchvision backend (what AutoProcessor, and so the reference
    pipelines, use when torchvision is installed), else the PIL backend (resizing differs slightly)."""
    try:
        import torchvision  # noqa: F401
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil


class VLProcessor:
    """Tokenizer + Qwen2-VL image processor (works without torchvision, unlike transformers' Qwen2VLProcessor): builds
    the model inputs exactly as the Qwen2-VL processor does, expanding each <|image_pad|> to the image's merged patch
    count.

    The image-processor settings (pixel limits, normalisation) come from the model folder (`--tokenizer`, or beside
    the text encoder), else from the hub's Qwen/Qwen-Image-Edit processor, as the reference pipelines use them."""

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer, image_processor=None, settings_from: list[Path] | None = None):
        self.tokenizer = tokenizer
        self._image_processor = image_processor
        self._settings_from = settings_from or []

    @property
    def image_processor(self):
        if self._image_processor is None:  # only edit prompts need it
            cls = image_processor_class()
            for folder in self._settings_from:
                settings = processor_settings(folder)
                if settings is not None:
                    self._image_processor = cls.from_dict(settings)
                    logger.info("image processor settings from %s", folder)
                    break
            else:
                repo, sub = HUB_PROCESSOR
                try:
                    self._image_processor = cls.from_pretrained(repo, subfolder=sub)
                except Exception as e:
                    raise UserError(
                        f"edit prompts need the Qwen2.5-VL image processor settings: none beside the text encoder or "
                        f"in --tokenizer, and the hub ({repo}, subfolder {sub}) is not reachable ({type(e).__name__}). "
                        f"Download that folder once and pass --tokenizer /path/to/it") from None
        return self._image_processor

    def __call__(self, text: list[str] | str, images: list | None = None, max_length: int | None = None, **_):
        """Accepts the Qwen2-VL processor call (padding=True, return_tensors="pt" are implied)."""
        from transformers import BatchFeature

        text = [text] if isinstance(text, str) else text
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        extra = {}
        if images:
            vis = self.image_processor(images=images, return_tensors="pt")
            merge = self.image_processor.merge_size ** 2
            counts = iter((vis["image_grid_thw"].prod(-1) // merge).tolist())
            expanded = []
            for t in text:
                parts = t.split(self.image_token)
                expanded.append(parts[0] + "".join(self.image_token * next(counts) + p for p in parts[1:]))
            text = expanded
            extra = {"pixel_values": vis["pixel_values"], "image_grid_thw": vis["image_grid_thw"]}
        enc = self.tokenizer(text, padding=True, return_tensors="pt",
                             **({"max_length": max_length, "truncation": True} if max_length and not images else {}))
        ids = enc["input_ids"]
        # modality of each token (1 image, 2 video): the model places image tokens on its 3D (mrope) grid with these
        kinds = torch.zeros_like(ids)
        kinds[ids == self.tokenizer.convert_tokens_to_ids(self.image_token)] = 1
        kinds[ids == self.tokenizer.convert_tokens_to_ids("<|video_pad|>")] = 2
        return BatchFeature({"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": kinds,
                             **extra})


def load_processor(tokenizer, tokenizer_path: str | None = None, text_encoder_path: str | None = None) -> VLProcessor:
    """Tokenizer plus the image processor whose settings are found as `VLProcessor` describes (read lazily: only edit
    prompts need them)."""
    return VLProcessor(tokenizer, settings_from=processor_folders(tokenizer_path, text_encoder_path))


@torch.no_grad()
def encode_prompts(
    text_encoder: Qwen2_5_VLForConditionalGeneration,
    tokenizer,
    prompts: list[str],
    template: str = "t2i",
    device: torch.device | str | None = None,
    images: list[list] | None = None,
) -> list[torch.Tensor]:
    """Prompts (and, for edit templates, each prompt's control images as PIL) -> one (L_i, hidden) tensor each:
    last hidden state (post final norm), template tokens dropped, at most MAX_TOKENS tokens."""
    device = device or text_encoder.device
    drop = DROP_IDX[template]
    processor = tokenizer if isinstance(tokenizer, VLProcessor) else VLProcessor(tokenizer)
    if template == "t2i" or not images:
        texts = [format_prompt(template, p) for p in prompts]
        flat = None
    else:
        texts = [format_prompt(template, p, len(imgs)) for p, imgs in zip(prompts, images)]
        flat = [img.convert("RGB").resize(vl_image_size(img.size, template), Image.LANCZOS) for imgs in images
                for img in imgs]
    inputs = {k: v.to(device) for k, v in processor(texts, flat, max_length=MAX_TOKENS + drop).items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(text_encoder.dtype)
    out = text_encoder(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    mask = inputs["attention_mask"].bool()
    return [h[m][drop:][:MAX_TOKENS] for h, m in zip(hidden, mask)]


def pad_embeds(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad to a batch; the mask is None when nothing was padded (the fast, mask-free attention path)."""
    n = max(e.shape[0] for e in embeds)
    batch = torch.stack([torch.cat([e, e.new_zeros(n - e.shape[0], e.shape[1])]) for e in embeds])
    mask = torch.stack([torch.arange(n, device=e.device) < e.shape[0] for e in embeds]).long()
    return batch, (None if bool(mask.all()) else mask)


def to_comfy_key(k: str) -> str:
    """transformers 5 names -> the ComfyUI single-file names (`model.*`, `visual.*`, `lm_head.*`)."""
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    if k.startswith("model.visual."):
        return k[len("model."):]
    return k
