"""Qwen-Image-2.1: what differs from the other versions, in one place.

2.1 is a single-stream, block-causal DiT (diffusers `QwenImage21Transformer2DModel`) over one joint sequence: the
prompt, encoded by a Qwen3-VL model, with condition images read by that model and their latents substituted into the
slots it reserved for them (one slot = 2x2 latent tokens), then the target image's latents. The VAE
(`AutoencoderKLQwenImage21`) compresses 16x into 64 unpatched channels and reads RGBA. Text and condition tokens are
modulated at t = 0, so their keys and values are the same at every step and are cached after the first one.

Everything here follows diffusers' `QwenImage21Pipeline` (the parity tests compare with it): the prompt template and
the system tokens dropped, hidden states before the text model's final norm, left padding, condition images composited
over white for the text encoder, sizes from `output_resolution`, sigmas from the checkpoint's `sample_sigmas` with the
scheduler's resolution-dependent shift.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights
from PIL import Image

from ..errors import UserError
from ..qwen_image.model_files import COMFY_DIT_PREFIX, dit_blocks, expect
from ..qwen_image.weights import load_tensors

logger = logging.getLogger(__name__)

VAE_SCALE = 16  # pixels per latent token side (the DiT reads latents unpatched)
SLOT = 2  # one text-encoder image slot covers SLOT x SLOT latent tokens
MULTIPLE = VAE_SCALE * SLOT  # output sides are multiples of 32
DEFAULT_RESOLUTION = 1024
DEFAULT_STEPS = 40
SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
SYSTEM_BLOCK = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
IMAGE_SLOT = "<image{}><|vision_start|><|image_pad|><|vision_end|>"
GATE_UP = "img_mlp.gate_up.weight"  # ComfyUI fuses the SwiGLU gate and up projections (gate rows first)
# the checkpoint's scheduler (Qwen-Image's: mu 0.5 at 256 target tokens to 0.9 at 8192, stretched to a terminal
# sigma of 0.02), used when its scheduler_config.json is not at hand (a single-file DiT)
DEFAULT_SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
                     "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
                     "num_train_timesteps": 1000}


# --- prompts ------------------------------------------------------------------------------------------------------

def format_prompt(prompt: str, num_images: int = 0) -> str:
    """The pipeline's raw template (not the chat template: the checkpoint expects this tokenisation); an empty prompt
    becomes one space (Qwen has no bos token)."""
    slots = " ".join(IMAGE_SLOT.format(i) for i in range(1, num_images + 1))
    return f"{SYSTEM_BLOCK}<|im_start|>user\n{slots}{prompt or ' '}<|im_end|>\n<|im_start|>assistant\n"


def for_text_encoder(image: Image.Image) -> Image.Image:
    """The text encoder reads RGBA condition images composited over white (as the checkpoint was trained)."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


