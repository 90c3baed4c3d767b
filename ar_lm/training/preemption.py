"""Preemption: finish the step, checkpoint and stop on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Optional

import jax
import numpy as np


class PreemptionGuard:
    """On SIGTERM (what preemptible TPU VMs and Slurm send) or SIGINT: finish the current step,
    checkpoint, and stop; a second signal exits at once (status 128 + signal).

    One process acts on its own flag at once. The processes of a multi-host run all-gather their flags
    only every `every` steps, at step numbers they share, so they stop at the same step without a host
    sync in every step; `polls` counts those all-gathers. `allgather` and `process_count` default to
    JAX's own (`multihost_utils.process_allgather`, `jax.process_count`)."""

    def __init__(self, every: int = 10, allgather: Optional[Callable] = None,
                 process_count: Optional[Callable[[], int]] = None):
        self.signal: Optional[int] = None
        self.every = max(1, every)
        self.polls = 0
        self._allgather, self._process_count = allgather, process_count or jax.process_count
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signal is not None:
            print(f"\n[train] aborted on a second {signal.Signals(signum).name}: rerun the same command to resume from "
                  "the last checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = signum
        print(f"\n[train] received {signal.Signals(signum).name}: checkpointing after this step "
              "(send it again to abort at once)", file=sys.stderr, flush=True)

    def __call__(self, step: int) -> bool:
        flag = self.signal is not None
        if self._process_count() == 1:
            return flag
        if step % self.every:
            return False
        if self._allgather is None:
            from jax.experimental import multihost_utils

            self._allgather = multihost_utils.process_allgather
        self.polls += 1
        return bool(np.any(self._allgather(np.int32(flag))))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
