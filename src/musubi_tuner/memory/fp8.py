"""fp8 weights for nn.Linear layers: `--fp8_base` (plain float8_e4m3fn storage) and `--fp8_scaled` (per-output-channel
or block-wise scales chosen so each row/block uses the full e4m3 range).

A quantised Linear keeps its class and name (LoRA and block swap see an ordinary Linear); its weight becomes a frozen
float8 tensor with a float32 `scale_weight` buffer and its forward dequantises to the activation dtype, or, on GPUs
with fp8 tensor cores and when no gradient is needed, multiplies in fp8 with `torch._scaled_mm`.
"""

from __future__ import annotations

import functools
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
USE_SCALED_MM = True  # module switch (benchmarks compare both paths)


def quantize_weight(w: torch.Tensor, mode: str = "channel", block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (fp8 weight, float32 scale) with w ~= fp8 * scale.

    mode "tensor": scale 1 (plain cast, --fp8_base); "channel": one scale per output row, shape (out, 1);
    "block": one scale per row and block of `block_size` inputs, shape (out, in // block_size, 1)."""
    if mode == "channel" and w.ndim == 2:
        return _quantize_rows(w)
    w32 = w.float()
    if mode == "tensor":
        return w32.clamp(-FP8_MAX, FP8_MAX).to(FP8), torch.ones((), dtype=torch.float32, device=w.device)
    if mode == "block" and w.shape[1] % block_size == 0:
        blocks = w32.view(w.shape[0], w.shape[1] // block_size, block_size)
        scale = (blocks.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        return (blocks / scale).to(FP8).view_as(w), scale
    scale = (w32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (w32 / scale).to(FP8), scale


BAND_BYTES = 4 << 20  # float32 band of rows quantised at a time
_BANDS: dict = {}  # the reused band buffer, by (device, row width)


def _quantize_rows(w: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scales, a band of rows at a time through one reused float32 buffer: the same bits as the whole-tensor
    formula, about twice as fast on the CPU (the band stays in cache), and no whole-tensor float32 temporaries (an
    fp8 load stays near the fp8 size)."""
    rows = rows or max(1, BAND_BYTES // max(1, w.shape[1] * 4))
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(w.shape[0], 1, dtype=torch.float32, device=w.device)
    key = (w.device, w.shape[1])
    band = _BANDS.get(key)
    if band is None or band.shape[0] < min(rows, w.shape[0]):
        _BANDS.clear()  # one buffer at a time (the widths of a model are few; reusing it avoids heap churn)
        band = _BANDS[key] = torch.empty(min(rows, w.shape[0]), w.shape[1], dtype=torch.float32, device=w.device)
    for o in range(0, w.shape[0], rows):
        n = min(rows, w.shape[0] - o)
        b = band[:n]
        b.copy_(w[o:o + n])
        # amax and amin apart: torch.aminmax over a dim is not vectorised on the CPU (about 15x slower)
        s = (torch.maximum(b.amax(dim=1, keepdim=True), b.amin(dim=1, keepdim=True).neg_()) / FP8_MAX).clamp_(min=1e-12)
        scale[o:o + n] = s
        q[o:o + n] = b.div_(s)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if scale.ndim == 3:  # block-wise
        out, n_blocks, _ = scale.shape
        return (q.to(dtype).view(out, n_blocks, -1) * scale.to(dtype)).view(q.shape)
    return q.to(dtype) * scale.to(dtype)


def relative_rms_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    d = dequantize_weight(q, scale, torch.float32)
    return float((d - w.float()).pow(2).mean().sqrt() / w.float().pow(2).mean().sqrt())


@functools.lru_cache(maxsize=None)
def _fp8_tensor_cores(device: torch.device) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_available(device: torch.device) -> bool:
    """Called on every fp8 Linear forward: the capability query is cached per device."""
    return USE_SCALED_MM and device.type == "cuda" and _fp8_tensor_cores(device)


class _Fp8Linear(torch.autograd.Function):
    """y = x @ dequant(q)^T + b that keeps only the fp8 weight for backward and dequantises it again there.
    F.linear on a dequantised weight would save that bf16 copy: one block's worth of bf16 weights during a
    checkpointed block's backward, every block's without checkpointing."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, dtype):
        w = dequantize_weight(q, scale, dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x.to(dtype), w, bias.to(dtype) if bias is not None else None)
        ctx.save_for_backward(q, scale)
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        ctx.bias_dtype = bias.dtype if bias is not None and bias.requires_grad else None
        return y

    @staticmethod
    def backward(ctx, gy):
        q, scale = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gy.to(ctx.dtype) @ dequantize_weight(q, scale, ctx.dtype)).to(ctx.x_dtype)
        if ctx.bias_dtype is not None:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return gx, None, None, gb, None


def _fp8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    scale = self.scale_weight
    if (scale.ndim == 2 and not torch.is_grad_enabled() and x.dtype == torch.bfloat16
            and scaled_mm_available(x.device) and x.shape[-1] % 16 == 0 and self.out_features % 16 == 0):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
        xq = (x2 / x_scale).to(FP8)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=scale.t().contiguous(),
                             bias=self.bias, out_dtype=torch.bfloat16)
        return y.reshape(*shape[:-1], self.out_features)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
        return _Fp8Linear.apply(x, self.weight, scale, self.bias, dtype)
    w = dequantize_weight(self.weight, scale, dtype)
    return F.linear(x.to(dtype), w, self.bias.to(dtype) if self.bias is not None else None)


def make_fp8_linear(module: nn.Linear, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Turn `module` into an fp8 Linear holding (q, scale) (meta tensors declare the layout for a later
    load_state_dict(assign=True))."""
    module.weight = nn.Parameter(q, requires_grad=False)
    if "scale_weight" in module._buffers:
        module.scale_weight = scale
    else:
        module.register_buffer("scale_weight", scale)
    module.forward = types.MethodType(_fp8_forward, module)


ERROR_ROWS = 256  # rows per weight over which quantize_linears measures the error it reports


def quantize_linears(model: nn.Module, prefix: str = "transformer_blocks.", mode: str = "channel",
                     block_size: int = 64, exclude: tuple[str, ...] = (), device: torch.device | None = None
                     ) -> dict[str, float]:
    """Quantise every nn.Linear whose name starts with `prefix` in place (computing on `device`, e.g. the GPU, and
    leaving the result where the weight was); returns {name: relative RMS error, measured on ERROR_ROWS rows}."""
    errors = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith(prefix) and not any(e in name for e in exclude) \
                and m.weight.dtype != FP8:
            home = m.weight.device
            w = m.weight.data.to(device or home)
            q, s = quantize_weight(w, mode, block_size)
            rows = slice(None, None, max(1, w.shape[0] // ERROR_ROWS))  # a sample: the full formula costs 10x the quantisation
            errors[name] = relative_rms_error(w[rows], q[rows], s if s.ndim == 0 else s[rows])
            make_fp8_linear(m, q.to(home), s.to(home))
            del w
    return errors


def is_quantized_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and m.weight.dtype == FP8


def quantize_text_encoder(te: nn.Module, device) -> None:
    """--fp8_vl: fp8 (per-channel scaled) weights for the Linear layers of the language model and vision tower
    (Qwen2.5-VL, or Qwen3-VL whose names have no `model.`)."""
    root = "model." if hasattr(te, "model") else ""
    errors = quantize_linears(te, prefix=root + "language_model.layers.", device=device)
    errors.update(quantize_linears(te, prefix=root + "visual.blocks.", device=device))
    logger.info("fp8_vl: %d Linear layers quantised (worst relative RMS error %.4f)", len(errors),
                max(errors.values(), default=0.0))
