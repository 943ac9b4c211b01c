"""Checkpoint names, pruning of old ones, and the resumable training state (atomic folder writes, no pickle)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UserError
from ..fileio import save_safetensors

STATE_FORMAT = "qwen_image_train_state/1"


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0  # epoch in progress
    batch: int = 0  # next batch of that epoch


def checkpoint_name(output_name: str, epoch: int | None = None, step: int | None = None) -> str:
    if step is not None:
        return f"{output_name}-step{step:08d}"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}"
    return output_name


def prune(output_dir: Path, output_name: str, kind: str, keep_from: int) -> None:
    """Delete epoch (kind='epoch') or step checkpoints (files and -state folders) numbered below keep_from."""
    for p in output_dir.glob(f"{output_name}-*"):
        stem = p.name.removesuffix(".safetensors").removesuffix("-state")
        tail = stem[len(output_name) + 1:]
        if kind == "step" and tail.startswith("step") and tail[4:].isdigit():
            n = int(tail[4:])
        elif kind == "epoch" and tail.isdigit():
            n = int(tail)
        else:
            continue
        if n < keep_from:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def write_state_meta(folder: Path, state: TrainState, scheduler, extra: dict | None = None) -> None:
    """Counters, scheduler and RNG states (the part every state folder has)."""
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_safetensors(rng, folder / "rng.safetensors")
    (folder / "train_state.json").write_text(json.dumps(
        {"format": STATE_FORMAT, **asdict(state), "scheduler": sched, **(extra or {})}, indent=2))


def replace_folder(tmp: Path, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def save_state(folder: Path, state: TrainState, trainable: dict[str, torch.Tensor], optimizer, scheduler,
               extra: dict | None = None) -> Path:
    """Everything needed to continue exactly: trainable weights, optimizer, scheduler, counters, RNG states."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_safetensors({k: v.detach().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_state_meta(tmp, state, scheduler, extra)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_state(folder: str | Path, optimizer, scheduler, tensors: bool = True
               ) -> tuple[TrainState, dict[str, torch.Tensor] | None, dict]:
    """Counters, scheduler and RNG; with tensors also the trainable weights and the optimizer (sharded runs load
    those themselves)."""
    folder = Path(folder)
    meta_path = folder / "train_state.json"
    if not meta_path.is_file():
        raise UserError(f"--resume: {folder} is not a training state folder (no train_state.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != STATE_FORMAT:
        raise UserError(f"--resume: {folder} was written by another version ({meta.get('format')})")
    trainable = None
    if tensors:
        trainable = load_file(str(folder / "trainable.safetensors"))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    state = TrainState(meta["global_step"], meta["epoch"], meta["batch"])
    return state, trainable, meta
