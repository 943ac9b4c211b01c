"""Split attention: the joint attention runs one sample at a time with that sample's real text length, so no padding
mask is needed (backends without mask support work on padded batches) and the peak attention memory is one sample's."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0


class SplitAttnProcessor:
    def __init__(self, inner=None):
        self.inner = inner or QwenDoubleStreamAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
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


def enable_split_attention(model) -> int:
    n = 0
    for block in model.transformer_blocks:
        block.attn.set_processor(SplitAttnProcessor(block.attn.processor))
        n += 1
    return n


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
