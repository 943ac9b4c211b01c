"""The nano models: their sizes, the word-level tokenizer and text encoder, and where the shipped files are.

Sizes: 64x64 images (8x8 latents, 16 image tokens), a DiT of 4 blocks with 4 heads of 32 (the real model: 60 blocks,
24 heads of 128), a VAE with base width 16 (real: 96), a Qwen2.5-VL text encoder of 2 layers with hidden size 128
(real: 28 layers, 3584). The tokenizer is Qwen's byte-level BPE with merges that make whole words of the prompt
templates and the shapes world, so the templates split into exactly the tokens Qwen's tokenizer makes (the 34 / 64
dropped template tokens are the system prompt here too).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from ..dataset.synthetic import (
    BACKGROUNDS, EDIT_KINDS, NEW_EDIT_KINDS, PALETTE, POSITIONS, SIZES, Scene, Shape, caption, random_edit,
)
from ..qwen_image.dit import default_axes_dims_rope
from ..qwen_image.text_encoder import PLUS_IMAGE_PREFIX, TEMPLATES
from ..qwen_image.tiny import SPECIAL_TOKENS, TINY_IMAGE_PROCESSOR, small_qwen_vl_config, write_processor_config
from ..models.version import ModelVersion

IMAGE_SIZE = 64
TEXT_HIDDEN = 128
NANO_DIT = dict(num_layers=4, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=TEXT_HIDDEN,
                in_channels=64, out_channels=16, axes_dims_rope=default_axes_dims_rope(32))
NANO_VAE = dict(base_dim=16, z_dim=16, num_res_blocks=1, dim_mult=[1, 2, 4, 4])
WEIGHTS = Path(__file__).parent / "weights"
SHIPPED_VERSIONS = ("original", "edit-2509", "edit-2511", "layered")  # the DiTs in WEIGHTS (see docs/nano.md)
# Control images reach the text encoder as at most 112 x 112 pixels: 16 merged vision tokens each (the real processor
# allows up to 12.8 M pixels; its 384 x 384 edit-plus images make 196 tokens).
NANO_IMAGE_PROCESSOR = {**TINY_IMAGE_PROCESSOR, "size": {"longest_edge": 112 * 112, "shortest_edge": 56 * 56}}


def corpus() -> list[str]:
    """Every text the nano models are prompted with: the templates and the shapes world's captions and edits."""
    texts = [t.format("") for t in TEMPLATES.values()] + [PLUS_IMAGE_PREFIX.format(i) for i in range(1, 10)]
    kinds = ("circle", "square", "triangle", "diamond")
    for colour in PALETTE:
        for kind in kinds:
            for size in SIZES:
                texts += [caption(Scene(bg, (Shape(kind, colour, size, pos),))) for bg in BACKGROUNDS
                          for pos in POSITIONS]
    import random

    rng = random.Random(0)
    for kind in EDIT_KINDS + NEW_EDIT_KINDS + ("two_image",):
        texts += [random_edit(rng, kind, colours=PALETTE, shapes=kinds)[1] for _ in range(40)]
    texts += ["make it " + c for c in PALETTE] + ["turn it into a " + k for k in kinds]
    texts += ["move it to the " + p for p in POSITIONS] + ["make the background " + b for b in BACKGROUNDS]
    return texts


def nano_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE whose merges build every word (pre-token) of the corpus into one token."""
    byte_vocab = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(byte_vocab)}
    probe = Qwen2Tokenizer(vocab=dict(vocab), merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                           pad_token="<|endoftext|>")
    probe.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    pre = probe.backend_tokenizer.pre_tokenizer
    words: list[str] = []
    seen = set()
    for text in corpus():
        for part in _split_specials(text):
            for piece, _ in pre.pre_tokenize_str(part):
                if piece not in seen:
                    seen.add(piece)
                    words.append(piece)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(10):  # until every word is one token under the merges so far (later merges can split earlier words)
        changed = False
        for w in words:
            seg = _bpe(list(w), ranks)
            while len(seg) > 1:  # join the first two pieces, then see what BPE makes of the rest
                pair = (seg[0], seg[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                seg = _bpe(list(w), ranks)
                changed = True
        if not changed:
            break
    for t in SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tok


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one pre-token: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _split_specials(text: str) -> list[str]:
    import re

    return [p for p in re.split("|".join(re.escape(t) for t in SPECIAL_TOKENS), text) if p]


def nano_text_encoder(tokenizer, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Random (fixed by the seed) weights: the DiTs learn to read its outputs."""
    config = small_qwen_vl_config(
        tokenizer, dict(hidden_size=TEXT_HIDDEN, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        dict(hidden_size=64, intermediate_size=128, out_hidden_size=TEXT_HIDDEN))
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def nano_dit(version: ModelVersion, seed: int = 0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**NANO_DIT, zero_cond_t=version.zero_cond_t,
                                       use_additional_t_cond=version.additional_t_cond,
                                       use_layer3d_rope=version.layer3d_rope)


def nano_vae(channels: int = 3, seed: int = 0) -> AutoencoderKLQwenImage:
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(**NANO_VAE, input_channels=channels)


def write_text_encoder(folder: Path, seed: int = 0) -> Path:
    """The text encoder as ComfyUI ships it (one file, ComfyUI key names) with the tokenizer, config.json and the
    processor settings beside it; returns the weights file."""
    from ..fileio import save_safetensors
    from ..qwen_image.text_encoder import to_comfy_key

    folder = Path(folder)
    tok = nano_tokenizer()
    te = nano_text_encoder(tok, seed)
    sd = {to_comfy_key(k): v.to(torch.bfloat16) for k, v in te.state_dict().items() if k != "lm_head.weight"}
    path = save_safetensors(sd, folder / "nano_qwen_2.5_vl.safetensors")
    tok.save_pretrained(folder)
    te.config.save_pretrained(folder)
    write_processor_config(folder, NANO_IMAGE_PROCESSOR)
    return path


# what the nano DiTs are scored with (nano/evaluate.py), written into their metadata (qwen_image/recommended.py) so
# that every script uses it when the user gives no other: CFG 1 (4.0, the 20B default, ruins nano pictures), 20
# steps, 64x64, controls at their own 64-pixel size
NANO_RECOMMENDED = {"guidance_scale": 1.0, "infer_steps": 20, "image_size": [IMAGE_SIZE, IMAGE_SIZE],
                    "control_sizing": "native"}


def stamp_recommended(src: Path, dst: Path) -> Path:
    """dst: the DiT file src with NANO_RECOMMENDED in its metadata (tensors and other metadata unchanged)."""
    import json

    from safetensors import safe_open

    from ..fileio import save_safetensors
    from ..generation.recommended import METADATA_KEY

    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata[METADATA_KEY] = json.dumps(NANO_RECOMMENDED)
    return save_safetensors(tensors, dst, metadata)


def shipped(version: str, root: Path = WEIGHTS) -> dict[str, Path]:
    """The shipped nano model files of a version (DiT, VAE, text encoder with its tokenizer folder)."""
    layered = version == "layered"
    return {"dit": root / f"nano_qwen_image_{version}.safetensors",
            "vae": root / ("vae_layered" if layered else "vae"),
            "text_encoder": root / "text_encoder" / "nano_qwen_2.5_vl.safetensors",
            "tokenizer": root / "text_encoder"}
