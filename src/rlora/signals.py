"""Stopping on SIGINT / SIGTERM at a step boundary, with a checkpoint to resume from."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable


@contextmanager
def stop_on_signals(record: Callable[[int], None]):
    """Within this block SIGINT and SIGTERM call `record(signum)` (the loop honours it at the next
    step boundary) instead of interrupting; the previous handlers are back on exit. Off the main
    thread, where Python cannot install handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: record(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a checkpoint was written."""

    def __init__(self, signum: int, checkpoint_path: str):
        super().__init__(f"stopped by signal {signum}; checkpoint at {checkpoint_path}; continue with "
                         f"train.resume_from_checkpoint={checkpoint_path} (rlora train ... --resume latest)")
        self.signum, self.checkpoint_path = signum, checkpoint_path
