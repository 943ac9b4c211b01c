"""Attention: backends (--attn_mode / --sdpa --xformers --flash_attn --sage_attn) and split attention.

Split attention runs the joint attention one sample at a time with that sample's real text length, so no padding
mask is needed and the peak attention memory is one sample's. --split_attn splits every batch; backends that cannot
take a mask (FlashAttention, SageAttention) split only batches whose texts were padded."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

from ..errors import UserError

# --attn_mode name -> diffusers attention backend
ATTN_BACKENDS = {"torch": "_native_math", "sdpa": "native", "xformers": "xformers", "flash": "flash", "sageattn": "sage"}
MASKLESS = {"flash", "sageattn"}  # diffusers raises on an attention mask with these


class SplitAttnProcessor:
    def __init__(self, inner=None, only_when_padded: bool = False):
        self.inner = inner or QwenDoubleStreamAttnProcessor2_0()
        self.only_when_padded = only_when_padded

    @property
    def _attention_backend(self):  # model.set_attention_backend() reaches the wrapped processor through this
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, backend):
        self.inner._attention_backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if self.only_when_padded and (encoder_hidden_states_mask is None or bool(encoder_hidden_states_mask.all())):
            return self.inner(attn, hidden_states, encoder_hidden_states, None, attention_mask, image_rotary_emb)
        b, n_txt = encoder_hidden_states.shape[:2]
        img_out, txt_out = [], []
        for i in range(b):
            n = int(encoder_hidden_states_mask[i].sum()) if encoder_hidden_states_mask is not None else n_txt
            rope = None
            if image_rotary_emb is not None:
                img_freqs, txt_freqs = image_rotary_emb
                rope = (img_freqs, txt_freqs[:n])
            img, txt = self.inner(attn, hidden_states[i:i + 1], encoder_hidden_states[i:i + 1, :n], None, None, rope)
            img_out.append(img)
            txt_out.append(torch.nn.functional.pad(txt, (0, 0, 0, n_txt - n)))
        return torch.cat(img_out), torch.cat(txt_out)


def enable_split_attention(model, only_when_padded: bool = False) -> int:
    n = 0
    for block in model.transformer_blocks:
        processor = block.attn.processor
        if isinstance(processor, SplitAttnProcessor):
            processor.only_when_padded = processor.only_when_padded and only_when_padded
        else:
            block.attn.set_processor(SplitAttnProcessor(processor, only_when_padded))
        n += 1
    return n


def check_attention(attn_mode: str, option: str | None = None) -> None:
    """Fail before any model loads when the backend's package is missing (`option`: how the user chose it)."""
    backend = ATTN_BACKENDS[attn_mode]
    if backend in ("native", "_native_math"):
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except (ImportError, RuntimeError, ValueError) as e:
        option = option or f"--attn_mode {attn_mode}"
        raise UserError(f"{option}: backend not usable here ({str(e).splitlines()[0]}); install it or use "
                        f"{'--attn_mode sdpa' if option.startswith('--attn_mode') else '--sdpa'}") from None


def set_attention(model, attn_mode: str, split_masked: bool = True) -> None:
    """The --attn_mode backend; for backends that reject masks, padded batches are split first (split_masked; 2.1's
    processors pass their block-causal masks to torch SDPA themselves)."""
    check_attention(attn_mode)
    if attn_mode in MASKLESS and split_masked:
        enable_split_attention(model, only_when_padded=True)
    if ATTN_BACKENDS[attn_mode] != "native":  # native: diffusers' default dispatch (torch SDPA)
        model.set_attention_backend(ATTN_BACKENDS[attn_mode])


def enable_checkpointing(model, cpu_offload: bool = False) -> None:
    """diffusers' gradient checkpointing; with cpu_offload the tensors each checkpointed block saves (its inputs)
    are kept in (pinned) CPU memory until backward."""
    model.enable_gradient_checkpointing()
    if cpu_offload:
        base = model._gradient_checkpointing_func

        def offloaded(block, *args):
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return base(block, *args)

        model._gradient_checkpointing_func = offloaded
