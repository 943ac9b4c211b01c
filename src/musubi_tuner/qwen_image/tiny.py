"""A tiny Qwen-Image family (same architectures as the real models, a few MB of random weights).

It is the project's embedded default model (no download needed) and the fixture of the tests: every loader,
the sampler and the trainer run on it exactly as on the 20B model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from .dit import default_axes_dims_rope
from .text_encoder import to_comfy_key
from .versions import VERSIONS, ModelVersion
from ..fileio import save_safetensors

TEXT_HIDDEN = 256
TINY_DIT = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN,
                in_channels=64, out_channels=16, axes_dims_rope=default_axes_dims_rope(32))
TINY_VAE = dict(base_dim=8, z_dim=16)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def tiny_dit(version: ModelVersion = VERSIONS["original"], seed: int = 0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**TINY_DIT, zero_cond_t=version.zero_cond_t,
                                       use_additional_t_cond=version.additional_t_cond,
                                       use_layer3d_rope=version.layer3d_rope).eval()


def tiny_vae(channels: int = 3, seed: int = 0) -> AutoencoderKLQwenImage:
    """Random weights, except the mid-block attention output projections start at zero (an identity residual
    branch): the random decoder then stays spatially local, so region-wise checks (inpainting) mean something."""
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**TINY_VAE, input_channels=channels).eval()
    with torch.no_grad():
        for name, module in vae.named_modules():
            if name.endswith("mid_block.attentions.0"):
                module.proj.weight.zero_()
                module.proj.bias.zero_()
    return vae


def tiny_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE with no merges (one token per byte) plus the Qwen special tokens: works offline."""
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for t in SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tok


def small_qwen_vl_config(tokenizer, text: dict, vision: dict) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the given sizes (2 vision blocks) whose special-token ids are the tokenizer's."""
    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)))
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=4096, rms_norm_eps=1e-6,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], **text),
        vision_config=dict(depth=2, num_heads=2, fullatt_block_indexes=[1], **vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def tiny_text_encoder_config(tokenizer) -> Qwen2_5_VLConfig:
    return small_qwen_vl_config(
        tokenizer, dict(hidden_size=TEXT_HIDDEN, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        dict(hidden_size=160, intermediate_size=320, out_hidden_size=TEXT_HIDDEN))


def tiny_text_encoder(tokenizer, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_text_encoder_config(tokenizer)).eval()


def write_tiny_models(folder: str | Path, version: ModelVersion = VERSIONS["original"], seed: int = 0) -> dict[str, Path]:
    """Write a complete tiny model set in the ComfyUI single-file layouts users download; return the paths.

    The text-encoder folder also holds the tokenizer and config.json, as a transformers folder would.
    """
    folder = Path(folder)
    paths = {
        "dit": folder / f"tiny_qwen_image_{version.name}_dit.safetensors",
        "vae": folder / f"tiny_qwen_image_vae_{version.vae_channels}ch.safetensors",
        "text_encoder": folder / "text_encoder" / "tiny_qwen_2.5_vl.safetensors",
        "tokenizer": folder / "text_encoder",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    save_safetensors(tiny_dit(version, seed).state_dict(), paths["dit"])
    save_safetensors(tiny_vae(version.vae_channels, seed).state_dict(), paths["vae"])
    tok = tiny_tokenizer()
    te = tiny_text_encoder(tok, seed)
    sd = {to_comfy_key(k): v for k, v in te.state_dict().items()}
    sd.pop("lm_head.weight", None)  # like the ComfyUI file: not needed for encoding
    save_safetensors(sd, paths["text_encoder"])
    tok.save_pretrained(paths["tokenizer"])
    te.config.save_pretrained(paths["tokenizer"])
    write_processor_config(paths["tokenizer"])
    return paths


# Not the Qwen2-VL defaults, so that tests see whether the settings of the model folder are the ones used.
TINY_IMAGE_PROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.45, 0.4], "image_std": [0.25, 0.27, 0.3], "image_processor_type": "Qwen2VLImageProcessor",
    "merge_size": 2, "patch_size": 14, "resample": 3, "rescale_factor": 1 / 255, "temporal_patch_size": 2,
    "size": {"longest_edge": 3600, "shortest_edge": 784},
}


def write_processor_config(folder: Path, settings: dict = TINY_IMAGE_PROCESSOR) -> None:
    """processor_config.json in the layout transformers 5 writes (image processor nested), so the folder loads with
    transformers' AutoProcessor as well as here."""
    import json

    video = {k: v for k, v in settings.items() if k != "image_processor_type"}
    video.update(video_processor_type="Qwen2VLVideoProcessor", size={"longest_edge": 602112, "shortest_edge": 100352})
    (Path(folder) / "processor_config.json").write_text(json.dumps(
        {"image_processor": settings, "processor_class": "Qwen2VLProcessor", "video_processor": video},
        indent=2))
