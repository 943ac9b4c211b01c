"""Stopping a training run without losing it: SIGINT (Ctrl-C) and SIGTERM (how schedulers preempt) ask the loop to
stop at the next optimizer-step boundary, where the state is consistent (no half-accumulated gradients) and the
resumed run continues exactly. A second SIGINT stops at once."""

from __future__ import annotations

import signal
import sys
import threading

import torch

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequest:
    """Context manager that installs the handlers (main thread only) and restores the previous ones on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: stopping after the current step and saving the state "
                  "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)
        else:
            raise KeyboardInterrupt

    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)

    def agreed(self, num_processes: int, device: torch.device) -> bool:
        """True when any process was asked to stop; with several processes all of them learn it at the same step
        (one small all-reduce per step), so they stop together and collective saves stay safe."""
        if num_processes == 1:
            return self.signum is not None
        import torch.distributed as dist

        flag = torch.tensor([0 if self.signum is None else int(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())


def ignore_signals_in_worker(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process (Ctrl-C reaches the whole process group; a worker
    dying of it would break the batch being loaded)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
