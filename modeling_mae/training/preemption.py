"""`--save_on_signal`: a preempted run saves a checkpoint and stops, rather than losing what it did since the last one.

SLURM announces the end of a job with a signal: `--signal=B:USR1@120` (configuration/slurm/) 120 s before its time
limit, SIGTERM at a preemption or `scancel`, then SIGKILL. Under `--save_on_signal` (on by default under SLURM) the
handler only records SIGTERM or SIGUSR1; the loop finishes the optimizer step it is in, and after each step every
process learns whether any process received one (a gather of the signal numbers: the processes of a job do not get a
signal at the same instant, and they must save at the same step). Then every process saves the checkpoint of that
step, the same as a `--checkpointing_steps` one, from which `--resume_from_checkpoint latest` continues exactly, and the
run ends with `errors.StoppedBySignal`: one line and exit status 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import torch
from accelerate import Accelerator

from ..errors import StoppedBySignal
from .resume import resume_command

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """SIGTERM and SIGUSR1 received by this process while `catching`, agreed on by every process after each step."""

    def __init__(self) -> None:
        self.enabled = False
        self.received = 0  # the signal's number, 0 for none

    @contextlib.contextmanager
    def catching(self, enabled: bool) -> Iterator[None]:
        """Record the stop signals in the block (when `enabled`), instead of dying on them."""
        self.enabled = enabled
        in_main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
        if enabled and not in_main_thread:
            logger.warning("--save_on_signal: not in the main thread, where signal handlers run: a signal ends the run")
        previous = {number: signal.signal(number, self._record) for number in STOP_SIGNALS} if (
            enabled and in_main_thread) else {}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            self.enabled = False

    def _record(self, number: int, frame: FrameType | None) -> None:
        self.received = number  # nothing else here: the loop acts on it between steps

    def agreed(self, accelerator: Accelerator) -> int:
        """The signal that some process received (0: none), the same on every process; a collective, call it on every
        process at the same point."""
        if not self.enabled:
            return 0
        if accelerator.num_processes == 1:
            return self.received
        received = torch.tensor([self.received], device=accelerator.device)
        return int(accelerator.gather(received).max().item())


def stopped_by(number: int, step: int, checkpoint: pathlib.Path) -> StoppedBySignal:
    """What a run stopped by signal `number` after saving `checkpoint` at optimizer step `step` ends with."""
    name = signal.Signals(number).name
    return StoppedBySignal(number, f"stopped by {name} at step {step}, its checkpoint saved: {checkpoint.absolute()}; "
                                   f"resume with: {resume_command(sys.argv)}")
