"""A queue of runs: each is one of the real scripts in a subprocess (every check, lock and interrupted-state rule of
the scripts applies), run one after another; its output is kept (and written to <project>/runs/<id>.log), its
progress read off the script's progress bar. Stopping a running script sends SIGTERM, on which training saves an
interrupted state and generation keeps its finished images. The list of runs is kept in <project>/runs/runs.json, so
a restarted UI shows the earlier runs, their results and logs (a run the server's end cut short reads "interrupted")."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

PROGRESS = re.compile(r"(\d+)/(\d+) \[")
ERROR_LINE = re.compile(r"^(error: |\S+: error: )")  # the scripts' one error line; argparse's usage errors


@dataclass
class Run:
    id: int
    kind: str  # train | cache_latents | cache_text | generate | caption | convert | ema | merge | download
    title: str
    argv: list[str]
    info: dict = field(default_factory=dict)  # what the UI needs to show results (output_dir, output_name, ...)
    state: str = "queued"  # queued | running | done | failed | stopped | cancelled
    returncode: int | None = None
    started: float | None = None
    ended: float | None = None
    progress: tuple[int, int] | None = None
    log: deque = field(default_factory=lambda: deque(maxlen=400))
    process: subprocess.Popen | None = None

    @property
    def command_line(self) -> str:
        """What to paste into a terminal to run the same thing."""
        argv = ["python", *self.argv[1:]] if self.argv and self.argv[0] == sys.executable else self.argv
        return shlex.join(argv)

    def record(self) -> dict:
        return {"id": self.id, "kind": self.kind, "title": self.title, "argv": self.argv, "info": self.info,
                "state": self.state, "returncode": self.returncode, "started": self.started, "ended": self.ended,
                "progress": self.progress}

    def public(self, log_lines: int = 0) -> dict:
        out = {"id": self.id, "kind": self.kind, "title": self.title, "state": self.state, "command": self.command_line,
               "returncode": self.returncode, "progress": self.progress, "info": self.info,
               "seconds": round((self.ended or time.time()) - self.started, 1) if self.started else None,
               "error": next((line for line in reversed(self.log) if ERROR_LINE.match(line)), None)}
        if log_lines:
            out["log"] = list(self.log)[-log_lines:]
        return out


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class RunQueue:
    def __init__(self, folder: Path, cwd: Path):
        self.folder, self.cwd = Path(folder), Path(cwd)
        self.lock = threading.Lock()
        self.runs: list[Run] = self._load()
        self.wake = threading.Condition(self.lock)
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="runs", daemon=True)
        self.worker.start()

    def _load(self) -> list[Run]:
        """The runs of earlier sessions of this project, with the tail of each log."""
        path = self.folder / "runs.json"
        try:
            records = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        except (OSError, ValueError):
            return []  # a damaged history is not worth refusing to start over
        runs = []
        for r in records:
            run = Run(r["id"], r["kind"], r["title"], r["argv"], r.get("info", {}), r["state"], r.get("returncode"),
                      r.get("started"), r.get("ended"), tuple(r["progress"]) if r.get("progress") else None)
            if run.state in ("queued", "running", "stopping"):
                run.state = "interrupted"
            log = self._log_path(run)
            if log.is_file():
                run.log.extend(log.read_text(encoding="utf-8", errors="replace").splitlines()[1:])
            runs.append(run)
        return runs

    def _save(self) -> None:
        """runs.json, written whole (temp file + rename); called with the lock held."""
        from ..fileio import atomic_path

        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / "runs.json") as tmp:
            tmp.write_text(json.dumps([r.record() for r in self.runs], indent=1), encoding="utf-8")

    def _log_path(self, run: Run) -> Path:
        return self.folder / f"{run.id:04d}_{run.kind}.log"

    def submit(self, kind: str, title: str, argv: list[str], **info) -> Run:
        with self.lock:
            run = Run(max((r.id for r in self.runs), default=0) + 1, kind, title, argv, info)
            self.runs.append(run)
            self._save()
            self.wake.notify_all()
        return run

    def get(self, run_id: int) -> Run | None:
        with self.lock:
            return next((r for r in self.runs if r.id == run_id), None)

    def stop(self, run_id: int) -> Run | None:
        """A queued run is cancelled; a running one gets SIGTERM (training saves an interrupted state)."""
        run = self.get(run_id)
        if run is None:
            return None
        with self.lock:
            if run.state == "queued":
                run.state = "cancelled"
            elif run.state == "running" and run.process is not None:
                run.state = "stopping"
                run.process.send_signal(signal.SIGTERM)
            self._save()
        return run

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for r in self.runs:
                if r.state in ("running", "stopping") and r.process is not None:
                    r.process.send_signal(signal.SIGTERM)
            self.wake.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            with self.lock:
                if all(r.state not in ("queued", "running", "stopping") for r in self.runs):
                    return True
            time.sleep(0.1)
        return False

    def _next(self) -> Run | None:
        with self.lock:
            while not self.closed:
                run = next((r for r in self.runs if r.state == "queued"), None)
                if run is not None:
                    run.state, run.started = "running", time.time()
                    self._save()
                    return run
                self.wake.wait(1.0)
        return None

    def _work(self) -> None:
        while (run := self._next()) is not None:
            self._execute(run)

    def _execute(self, run: Run) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self._log_path(run).open("w", encoding="utf-8") as log_file:
            log_file.write(run.command_line + "\n")
            try:
                proc = subprocess.Popen(run.argv, cwd=self.cwd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                run.log.append(f"error: cannot start {run.argv[0]}: {e}")
                with self.lock:
                    run.state, run.ended = "failed", time.time()
                    self._save()
                return
            run.process = proc
            buffer = b""
            while chunk := proc.stdout.read1(4096):
                buffer += chunk
                *lines, buffer = re.split(rb"[\r\n]", buffer)
                for raw in lines:
                    self._line(run, raw.decode("utf-8", "replace"), log_file)
            if buffer:
                self._line(run, buffer.decode("utf-8", "replace"), log_file)
            run.returncode = proc.wait()
        with self.lock:
            stopped = run.state == "stopping"
            run.state = "stopped" if stopped else "done" if run.returncode == 0 else "failed"
            run.ended = time.time()
            run.process = None
            self._save()

    @staticmethod
    def _line(run: Run, line: str, log_file) -> None:
        if not line.strip():
            return
        m = PROGRESS.search(line)
        if m:
            run.progress = (int(m[1]), int(m[2]))
            if run.log and PROGRESS.search(run.log[-1]):  # a progress bar redraw replaces the previous one
                run.log[-1] = line
                return
        run.log.append(line)
        log_file.write(line + "\n")
        log_file.flush()
