"""The resumable training state: a folder written atomically (temporary folder, then rename), with no pickle.

    trainable.safetensors   the trained weights (LoRA network or DiT)
    optimizer.pt            the optimizer state (tensors and plain values; read with torch.load(weights_only=True))
    rng.safetensors         RNG states at the step the state belongs to
    train_state.json        counters, scheduler, and the settings that must match on resume
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UserError, describe_error
from ..fileio import remove_path, save_safetensors, temp_folder

STATE_FORMAT = "qwen_image_train_state/1"


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0  # epoch in progress
    batch: int = 0  # next batch of that epoch


def rng_states() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def write_state_meta(folder: Path, state: TrainState, scheduler, extra: dict | None = None,
                     rng: dict[str, torch.Tensor] | None = None) -> None:
    """Counters, scheduler and RNG states (the part every state folder has)."""
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    save_safetensors(rng or rng_states(), folder / "rng.safetensors")
    (folder / "train_state.json").write_text(json.dumps(
        {"format": STATE_FORMAT, **asdict(state), "scheduler": sched, **(extra or {})}, indent=2))


def replace_folder(tmp: Path, folder: Path) -> None:
    remove_path(folder)  # a link there is removed, never followed
    os.replace(tmp, folder)


def save_state(folder: Path, state: TrainState, trainable: dict[str, torch.Tensor], optimizer, scheduler,
               extra: dict | None = None, rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Everything needed to continue exactly: trainable weights, optimizer, scheduler, counters, RNG states."""
    folder = Path(folder)
    tmp = temp_folder(folder)
    try:
        save_safetensors({k: v.detach().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        with open(tmp / "optimizer.pt", "wb") as f:  # through a Python file: a full disk is an OSError, not a
            torch.save(optimizer.state_dict(), f)  # RuntimeError of torch's own writer
        write_state_meta(tmp, state, scheduler, extra, rng)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_state_meta(folder: str | Path) -> dict:
    """train_state.json of a state folder, checked field by field: one clear error naming the file and the field when
    it is not one of ours or is damaged."""
    folder = Path(folder)
    meta_path = folder / "train_state.json"
    if not folder.is_dir():
        raise UserError(f"--resume: {folder} is not a folder (pass a …-state folder written with --save_state)")
    if not meta_path.is_file():
        raise UserError(f"--resume: {folder} is not a training state folder (no train_state.json)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        raise UserError(f"--resume: {meta_path} is damaged (not JSON); resume from another state folder") from None
    if not isinstance(meta, dict):
        raise UserError(f"--resume: {meta_path} is damaged (not a JSON object); resume from another state folder")
    if meta.get("format") != STATE_FORMAT:
        raise UserError(f"--resume: {folder} was written by another version ({meta.get('format')})")

    def bad(field: str, rule: str) -> UserError:
        return UserError(f"--resume: {meta_path} is damaged: {field} {meta.get(field)!r} {rule}; resume from another "
                         "state folder")

    for field in ("global_step", "epoch", "batch"):
        value = meta.get(field)
        if type(value) is not int or value < 0:
            raise bad(field, "must be a whole number >= 0")
    if not isinstance(meta.get("scheduler"), dict):
        raise bad("scheduler", "must be the learning-rate scheduler's state (a JSON object)")
    for field, kind in (("settings", dict), ("sharded", bool)):
        if field in meta and not isinstance(meta[field], kind):
            raise bad(field, f"must be a {'JSON object' if kind is dict else 'true or false'}")
    return meta


def check_scheduler_state(saved: dict, own: dict, where: Path) -> None:
    """The saved scheduler state has the fields of this run's scheduler with values of the same kind (a damaged
    file is one line, not a TypeError deep in torch)."""
    def kind(v):
        return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__

    for k, v in saved.items():
        if k in own and own[k] is not None and v is not None and kind(v) != kind(own[k]):
            raise UserError(f"--resume: {where} is damaged: scheduler.{k} is {v!r}, expected a {kind(own[k])}; resume "
                            "from another state folder")


def check_rng_states(rng: dict[str, torch.Tensor], where: Path) -> None:
    cpu = rng.get("cpu")
    if cpu is None or cpu.dtype != torch.uint8 or cpu.ndim != 1 or cpu.numel() != torch.get_rng_state().numel():
        raise UserError(f"--resume: {where} is damaged (no valid 'cpu' random-number state); resume from another state "
                        "folder")
    for k, v in rng.items():
        if k != "cpu" and (not k.startswith("cuda") or v.dtype != torch.uint8 or v.ndim != 1):
            raise UserError(f"--resume: {where} is damaged ({k!r} is not a random-number state); resume from another "
                            "state folder")


def check_resume_settings(folder: str | Path, meta: dict, expected: dict) -> None:
    """The settings recorded in the state must equal this run's (training mode, model version, optimizer,
    network shape): otherwise one error saying which option to change."""
    for key, value in expected.items():
        saved = meta.get("settings", {}).get(key)
        if saved is not None and saved != value:
            raise UserError(f"--resume: {folder} was saved with {key} {saved!r} but this run has {value!r}; resume with "
                            f"the same {key}")


def load_state(folder: str | Path, optimizer, scheduler, tensors: bool = True
               ) -> tuple[TrainState, dict[str, torch.Tensor] | None, dict]:
    """Counters, scheduler and RNG; with tensors also the trainable weights and the optimizer (sharded runs load
    those themselves)."""
    folder = Path(folder)
    meta = read_state_meta(folder)
    trainable = None

    def read(name: str, fn):
        path = folder / name
        if not path.is_file():
            raise UserError(f"--resume: {folder} lacks {name} (an incomplete copy?); resume from another state folder")
        try:
            return fn(path)
        except UserError:
            raise
        except Exception as e:
            if "weights only load failed" in str(e).lower():  # torch's hint there (weights_only=False) runs code
                raise UserError(f"--resume: {path} holds objects other than tensors and plain values, which are "
                                "refused (loading them could run code); resume from a state folder written by this "
                                "tool") from None
            raise UserError(f"--resume: {path} cannot be read ({describe_error(e)}); resume from another state "
                            "folder") from None

    if tensors:
        trainable = read("trainable.safetensors", lambda p: load_file(str(p)))
        opt_state = read("optimizer.pt", lambda p: torch.load(p, weights_only=True))
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise UserError(f"--resume: the optimizer state in {folder} does not fit this run's optimizer "
                            f"({str(e).splitlines()[0][:200]}); resume with the --optimizer_type, --optimizer_args "
                            "and network options of the run that saved it") from None
    own = scheduler.state_dict()
    check_scheduler_state(meta["scheduler"], own, folder / "train_state.json")
    scheduler.load_state_dict({**own, **meta["scheduler"]})
    rng = read("rng.safetensors", lambda p: load_file(str(p)))
    check_rng_states(rng, folder / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    state = TrainState(meta["global_step"], meta["epoch"], meta["batch"])
    return state, trainable, meta


def load_trainable(module: torch.nn.Module, weights: dict[str, torch.Tensor], folder: str | Path) -> None:
    """Trainable weights of a state into the module; a different network (rank, targets) is one clear error."""
    own = module.state_dict()
    missing, unexpected = own.keys() - weights.keys(), weights.keys() - own.keys()
    shapes = [k for k in own.keys() & weights.keys() if own[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected weights" if missing or unexpected else
                  f"{shapes[0]} is {tuple(weights[shapes[0]].shape)} there but {tuple(own[shapes[0]].shape)} here")
        raise UserError(f"--resume: {folder} holds other trainable weights than this run makes ({detail}); resume "
                        "with the network options (--network_dim, --network_args) and model of the run that saved it")
    module.load_state_dict(weights, strict=True)
