"""Preemption: finish the step, checkpoint and stop on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

import jax
import numpy as np


class PreemptionGuard:
    """On SIGTERM (what preemptible TPU VMs and Slurm send) or SIGINT: finish the current step,
    checkpoint, and stop; a second signal exits at once (status 128 + signal). All processes of a
    multi-host run stop at the same step: the flag is all-gathered before it is acted on."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signal is not None:
            os._exit(128 + signum)
        self.signal = signum
        print(f"\n[train] received {signal.Signals(signum).name}: checkpointing after this step "
              "(send it again to abort at once)", file=sys.stderr, flush=True)

    def __call__(self, step: int) -> bool:
        flag = self.signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
