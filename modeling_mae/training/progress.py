"""What a run shows and logs while it trains: logging set-up, progress bars (a line every 30 s away from a terminal),
throughput, the loss window and its statistics, and the guard that stops a run whose loss keeps being non-finite.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import datasets
import huggingface_hub
import torch
import transformers
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..errors import UsageError

logger = logging.getLogger(__name__)


PROGRESS_LOG_SECONDS = 30.0  # away from a terminal, a progress line this often instead of one per refresh

Item = TypeVar("Item")


def configure_logging(accelerator: Accelerator, *loggers: logging.Logger) -> None:
    """INFO from the main process only, so that N processes do not print everything N times; the library's own
    loggers (`modeling_mae.*`) always included. Away from a terminal (a log file, a pipe), the progress bars of
    transformers, datasets and the Hub client are turned off: each refresh would be a line of the log."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING
    )
    for each in (logging.getLogger("modeling_mae"), *loggers):
        each.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    if not is_terminal():
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()


def print_outputs(accelerator: Accelerator, headline: str, outputs: Mapping[str, str | os.PathLike[str]]) -> None:
    """What a script ends with (main process): a headline, then where it wrote what, as absolute paths."""
    width = max(len(label) for label in outputs) + 1
    lines = [headline] + [f"  {label + ':':<{width}} {pathlib.Path(path).resolve()}" for label, path in outputs.items()]
    accelerator.print("\n".join(lines))


def tracker_values(values: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    """A configuration as trackers take it (TensorBoard's hparams: scalars and strings only)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in values.items()}


class NonFiniteLossError(UsageError):
    """Too many consecutive non-finite losses: the run diverged (one line: the message says how to go on)."""


class NonFiniteLossGuard:
    """Counts non-finite losses: the caller skips those micro-batches, and stops after `max_consecutive` in a row.

    Remembers the optimizer step at which the current streak began: the weights of that step already give non-finite
    losses, so only a checkpoint saved before it is a state to resume from.
    """

    def __init__(self, max_consecutive: int, total: int = 0) -> None:
        self.max_consecutive = max_consecutive
        self.total = total
        self.consecutive = 0
        self.streak_start_step = 0

    def update(self, finite: bool, step: int) -> bool:
        """Record one micro-batch of optimizer step `step` (steps completed before it); returns `finite`."""
        if finite:
            self.consecutive = 0
            return finite
        if self.consecutive == 0:
            self.streak_start_step = step
        self.total += 1
        self.consecutive += 1
        return finite

    @property
    def diverged(self) -> bool:
        return self.consecutive >= self.max_consecutive


def loss_is_finite_everywhere(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """True when the loss is finite on every process: all of them must skip the same micro-batch, or DDP hangs."""
    non_finite = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        non_finite = accelerator.reduce(non_finite, reduction="sum")
    return non_finite.item() == 0


def is_terminal() -> bool:
    """Whether progress goes to a terminal (tqdm draws on stderr)."""
    return sys.stderr.isatty()


class ProgressBar(Protocol):
    """What the scripts use of a tqdm bar."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...


class LogProgress:
    """A progress bar as plain log lines: one every `interval` seconds and one at `close`.

    A tqdm bar redraws itself in place, which a log file records as one line per refresh."""

    def __init__(
        self, total: int | None, desc: str, initial: int = 0, unit: str = "it", interval: float = PROGRESS_LOG_SECONDS
    ) -> None:
        self.total, self.desc, self.n, self.unit, self.interval = total, desc, initial, unit, interval
        self.postfix: dict[str, Any] = {}
        self.start = self.last_line = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_line >= self.interval:
            self.log()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        self.log()

    def log(self) -> None:
        self.last_line = time.monotonic()
        done = f"{self.n}/{self.total} {self.unit} ({self.n / self.total:.0%})" if self.total else f"{self.n} {self.unit}"
        elapsed = time.strftime("%H:%M:%S", time.gmtime(self.last_line - self.start))
        postfix = "".join(f", {key}={value}" for key, value in self.postfix.items())
        logger.info("%s: %s, %s elapsed%s", self.desc, done, elapsed, postfix)


def progress_bar(total: int | None, desc: str, initial: int = 0, unit: str = "it", enabled: bool = True) -> ProgressBar:
    """A tqdm bar on a terminal, `LogProgress` lines elsewhere (log lines need `configure_logging`); nothing when
    not `enabled` (e.g. on every process but the main one)."""
    if enabled and not is_terminal():
        return LogProgress(total, desc, initial, unit)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)


def tracked(
    items: Iterable[Item], desc: str, unit: str = "it", total: int | None = None, enabled: bool = True
) -> Iterator[Item]:
    """`items`, with a `progress_bar` that advances after each (its total: `total`, else `len(items)` if known)."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    bar = progress_bar(total, desc, unit=unit, enabled=enabled)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()


class Throughput:
    """Images per second since the previous call."""

    def __init__(self, samples: int) -> None:
        self.samples, self.time = samples, time.perf_counter()

    def rate(self, samples: int) -> float:
        now = time.perf_counter()
        rate = (samples - self.samples) / max(now - self.time, 1e-9)
        self.samples, self.time = samples, now
        return rate


@dataclass
class TrainingProgress:
    """Where the run stands; saved in every checkpoint (identical on all processes)."""

    completed_steps: int = 0  # optimizer steps
    epoch: int = 0
    epoch_micro_batches: int = 0  # consumed in the current epoch, on each process
    train_samples: int = 0  # images seen by all processes
    nonfinite_losses: int = 0  # skipped micro-batches
    loss_sum: float = 0.0  # of the per-step losses averaged over processes
    loss_steps: int = 0
    last_loss: float | None = None  # mean over the last logging window
    # One entry per logging step ({"step", "epoch", "loss", "learning_rate"}), like transformers' Trainer
    # `log_history`: checkpointed, so a resumed run's history is the uninterrupted run's. A resume that changed the
    # objective adds {"step", "objective_change": {field: [old, new]}}.
    log_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def train_loss(self) -> float | None:
        return self.loss_sum / self.loss_steps if self.loss_steps else None


class LossWindow:
    """Per-step losses of this process since the last `flush`; `flush` averages them over processes."""

    def __init__(self) -> None:
        self.step_losses: list[float] = []
        self._micro_losses: list[float] = []

    def add_micro_batch(self, loss: float) -> None:
        self._micro_losses.append(loss)

    def end_step(self) -> None:
        if self._micro_losses:
            self.step_losses.append(sum(self._micro_losses) / len(self._micro_losses))
        self._micro_losses = []

    def discard_step(self) -> None:
        self._micro_losses = []

    def flush(self, accelerator: Accelerator, progress: TrainingProgress) -> float | None:
        """Add the window's process-averaged losses to `progress`; a collective, call it on every process."""
        totals = torch.tensor(
            [sum(self.step_losses), len(self.step_losses)], dtype=torch.float64, device=accelerator.device
        )
        totals = accelerator.reduce(totals, reduction="sum") if accelerator.num_processes > 1 else totals
        self.step_losses = []
        loss_sum, count = totals.tolist()
        if count == 0:
            return None
        steps = int(round(count / accelerator.num_processes))
        progress.loss_sum += loss_sum / accelerator.num_processes
        progress.loss_steps += steps
        progress.last_loss = loss_sum / count
        return progress.last_loss
