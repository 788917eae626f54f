"""One run at a time in an output folder: `output_dir/.run.lock`, held from start-up to the end of the run.

Two runs writing to one folder mix their checkpoints, exports, results and `run_config.yaml`, and both exit 0. So the
main process of a run creates the lock file with `O_CREAT | O_EXCL` (atomic on local filesystems and NFS v3+, so one
of two runs started at once wins), writes who holds it (host, process id and start time, SLURM job, command), and
touches it every `HEARTBEAT_S` seconds while the run lives; the other processes of the run share it. Creating it is
also the start-up check that `output_dir` is writable, before any model or data is built.

A run that finds the lock held stops with one line naming the holder, unless the holder is gone, in which case the
lock is taken back (with a warning):
- a holder on this host whose process has ended (or whose process id now belongs to a process started later);
- an earlier run of this SLURM job (a requeued job keeps its id, and `SLURM_RESTART_COUNT` counts its runs);
- any holder, on any host, whose heartbeat is older than `STALE_AFTER_S`, measured on the filesystem's own clock
  (the modification time of a file just written next to the lock), so that the machines' clocks need not agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pathlib
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..errors import UsageError, describe

logger = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: the holder's machine or process is gone
TAKE_BACK_ATTEMPTS = 3  # a stale lock taken back, then lost to another run starting at the same moment


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock file says, enough to tell whether that run still lives."""

    host: str
    pid: int
    process_started: float  # the process's start time: a reused process id is another process
    slurm_job: str | None  # SLURM_JOB_ID: a requeued job keeps it
    slurm_restarts: int  # SLURM_RESTART_COUNT: how many times the job was requeued
    command: str
    token: str  # unique to one acquisition

    @classmethod
    def this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time(), os.environ.get("SLURM_JOB_ID"),
                   int(os.environ.get("SLURM_RESTART_COUNT", "0")), shlex.join([sys.executable, *sys.argv]),
                   uuid.uuid4().hex)

    @classmethod
    def from_text(cls, text: str) -> Holder | None:
        """The holder a lock file names; None for one being written (or damaged)."""
        try:
            holder = cls(**json.loads(text))
        except (ValueError, TypeError):
            return None
        numbers = (holder.pid, holder.slurm_restarts, holder.process_started)
        return holder if all(isinstance(number, (int, float)) for number in numbers) else None

    def describe(self, heartbeat_age: float) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.process_started))
        return (f"process {self.pid} on {self.host}{job}, started {started}, heartbeat {heartbeat_age:.0f} s ago: "
                f"{self.command}")


def why_gone(holder: Holder | None, heartbeat_age: float, me: Holder) -> str | None:
    """Why the run holding a lock is gone for sure (the rules of the module docstring); None if it may still run."""
    if heartbeat_age > STALE_AFTER_S:
        return f"no heartbeat for {heartbeat_age:.0f} s"
    if holder is None:  # a run writing it this very moment (a damaged file goes stale with time)
        return None
    if holder.slurm_job is not None and holder.slurm_job == me.slurm_job and holder.slurm_restarts < me.slurm_restarts:
        return f"an earlier run of this SLURM job {holder.slurm_job}, requeued since"
    if holder.host == me.host and not process_runs(holder.pid, holder.process_started):
        return f"its process {holder.pid} has ended"
    return None


def process_runs(pid: int, started: float) -> bool:
    """Process `pid` of this host runs and is the one started at `started` (not a later one given the same id)."""
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it runs
        return True


def filesystem_now(folder: pathlib.Path) -> float:
    """The time on the clock of the filesystem holding `folder` (a shared filesystem's server stamps new files)."""
    probe = folder / f"{LOCK_NAME}.clock.{uuid.uuid4().hex}"
    probe.touch()
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink()


class OutputDirLock:
    """The lock of one output folder, for one run's main process: `acquire`, then `release` at the end."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.folder = pathlib.Path(output_dir).absolute()
        self.path = self.folder / LOCK_NAME
        self.holder = Holder.this_process()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, taking it back from a run that is gone; a `UsageError` naming the holder if one runs, or
        saying that the folder cannot be written."""
        for _ in range(TAKE_BACK_ATTEMPTS):
            if self._create():
                self._heartbeat = threading.Thread(target=self._beat, name="output-dir-lock", daemon=True)
                self._heartbeat.start()
                return
            seen, age = self._look()
            holder = Holder.from_text(seen)
            gone = why_gone(holder, age, self.holder)
            if gone is None:
                who = holder.describe(age) if holder is not None else "a run starting at this moment"
                raise UsageError(
                    f"--output_dir {self.folder} is in use by another run ({who}): wait for it to end, or pass "
                    f"another --output_dir. A lock whose run is gone is taken back: at once for a process of this "
                    f"host, after {STALE_AFTER_S:.0f} s without heartbeat for another host's ({self.path})"
                )
            self._take_back(seen, gone, holder.describe(age) if holder is not None else "unreadable")
        raise UsageError(f"--output_dir {self.folder}: other runs keep taking its lock {self.path}: start one at a "
                         "time")

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._is_ours():  # never another run's: one that took the lock back after this run's heartbeat stalled
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        """Create the lock file naming this process; False if it exists."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as error:  # read-only filesystem, no permission, a file where a folder belongs
            raise self._not_writable(error) from error
        with os.fdopen(descriptor, "w") as file:
            json.dump(dataclasses.asdict(self.holder), file)
            file.flush()
            os.fsync(file.fileno())  # complete before another host reads it
        return True

    def _look(self) -> tuple[str, float]:
        """The lock file's text and its heartbeat's age (seconds, on the filesystem's clock); a lock released in
        between reads as stale and empty."""
        try:
            text, modified = self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return "", float("inf")
        try:
            return text, filesystem_now(self.folder) - modified
        except OSError as error:  # a lock left in a folder that is read-only now
            raise self._not_writable(error) from error

    def _not_writable(self, error: OSError) -> UsageError:
        return UsageError(
            f"--output_dir {self.folder} is not writable ({describe(error)}): pass a folder you can write to"
        )

    def _take_back(self, seen: str, why: str, holder: str) -> None:
        """Remove the lock a gone run left, as seen (`seen`): renamed first, so that a lock another starting run
        wrote in the meantime is put back rather than removed."""
        taken = self.path.with_name(f"{LOCK_NAME}.{self.holder.token}.gone")
        try:
            os.rename(self.path, taken)
        except FileNotFoundError:  # another starting run took it back first
            return
        if taken.read_text() == seen:
            logger.warning("Took back the lock of %s from a run that is gone (%s): %s", self.folder, why, holder)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(taken, self.path)
        taken.unlink()

    def _is_ours(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            holder = Holder.from_text(self.path.read_text())
            return holder is not None and holder.token == self.holder.token
        return False

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
                lost = not self._is_ours()
            except OSError as error:
                lost = error.errno == errno.ENOENT
            if lost and not warned:
                logger.error("The lock %s is no longer this run's: another run may now write to %s too", self.path,
                             self.folder)
                warned = True


@contextlib.contextmanager
def holding_output_dir(accelerator: Accelerator, output_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold `output_dir`'s lock for the block; call it on every process, before anything is built. The main process
    takes it and tells the others whether it could, so that every process of a refused run stops with the same line."""
    lock = OutputDirLock(output_dir) if accelerator.is_main_process else None
    refusal = None
    if lock is not None:
        try:
            lock.acquire()
        except UsageError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise UsageError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