@torch.no_grad()
def encode_prompts(te, processor, prompts: list[str], images: list[Image.Image] | None = None,
                   device: torch.device | str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """-> per prompt (embeddings (L, D), image-slot mask (L,) bool), the system tokens dropped. `images` (the same
    condition images for every prompt, already at their generation size) are read with each prompt."""
    device = torch.device(device or te.device)
    texts = [format_prompt(p, len(images or [])) for p in prompts]
    kwargs = dict(text=texts, padding=True, padding_side="left", return_tensors="pt")
    if images:
        kwargs["images"] = [for_text_encoder(im) for _ in prompts for im in images]
    inputs = processor(**kwargs).to(device)
    forward = dict(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, output_hidden_states=True)
    for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
        if k in inputs:
            forward[k] = inputs[k]
    if "pixel_values" in forward:
        forward["pixel_values"] = forward["pixel_values"].to(te.dtype)
    # the DiT reads the last decoder layer's output before the final norm (transformers 5 would return it normed)
    handle = te.language_model.norm.register_forward_hook(lambda _m, args, _out: args[0])
    try:
        hidden = te(**forward).hidden_states[-1]
    finally:
        handle.remove()
    drop = len(processor.tokenizer(SYSTEM_BLOCK).input_ids)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    out = []
    for h, ids, m in zip(hidden, inputs.input_ids, inputs.attention_mask.bool()):
        out.append((h[m][drop:], (ids[m] == image_id)[drop:]))
    return out


def batch_prompts(encoded: list[tuple[torch.Tensor, torch.Tensor]], device=None, dtype=None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Right-pad to (B, L, D) with the valid mask (None when nothing is padded, as the pipeline passes it) and the
    image-slot mask (B, L)."""
    n = max(e.shape[0] for e, _ in encoded)
    embeds = torch.stack([torch.cat([e, e.new_zeros(n - e.shape[0], e.shape[1])]) for e, _ in encoded])
    valid = torch.stack([torch.arange(n) < e.shape[0] for e, _ in encoded])
    slots = torch.stack([torch.cat([s.cpu(), s.new_zeros(n - s.shape[0], device="cpu")]) for _, s in encoded])
    embeds = embeds.to(device or embeds.device, dtype or embeds.dtype)
    return embeds, (None if valid.all() else valid.to(embeds.device)), slots.to(embeds.device)


# --- sizes and latents --------------------------------------------------------------------------------------------

def area_size(resolution: int, aspect: float) -> tuple[int, int]:
    """(width, height) of about resolution^2 pixels at `aspect` (w / h), multiples of 32 (the pipeline's rule)."""
    width = math.sqrt(resolution * resolution * aspect)
    return round(width / 32) * 32, round(width / aspect / 32) * 32


def output_size(controls: list[Image.Image], resolution: int = DEFAULT_RESOLUTION,
                image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(height, width): --image_size, else the last condition image's aspect at `resolution`^2 pixels, else square;
    rounded down to multiples of 32 as the pipeline does."""
    if image_size:
        h, w = image_size
    elif controls:
        w, h = area_size(resolution, controls[-1].size[0] / controls[-1].size[1])
    else:
        h = w = resolution
    return h // MULTIPLE * MULTIPLE, w // MULTIPLE * MULTIPLE


def prepare_condition(image: Image.Image, resolution: int = DEFAULT_RESOLUTION) -> Image.Image:
    """RGBA at about resolution^2 pixels keeping the aspect (Lanczos, as diffusers' VaeImageProcessor)."""
    w, h = area_size(resolution, image.size[0] / image.size[1])
    return image.convert("RGBA").resize((w, h), Image.LANCZOS)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGBA image -> (1, 4, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGBA"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, h, w) -> (B, h*w, C): 2.1 reads latents unpatched, row-major."""
    b, c, _, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(1, 2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, 1, h, w)


def initial_noise(seed: int, h: int, w: int, channels: int = 64) -> torch.Tensor:
    """The pipeline's draw: a CPU generator, randn (1, 1, C, h, w) float32 -> (1, C, 1, h, w)."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, 1, channels, h, w), generator=g, dtype=torch.float32).transpose(1, 2)


def slot_mask(prompt_slots: torch.Tensor, target_tokens: int) -> torch.Tensor:
    """The DiT's img_mask: the prompt's image slots, then one slot per 2x2 target tokens."""
    return torch.cat([prompt_slots, prompt_slots.new_ones(prompt_slots.shape[0], target_tokens // (SLOT * SLOT))], 1)


# --- sampling schedule --------------------------------------------------------------------------------------------

def scheduler_settings(dit_path: str | os.PathLike | None) -> tuple[dict, list[float] | None]:
    """(scheduler config, sample_sigmas) of a diffusers checkpoint folder the DiT sits in (scheduler/ and
    model_index.json beside transformer/); the pipeline's defaults otherwise."""
    config, sample_sigmas = dict(DEFAULT_SCHEDULER), None
    if dit_path:
        p = Path(dit_path)
        root = (p if p.is_dir() else p.parent)
        root = root.parent if root.name == "transformer" else root
        sched = root / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            config.update(json.loads(sched.read_text()))
        index = root / "model_index.json"
        if index.is_file():
            sample_sigmas = json.loads(index.read_text()).get("sample_sigmas")
    return config, sample_sigmas


def dynamic_mu(image_seq_len: int, config: dict = DEFAULT_SCHEDULER) -> float:
    """The pipeline's calculate_shift: mu grows linearly with the target's token count (0.5 at 256, 0.9 at 8192 for
    the checkpoint's scheduler; training's qwen_shift uses the same line)."""
    m = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return image_seq_len * m + config["base_shift"] - m * config["base_image_seq_len"]


def sigmas_for(steps: int | None, image_seq_len: int, config: dict, sample_sigmas: list[float] | None = None,
               flow_shift: float | None = None) -> torch.Tensor:
    """The sigmas the pipeline steps through (with the terminal 0), computed by diffusers' own scheduler: the
    checkpoint's sample_sigmas (when steps is not given), else linspace(1, 1/steps); the resolution-dependent shift
    mu; a static --flow_shift replaces the dynamic shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps is None and sample_sigmas:
        base = list(sample_sigmas)
    else:
        steps = steps or DEFAULT_STEPS
        base = list(np.linspace(1.0, 1 / steps, steps))
    cfg = dict(config)
    if flow_shift is not None:
        cfg.update(use_dynamic_shifting=False, shift=flow_shift)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    mu = dynamic_mu(image_seq_len, cfg) if cfg.get("use_dynamic_shifting") else None
    sched.set_timesteps(sigmas=base, mu=mu, device="cpu")
    return sched.sigmas.float()


# --- the DiT call -------------------------------------------------------------------------------------------------

def kv_cache_for(model, enabled: bool):
    """A fresh key/value cache for the condition prefix (None when off or the model cannot use one)."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    if not enabled or not model.config.causal_condition:
        return None
    return QwenImage21KVCache(len(model.transformer_blocks))


def predict_velocity(model, noisy: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                     embeds_mask: torch.Tensor | None, img_mask: torch.Tensor, img_shapes: list[tuple[int, int, int]],
                     condition: torch.Tensor | None = None, kv_cache=None, first_step: bool = True) -> torch.Tensor:
    """Velocity of the target tokens `noisy` (B, N, C) at flow time sigma in [0, 1]. `condition` (B, M, C) are the
    clean condition-image tokens (placed before the target); img_shapes lists condition images first, the target
    last. With a kv_cache the first step fills it and later steps only run the target tokens."""
    b, n = noisy.shape[:2]
    dtype = model.dtype
    hidden = noisy if condition is None else torch.cat([condition.to(noisy), noisy], dim=1)
    timestep = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma
    mode = None if kv_cache is None else ("extract" if first_step else "cached")
    out = model(hidden_states=hidden.to(dtype), timestep=timestep.to(dtype), encoder_hidden_states=embeds.to(dtype),
                encoder_hidden_states_mask=embeds_mask, img_shapes=[img_shapes] * b, img_mask=img_mask,
                kv_cache=kv_cache, kv_cache_mode=mode, return_dict=False)[0]
    return out[:, -n:]


# --- model files --------------------------------------------------------------------------------------------------

def dit_key_map(key: str) -> str | None:
    return key[len(COMFY_DIT_PREFIX):] if key.startswith(COMFY_DIT_PREFIX) else key


def split_gate_up(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """ComfyUI's fused SwiGLU weight (gate rows first) -> the model's gate_layer and proj; other tensors as they are."""
    if not key.endswith(GATE_UP):
        return {key: t}
    gate, up = t.chunk(2, dim=0)
    return {key.replace("gate_up", "gate_layer"): gate.contiguous(), key.replace("gate_up", "proj"): up.contiguous()}


def infer_dit_config(shapes: dict[str, tuple[int, ...]], file_config: dict | None = None) -> dict:
    """QwenImage21Transformer2DModel's config from tensor shapes (diffusers or ComfyUI names); a config.json beside
    the weights supplies what shapes cannot show (rope axes, causal_condition)."""
    blocks = dit_blocks(shapes)
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    mlp = shapes.get("transformer_blocks.0.img_mlp.proj.weight")
    mlp_hidden = mlp[0] if mlp else shapes[f"transformer_blocks.0.{GATE_UP}"][0] // 2
    t = head_dim // 8
    config = dict(patch_size=1, in_channels=in_channels, out_channels=shapes["proj_out.weight"][0],
                  num_layers=max(blocks) + 1, attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                  context_in_dim=shapes["txt_in.in_layer.weight"][1], mlp_ratio=mlp_hidden // inner,
                  axes_dims_rope=(t, (head_dim - t) // 2, (head_dim - t) // 2))
    for k in ("axes_dims_rope", "causal_condition", "eps"):
        if file_config and k in file_config:
            config[k] = tuple(file_config[k]) if k == "axes_dims_rope" else file_config[k]
    return config


def _config_json(folder: Path, class_name: str) -> dict | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg}: invalid JSON ({e})") from None
    return data if data.get("_class_name", class_name) == class_name else None


def load_dit(path, dtype=torch.bfloat16, device="cpu", disable_mmap=False, option="--dit", fp8_mode=None,
             compute_device=None, check_config=None, loras=None):
    """The 2.1 DiT from a diffusers folder / shards or a single file (bare or ComfyUI names, the fused gate_up split
    while streaming); fp8 and LoRA merging as for the other versions."""
    from diffusers import QwenImage21Transformer2DModel

    from ..qwen_image.dit import stream_weights

    info = expect(path, option, "dit", _version())
    shapes = {dit_key_map(k): v for k, v in info.shapes.items()}
    for k in [k for k in shapes if k.endswith(GATE_UP)]:  # the model's names, for config and LoRA checks
        shapes[k.replace("gate_up", "gate_layer")] = shapes[k.replace("gate_up", "proj")] = (shapes[k][0] // 2,
                                                                                             shapes[k][1])
    config = infer_dit_config(shapes, _config_json(info.files[0].parent, "QwenImage21Transformer2DModel"))
    if check_config is not None:
        check_config(config)
    with init_empty_weights():
        model = QwenImage21Transformer2DModel(**config)
    fused = any(k.endswith(GATE_UP) for k in info.shapes)
    stream_weights(model, info.files, "Qwen-Image-2.1 DiT", dtype, device, dit_key_map, disable_mmap, fp8_mode,
                   compute_device, loras, option, split=split_gate_up if fused else None)
    logger.info("loaded Qwen-Image-2.1 DiT %s: %d blocks, %d heads x %d, %s", info.files[0].name,
                config["num_layers"], config["num_attention_heads"], config["attention_head_dim"], dtype)
    return model


def linear_names(num_layers: int = 32) -> list[str]:
    """Every nn.Linear of a 2.1 DiT with `num_layers` blocks (built on the meta device): what kohya LoRA names
    (`lora_unet_<name with underscores>`) resolve against."""
    from diffusers import QwenImage21Transformer2DModel

    with torch.device("meta"):
        model = QwenImage21Transformer2DModel(num_layers=num_layers)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def infer_vae_config(shapes: dict[str, tuple[int, ...]], file_config: dict | None = None) -> dict:
    downs = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks.")})
    base = shapes["encoder.conv_in.weight"][0]
    dim_mult = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] // base for i in downs]
    resnets = {int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")}
    config = dict(base_dim=base, decoder_base_dim=shapes["decoder.conv_out.weight"][1],
                  z_dim=shapes["post_quant_conv.weight"][0], dim_mult=dim_mult, num_res_blocks=len(resnets),
                  temperal_downsample=[f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in shapes
                                       for i in downs[:-1]],
                  in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0])
    for k in ("latents_mean", "latents_std", "attn_scales", "scale_factor_temporal", "scale_factor_spatial"):
        if file_config and k in file_config:
            config[k] = file_config[k]
    return config


def load_vae(path, dtype=torch.float32, device="cpu", option="--vae"):
    from diffusers import AutoencoderKLQwenImage21

    info = expect(path, option, "vae", _version())
    state = load_tensors(info.files, dtype, device)
    config = infer_vae_config({k: tuple(v.shape) for k, v in state.items()},
                              _config_json(info.files[0].parent, "AutoencoderKLQwenImage21"))
    with init_empty_weights():
        vae = AutoencoderKLQwenImage21(**config)
    try:
        vae.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:
        raise UserError(f"{option}: {info.files[0]} does not match the Qwen-Image-2.1 VAE layout "
                        f"({str(e).splitlines()[0]})") from None
    vae.to(device).eval().requires_grad_(False)
    logger.info("loaded Qwen-Image-2.1 VAE %s", info.files[0].name)
    return vae


# Qwen3-VL-8B-Instruct, the text encoder 2.1 reads (context_in_dim 4096): what a single file without config.json
# cannot show in its shapes
QWEN3_VL_8B = dict(
    text_config=dict(rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                     rope_theta=5000000, max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False),
    vision_config=dict(num_heads=16, patch_size=16, spatial_merge_size=2, temporal_patch_size=2),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
)


def te_key_map(key: str) -> str | None:
    """Single-file names (transformers 4 / ComfyUI: model.*, visual.*) -> Qwen3VLModel names; lm_head dropped (the
    prompt embeddings do not use it)."""
    for prefix in ("model.language_model.", "model.visual."):
        if key.startswith(prefix):
            return key[len("model."):]
    if key.startswith("model."):
        return "language_model." + key[len("model."):]
    if key.startswith("visual."):
        return key
    return None


def infer_te_config(shapes: dict[str, tuple[int, ...]], tokenizer=None):
    """Qwen3VLConfig from the shapes of Qwen3VLModel names, the rest from Qwen3-VL-8B."""
    from transformers import Qwen3VLConfig

    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("language_model.layers.")}
    vocab, hidden = shapes["language_model.embed_tokens.weight"]
    head_dim = shapes["language_model.layers.0.self_attn.q_norm.weight"][0]
    vblocks = {int(k.split(".")[2]) for k in shapes if k.startswith("visual.blocks.")}
    vhidden = shapes["visual.blocks.0.attn.qkv.weight"][1]
    deepstack = len({k.split(".")[2] for k in shapes if k.startswith("visual.deepstack_merger_list.")})
    text = dict(QWEN3_VL_8B["text_config"], vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
                num_hidden_layers=max(layers) + 1,
                num_attention_heads=shapes["language_model.layers.0.self_attn.q_proj.weight"][0] // head_dim,
                num_key_value_heads=shapes["language_model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
                intermediate_size=shapes["language_model.layers.0.mlp.gate_proj.weight"][0])
    section = text["rope_scaling"]["mrope_section"]
    if sum(section) != head_dim // 2:  # smaller heads: the same 24:20:20 split
        t = head_dim // 2 * 24 // 64
        text["rope_scaling"] = dict(text["rope_scaling"], mrope_section=[t, (head_dim // 2 - t) // 2,
                                                                         head_dim // 2 - t - (head_dim // 2 - t) // 2])
    depth = max(vblocks) + 1
    vision = dict(QWEN3_VL_8B["vision_config"], depth=depth, hidden_size=vhidden,
                  num_heads=16 if vhidden == 1152 else max(1, vhidden // 64),
                  intermediate_size=shapes["visual.blocks.0.mlp.linear_fc1.weight"][0],
                  out_hidden_size=shapes["visual.merger.linear_fc2.weight"][0],
                  num_position_embeddings=shapes["visual.pos_embed.weight"][0],
                  patch_size=shapes["visual.patch_embed.proj.weight"][-1],
                  deepstack_visual_indexes=[round((i + 1) * depth / (deepstack + 1)) for i in range(deepstack)])
    ids = dict(QWEN3_VL_8B)
    if tokenizer is not None:
        for name, tok in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                          ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
            ids[name] = tokenizer.convert_tokens_to_ids(tok)
    return Qwen3VLConfig(text_config=text, vision_config=vision,
                         **{k: v for k, v in ids.items() if k.endswith("_id")})


def load_text_encoder(path, dtype=torch.bfloat16, device="cpu", option="--text_encoder", tokenizer=None):
    """Qwen3-VL (Qwen3VLModel: no lm_head) from a transformers folder or a single file; config.json beside the
    weights when there is one, else from the shapes."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    info = expect(path, option, "text_encoder", _version())
    cfg_dir = info.files[0].parent
    if (cfg_dir / "config.json").is_file():
        config = Qwen3VLConfig.from_pretrained(cfg_dir)
    else:
        config = infer_te_config({nk: v for k, v in info.shapes.items() if (nk := te_key_map(k))}, tokenizer)
    with init_empty_weights():
        model = Qwen3VLModel(config)
    state = load_tensors(info.files, dtype, device, key_map=te_key_map)
    missing = set(model.state_dict().keys()) - state.keys()
    if missing:
        raise UserError(f"{option}: {info.files[0]} is missing {len(missing)} Qwen3-VL tensors (e.g. "
                        f"{sorted(missing)[0]}); pass the Qwen3-VL text encoder of Qwen-Image-2.1")
    model.load_state_dict(state, assign=True, strict=False)
    model.to(device).eval().requires_grad_(False)
    logger.info("loaded Qwen3-VL text encoder %s (%d layers, hidden %d)", info.files[0].name,
                config.text_config.num_hidden_layers, config.text_config.hidden_size)
    return model


def load_processor(tokenizer_path: str | None, text_encoder_path: str | None):
    """transformers' Qwen3VLProcessor from --tokenizer (a processor/ or tokenizer folder) or the text encoder's
    folder; refuses to guess."""
    from transformers import Qwen3VLProcessor

    candidates = [Path(p) for p in (tokenizer_path,) if p]
    if text_encoder_path:
        te = Path(text_encoder_path)
        te = te if te.is_dir() else te.parent
        candidates += [te, te / "processor", te.parent / "processor", te.parent / "tokenizer"]
    for folder in candidates:
        if folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            try:
                return Qwen3VLProcessor.from_pretrained(str(folder))
            except (OSError, ValueError, TypeError) as e:
                raise UserError(f"--tokenizer {folder}: not a Qwen3-VL processor folder ({e})") from None
    raise UserError("Qwen-Image-2.1 needs its Qwen3-VL processor: pass --tokenizer <checkpoint>/processor (the folder "
                    "with tokenizer.json and preprocessor_config.json)")


def _version():
    from .versions import VERSIONS

    return VERSIONS[0]


# --- one sample ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def denoise(model, cond: tuple[torch.Tensor, torch.Tensor], height: int, width: int, seed: int,
            sigmas: torch.Tensor, uncond: tuple[torch.Tensor, torch.Tensor] | None = None, guidance_scale: float = 1.0,
            conditions: list[torch.Tensor] | None = None, kv_cache: bool = True, device="cpu", dtype=torch.float32,
            progress: bool = True) -> torch.Tensor:
    """One image -> normalised latents (1, C, 1, h, w) float32 on the CPU. cond / uncond are one prompt's
    (embeddings, image-slot mask) from encode_prompts; conditions the normalised latents (1, C, 1, h_i, w_i) of the
    condition images in prompt order. CFG (uncond given, guidance_scale > 1) is neg + s * (cond - neg)."""
    from ..qwen_image.sampler import sample

    h, w = height // VAE_SCALE, width // VAE_SCALE
    channels = model.config.in_channels
    x = pack(initial_noise(seed, h, w, channels)).to(device, dtype)
    shapes = [(1, c.shape[-2], c.shape[-1]) for c in conditions or []] + [(1, h, w)]
    condition = torch.cat([pack(c) for c in conditions], dim=1).to(device, dtype) if conditions else None

    def prepared(enc):
        embeds, mask, slots = batch_prompts([enc], device, dtype)
        return embeds, mask, slot_mask(slots, x.shape[1]), kv_cache_for(model, kv_cache)

    passes = [prepared(cond)] + ([prepared(uncond)] if uncond is not None and guidance_scale > 1 else [])

    def velocity(latents, sigma, i):
        v = [predict_velocity(model, latents, sigma, e, m, s, shapes, condition, cache, first_step=i == 0)
             for e, m, s, cache in passes]
        return v[0] if len(v) == 1 else v[1] + guidance_scale * (v[0] - v[1])

    x = sample(velocity, x, sigmas.to(device), progress=progress)
    return unpack(x.float().cpu(), h, w)
