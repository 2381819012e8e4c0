"""Stopping on request: SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C).

The handler only records the request; the trainer finishes the step it is in, all
ranks agree (the request may reach one rank only), a checkpoint is written and the
run exits 0, as Megatron's exit-signal handler does. A second Ctrl-C stops at once.
DeepSpeed's launcher passes SIGTERM/SIGINT on to the ranks and waits 30 s per rank
before SIGKILL.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"received {self.signal_name}: stopping after this step with a checkpoint", flush=True)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
