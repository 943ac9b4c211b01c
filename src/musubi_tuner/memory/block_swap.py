"""Block swap: keep N blocks of an nn.ModuleList in (pinned) CPU memory and stream each to the compute device just
before it is used, in forward (training and sampling) and in backward, with or without gradient checkpointing, LoRA
and fp8 weights.

Which blocks: the swapped ones are spread evenly between the resident ones (for 45 of 60: three swapped, one
resident, ...; the last block stays resident, so backward starts without waiting). Copies run on one copy engine,
so a pass takes at least max(all blocks' compute, N copies); with the swapped blocks at one end, each copy could only
overlap a swapped block's compute, and the pass took N x max(block compute, copy) for that end
(bench/swap_schedule.py simulates both).

Only module hooks are used (no structural change, so parameter names and state dicts stay the same):
- forward pre-hook of block i: make sure block i is resident; prefetch the next swapped block after i (without
  gradients, e.g. sampling, after the last swapped block comes the first one, for the next call);
- forward hook of block i: outside backward, send block i back (if swapped) and register gradient hooks on its
  outputs; during backward (a gradient-checkpointing recompute) keep it, backward needs it;
- gradient hook on block i's outputs (fires when backward reaches block i): bring block i in, send the block after
  it back, prefetch the next swapped block before i.
At most two swapped blocks are on the device at a time (the one computing and the one arriving).
Moves replace `param.data`, so autograd's saved references follow the weights. On CUDA copies run on a side stream
and are fenced with events; elsewhere they are synchronous.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class TensorMover:
    """Moves a module's parameters and buffers between the compute device and pinned CPU memory.

    Each tensor keeps one pinned host copy; frozen tensors (LoRA training, inference) are not copied back when
    they leave the device, only trainable ones (full finetuning) are."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.host: dict[int, torch.Tensor] = {}

    @staticmethod
    def tensors(module: nn.Module):
        yield from module.parameters(recurse=True)
        yield from module.buffers(recurse=True)

    def to_device(self, module: nn.Module):
        if not self.cuda:
            for t in self.tensors(module):
                t.data = t.data.to(self.device)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for t in self.tensors(module):
                if t.device.type != "cuda":
                    t.data = t.data.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev

    def to_host(self, module: nn.Module):
        if not self.cuda:
            for t in self.tensors(module):
                t.data = t.data.to("cpu")
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the block's kernels are done with it
        with torch.cuda.stream(self.stream):
            for t in self.tensors(module):
                if t.device.type != "cuda":  # first placement: pin the CPU copy once
                    if not t.data.is_pinned():
                        t.data = t.data.pin_memory()
                    self.host[id(t)] = t.data
                    continue
                gpu = t.data
                host = self.host.get(id(t))
                fresh = host is None or host.shape != gpu.shape or host.dtype != gpu.dtype
                if fresh:
                    host = torch.empty(gpu.shape, dtype=gpu.dtype, device="cpu", pin_memory=True)
                    self.host[id(t)] = host
                if fresh or t.requires_grad:
                    host.copy_(gpu, non_blocking=True)
                gpu.record_stream(self.stream)
                t.data = host
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev

    def wait(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


class BlockSwapper:
    def __init__(self, blocks: nn.ModuleList, num_swap: int, device: torch.device, mover: TensorMover | None = None,
                 on_use: Callable[[int, bool], None] | None = None):
        n = len(blocks)
        if not 0 < num_swap < n:
            raise ValueError(f"blocks_to_swap must be between 1 and {n - 1} (the model has {n} blocks), got {num_swap}")
        self.blocks, self.n, self.num_swap = blocks, n, num_swap
        self.swapped = swapped_blocks(n, num_swap)
        order = sorted(self.swapped)
        self.next_swapped = {i: next((j for j in order if j > i), None) for i in range(n)}
        self.prev_swapped = {i: next((j for j in reversed(order) if j < i), None) for i in range(n)}
        self.mover = mover or TensorMover(device)
        self.on_use = on_use  # test seam: called with (index, resident) whenever a block computes
        self.resident = {i: True for i in range(n)}
        self.events: dict[int, object] = {}
        for i in self.swapped:
            self.events[i] = self.mover.to_host(blocks[i])
            self.resident[i] = False
        self.handles = []
        for i, b in enumerate(blocks):
            self.handles.append(b.register_forward_pre_hook(self._pre_hook(i)))
            self.handles.append(b.register_forward_hook(self._post_hook(i)))
        logger.info("block swap: %d of %d blocks kept in CPU memory", num_swap, n)

    # residency
    def ensure(self, i: int) -> None:
        if not self.resident[i]:
            self.events[i] = self.mover.to_device(self.blocks[i])
            self.resident[i] = True
        self.mover.wait(self.events.pop(i, None))

    def offload(self, i: int) -> None:
        if i in self.swapped and self.resident[i]:
            self.events[i] = self.mover.to_host(self.blocks[i])
            self.resident[i] = False

    def prefetch(self, i: int | None) -> None:
        if i is not None and not self.resident[i]:
            self.events[i] = self.mover.to_device(self.blocks[i])
            self.resident[i] = True

    # hooks
    def _pre_hook(self, i: int):
        def hook(module, args):
            self.ensure(i)
            if self.on_use is not None:
                self.on_use(i, self.resident[i])
            if not _in_backward():
                nxt = self.next_swapped[i]
                if nxt is None and not torch.is_grad_enabled():  # sampling: the next step starts with it
                    nxt = min(self.swapped)
                self.prefetch(nxt)

        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            if _in_backward():
                return  # a checkpoint recompute: backward of this block needs the weights
            if torch.is_grad_enabled():
                outs = output if isinstance(output, tuple) else (output,)
                for t in outs:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(self._grad_hook(i))
            self.offload(i)

        return hook

    def _grad_hook(self, i: int):
        def hook(grad):
            self.ensure(i)
            if self.on_use is not None:
                self.on_use(i, self.resident[i])
            if i + 1 < self.n:
                self.offload(i + 1)
            self.prefetch(self.prev_swapped[i])
            return grad

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for i in range(self.n):
            self.ensure(i)


def swapped_blocks(n: int, num_swap: int) -> set[int]:
    """The `num_swap` of `n` blocks to keep in CPU memory: the resident ones spread evenly, the last one resident."""
    resident = n - num_swap
    return set(range(n)) - {(j + 1) * n // resident - 1 for j in range(resident)}


def enable_block_swap(model: nn.Module, num_swap: int, device: torch.device, **kwargs) -> BlockSwapper:
    """Put `model` on `device` except `num_swap` transformer blocks (spread between the others), which stay in
    (pinned) CPU memory and are streamed in when used."""
    blocks = model.transformer_blocks
    keep = swapped_blocks(len(blocks), num_swap)
    for name, child in model.named_children():
        if child is not blocks:
            child.to(device)
    for i, b in enumerate(blocks):
        if i not in keep:
            b.to(device)
    return BlockSwapper(blocks, num_swap, device, **kwargs)
