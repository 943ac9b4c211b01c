"""Captions for Qwen-Image-Layered prompts left empty: the Qwen2.5-VL text encoder describes the image to decompose,
as diffusers' `QwenImageLayeredPipeline.get_image_caption` does (a fixed annotator prompt in English or Chinese,
greedy `generate`, at most 512 new tokens, special tokens dropped, whitespace stripped). The reference pipeline's
default language is Chinese (`use_en_prompt=False`)."""

from __future__ import annotations

import logging

import torch
from PIL import Image

logger = logging.getLogger(__name__)

# The annotator prompts of the Qwen-Image-Layered release, byte for byte (their line breaks included).
CAPTION_PROMPTS = {
    "cn": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n# 图像标注器\n"
        "你是一个专业的图像标注器。请基于输入图像，撰写图注:\n1.\n使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。\n"
        "2. 通过加入以下内容，丰富图注细节：\n - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等\n -\n"
        "对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等\n - 环境细节：例如天气、光照、颜色、纹理、气氛等\n"
        " - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调\n3.\n保持真实性与准确性：\n - 不要使用笼统的描述\n -\n"
        "描述图像中所有可见的信息，但不要加入没有在图像中出现的内容\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "en": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n# Image Annotator\n"
        "You are a professional\nimage annotator. Please write an image caption based on the input image:\n"
        "1. Write the caption using natural,\ndescriptive language without structured formats or rich text.\n"
        "2. Enrich caption details by including: \n - Object\nattributes, such as quantity, color, shape, size, "
        "material, state, position, actions, and so on\n - Vision Relations\nbetween objects, such as spatial "
        "relations, functional relations, possessive relations, attachment relations, action\nrelations, comparative "
        "relations, causal relations, and so on\n - Environmental details, such as weather, lighting,\ncolors, "
        "textures, atmosphere, and so on\n - Identify the text clearly visible in the image, without translation or\n"
        "explanation, and highlight it in the caption with quotation marks\n3. Maintain authenticity and accuracy:\n"
        " - Avoid\ngeneralizations\n - Describe all visible information in the image, while do not add information "
        "not explicitly shown in\nthe image\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}
LANGUAGES = {"en": "en", "cn": "cn", "zh": "cn"}  # --automatic_prompt_lang_for_layered values (musubi's, plus zh)
DEFAULT_LANGUAGE = "cn"
MAX_NEW_TOKENS = 512
# Qwen2.5-VL-Instruct's generation settings (its generation_config.json: top_k 1, so greedy), used when the text
# encoder comes without that file (a single-file checkpoint).
REPETITION_PENALTY = 1.05


def caption_language(value: str | None) -> str:
    return LANGUAGES[value] if value else DEFAULT_LANGUAGE


@torch.no_grad()
def caption_image(text_encoder, processor, image: Image.Image, language: str | None = None,
                  device: torch.device | str | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The caption of one image (as the pipeline passes it: the image to decompose at its generation size; the
    processor converts RGBA to RGB as transformers' processor does)."""
    lang = caption_language(language)
    device = device or text_encoder.device
    inputs = {k: v.to(device) for k, v in processor(CAPTION_PROMPTS[lang], [image]).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(text_encoder.dtype)
    ids = text_encoder.generate(**inputs, max_new_tokens=max_new_tokens, **generation_settings(text_encoder,
                                                                                                processor.tokenizer))
    new = ids[0, inputs["input_ids"].shape[1]:]
    text = processor.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
    logger.info("automatic caption (%s, %d tokens): %s", lang, len(new), text)
    return text


def generation_settings(text_encoder, tokenizer) -> dict:
    """What `generate` needs beyond the model's own generation config: Qwen's end tokens and repetition penalty, unless
    a generation_config.json came with the model (then that file decides, as in the reference pipeline)."""
    if getattr(text_encoder, "generation_config_from_file", False):
        return {}
    end = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return dict(do_sample=False, repetition_penalty=REPETITION_PENALTY, eos_token_id=end, pad_token_id=end[1])


def check_caption_model(path: str, option: str = "--text_encoder") -> None:
    """Captioning needs the language-model head, which ComfyUI's single-file text encoder leaves out (encoding does
    not use it); checked from the header before any model loads."""
    import json

    from .model_files import expect

    info = expect(path, option, "text_encoder")
    if any(k.endswith("lm_head.weight") for k in info.shapes):
        return
    config = info.files[0].parent / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        if cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings", False)):
            return
    raise no_lm_head(info.files[0], option)


def no_lm_head(file, option: str = "--text_encoder"):
    """The error for a text encoder that cannot caption (before loading, from the header; or, for lines typed in
    interactive mode, from the loaded model)."""
    from ..errors import UserError

    return UserError(f"{option}: {file} has no lm_head.weight (ComfyUI's text-encoder file leaves it out), so it "
                     f"cannot write captions; pass the full Qwen2.5-VL (a transformers folder, such as the "
                     f"text_encoder folder of Qwen/Qwen-Image-Layered), or, for a layered input, give a prompt")
