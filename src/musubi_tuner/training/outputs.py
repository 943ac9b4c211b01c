"""A training run's files in its output folder: checkpoint names, pruning, the run lock, leftovers of killed saves
and the loss log.

    <output_name>.safetensors            final weights        <output_name>-state            its resumable state
    <output_name>-000002.safetensors     end of epoch 2       <output_name>-000002-state
    <output_name>-step00000500...        after step 500       <output_name>-step00000500-state
    <output_name>-interrupted...         stopped by a signal or an error (the state of the last finished step)
    <output_name>_loss_log.csv           one row per optimizer step
    <output_name>_loss.png               the loss (and validation) curve, redrawn at each save
    .<output_name>.lock                  held (flock) while a run writes these files

Names are matched literally, so an --output_name with glob or regex characters (`lor?`, `lora[1]`) is just a name.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from ..errors import UserError
from ..fileio import TMP_SUFFIX, atomic_path, open_no_follow, remove_path

logger = logging.getLogger(__name__)

_TAIL = re.compile(r"(?:-(?P<epoch>\d{6})|-step(?P<step>\d{8})|(?P<interrupted>-interrupted))?"
                   r"(?P<suffix>-state|\.safetensors)")


def checkpoint_name(output_name: str, epoch: int | None = None, step: int | None = None,
                    interrupted: bool = False) -> str:
    if interrupted:
        return f"{output_name}-interrupted"
    if step is not None:
        return f"{output_name}-step{step:08d}"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}"
    return output_name


def parse_checkpoint(entry: str, output_name: str) -> tuple[str, int | None, bool] | None:
    """(kind, number, is_state) of a checkpoint file or state folder of `output_name`, else None.
    kind: epoch | step | final | interrupted."""
    if not entry.startswith(output_name):
        return None
    m = _TAIL.fullmatch(entry[len(output_name):])
    if m is None:
        return None
    state = m["suffix"] == "-state"
    if m["epoch"]:
        return "epoch", int(m["epoch"]), state
    if m["step"]:
        return "step", int(m["step"]), state
    return ("interrupted" if m["interrupted"] else "final"), None, state


def loss_log_path(output_dir: Path, output_name: str) -> Path:
    return Path(output_dir) / f"{output_name}_loss_log.csv"


def validation_log_path(output_dir: Path, output_name: str) -> Path:
    return Path(output_dir) / f"{output_name}_validation_log.csv"


def loss_plot_path(output_dir: Path, output_name: str) -> Path:
    return Path(output_dir) / f"{output_name}_loss.png"


def _logs(output_dir: Path, output_name: str) -> set[str]:
    return {loss_log_path(output_dir, output_name).name, validation_log_path(output_dir, output_name).name,
            loss_plot_path(output_dir, output_name).name}


def prune(output_dir: Path, output_name: str, kind: str, keep_from: int, which: str = "both") -> None:
    """Delete epoch (kind='epoch') or step checkpoints of this name numbered below keep_from: weight files, -state
    folders or both (which = weights | states | both)."""
    for p in Path(output_dir).iterdir():
        parsed = parse_checkpoint(p.name, output_name)
        if parsed and parsed[0] == kind and parsed[1] < keep_from and \
                which in ("both", "states" if parsed[2] else "weights"):
            remove_path(p)


def existing_outputs(output_dir: Path, output_name: str) -> list[Path]:
    """Checkpoints, states and the loss / validation logs of an earlier run with this name."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    logs = _logs(d, output_name)
    return sorted(p for p in d.iterdir() if parse_checkpoint(p.name, output_name) or p.name in logs)


def remove_leftovers(output_dir: Path, output_name: str) -> int:
    """Temporary files and folders of saves of this output name that a killed process left (`.<name>.<rnd>.tmp`)."""
    d = Path(output_dir)
    if not d.is_dir():
        return 0
    logs = _logs(d, output_name)
    removed = 0
    for p in d.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)):
            continue
        final = p.name[1:-len(TMP_SUFFIX)].rpartition(".")[0]  # .<final>.<random>.tmp
        if parse_checkpoint(final, output_name) or final in logs:
            remove_path(p)
            removed += 1
            logger.info("removed %s (left by an interrupted save)", p)
    return removed


def keep_copy(src: Path, dst: Path) -> None:
    """dst becomes a copy of src (a file or a state folder): hard links where possible (no extra disk), so a later
    run replacing src leaves dst intact."""
    tmp = dst.with_name(f".{dst.name}.keep{TMP_SUFFIX}")
    remove_path(tmp)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=link)
    else:
        link(str(src), str(tmp))
    remove_path(dst)
    os.replace(tmp, dst)


class RunLock:
    """One run at a time per output folder and name: an flock on `.<output_name>.lock` (released by the OS when the
    process ends, even by kill -9, so a dead run's lock is simply taken over)."""

    def __init__(self, output_dir: Path, output_name: str):
        self.path = Path(output_dir) / f".{output_name}.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, "the run lock", 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise UserError(self._busy_message(holder)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file as we opened it: lock the new one
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            self.fd = fd
            return
        raise UserError(f"cannot take the run lock {self.path}; try again")

    def _busy_message(self, holder: str) -> str:
        try:
            h = json.loads(holder)
            who = f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        return (f"--output_dir {self.path.parent} with --output_name {self.path.name[1:-5]} is in use by another run "
                f"({who}); wait for it to finish or choose another --output_name")

    def release(self) -> None:
        """Remove the lock file and let go of the lock; a folder that became read-only (or vanished) keeps the file,
        which is harmless: the next run takes it over."""
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.stat(self.path, follow_symlinks=False), os.fstat(self.fd)):
                self.path.unlink()
        except OSError as e:
            logger.debug("run lock %s left in place (%s)", self.path, e)
        finally:
            os.close(self.fd)
            self.fd = None


class LossLog:
    """A CSV with one row per step, per output name: a new run starts it, a resumed run keeps the rows up to the
    step it resumes from (rows a killed run wrote after its last save are dropped) and appends."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = Path(path), columns

    def start(self, resume_step: int | None) -> None:
        rows = []
        if resume_step is not None and self.path.is_file() and not self.path.is_symlink():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                rows = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict) -> None:
        fd = open_no_follow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "the loss log")
        with os.fdopen(fd, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))
