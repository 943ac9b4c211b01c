"""The tiny test models: a Qwen-Image family with the real architectures and a few MB of random weights, generated
by the tests (never trained; the trained small family that ships is the nano models, musubi_tuner.nano). Every
loader, the sampler and the trainer run on them exactly as on the 20B model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from .dit import default_axes_dims_rope
from .text_encoder import to_comfy_key
from ..models.registry import VERSIONS
from ..models.version import ModelVersion
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


# --- Qwen-Image-2.1 ---------------------------------------------------------------------------------------------

TINY_V21_TEXT = 64
TINY_V21_DIT = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, context_in_dim=TINY_V21_TEXT,
                    in_channels=16, out_channels=16, axes_dims_rope=(4, 14, 14))
TINY_V21_VAE = dict(base_dim=8, decoder_base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2, 2], num_res_blocks=1)
# the system message as Qwen3-VL's chat template renders it (the pipeline counts its tokens to drop them)
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
                      "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                      "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_v21_dit(seed: int = 0):
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(seed)
    return QwenImage21Transformer2DModel(**TINY_V21_DIT).eval()


def tiny_v21_vae(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(seed)
    z = TINY_V21_VAE["z_dim"]
    g = torch.Generator().manual_seed(seed + 1)  # non-trivial latent statistics, so a missed (de)normalisation shows
    mean = (torch.randn(z, generator=g) * 0.2).tolist()
    std = (1 + torch.rand(z, generator=g)).tolist()
    return AutoencoderKLQwenImage21(**TINY_V21_VAE, latents_mean=mean, latents_std=std).eval()


def tiny_v21_text_encoder(tokenizer, seed: int = 0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)))
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TINY_V21_TEXT, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=4096, rope_theta=5000000, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=1, out_hidden_size=TINY_V21_TEXT,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[1],
                           num_position_embeddings=64),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


def tiny_v21_processor():
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    tok = tiny_tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    settings = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5],
                    image_std=[0.5, 0.5, 0.5])
    image = Qwen2VLImageProcessor(**settings, size={"shortest_edge": 32 * 32, "longest_edge": 2048 * 2048})
    video = Qwen3VLVideoProcessor(**settings)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                            chat_template=TINY_CHAT_TEMPLATE)


def write_tiny_v21(folder: str | Path, seed: int = 0, sample_sigmas: list[float] | None = None) -> dict[str, Path]:
    """A tiny Qwen-Image-2.1 checkpoint in the diffusers repository layout (model_index.json, transformer/, vae/,
    text_encoder/, processor/, scheduler/): diffusers' QwenImage21Pipeline.from_pretrained loads it as it loads
    the real one, and so do our loaders. Also a ComfyUI single-file DiT (prefixed names, fused gate_up)."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    paths = {"root": folder, "dit": folder / "transformer", "vae": folder / "vae",
             "text_encoder": folder / "text_encoder", "tokenizer": folder / "processor",
             "dit_comfy": folder / "comfy" / "qwen_image_2.1_comfy.safetensors"}
    if (folder / "model_index.json").is_file():
        return paths
    dit = tiny_v21_dit(seed)
    dit.save_pretrained(paths["dit"])
    sd = dit.state_dict()
    comfy = {}
    for k, v in sd.items():
        if k.endswith("img_mlp.gate_layer.weight"):
            comfy[COMFY_PREFIX + k.replace("gate_layer", "gate_up")] = torch.cat([v, sd[k.replace("gate_layer", "proj")]])
        elif not k.endswith("img_mlp.proj.weight"):
            comfy[COMFY_PREFIX + k] = v
    save_safetensors(comfy, paths["dit_comfy"])
    tiny_v21_vae(seed).save_pretrained(paths["vae"])
    processor = tiny_v21_processor()
    processor.save_pretrained(paths["tokenizer"])
    tiny_v21_text_encoder(processor.tokenizer, seed).save_pretrained(paths["text_encoder"])
    from ..qwen_image_21.modeling import DEFAULT_SCHEDULER

    FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER).save_pretrained(folder / "scheduler")
    index = {"_class_name": "QwenImage21Pipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "vae": ["diffusers", "AutoencoderKLQwenImage21"],
             "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
             "processor": ["transformers", "Qwen3VLProcessor"],
             "transformer": ["diffusers", "QwenImage21Transformer2DModel"], "sample_sigmas": sample_sigmas}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return paths


COMFY_PREFIX = "model.diffusion_model."
