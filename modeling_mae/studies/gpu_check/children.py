"""The GPU check's child processes, parent side: how a child starts (offline, its own process group) and ends (with
every descendant, at its timeout), the measuring children run as sections (`child_section`: the throughput and the
compile modes, each with the rest of the time budget), and the background compilation of the throughput model
(`start_warmup`, `wait_for_warmup`) while the engines run."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil  # an Accelerate dependency

from .config import GPU_CHECK_SCRIPT, REPO, Results, read_json
from .state import Check, LaunchError

LOG_TAIL_CHARS = 4000


def child_environment(check: Check) -> dict[str, str]:
    """Offline, our code first on the path, a private HF_HOME (remote code is copied there on load)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(check.work_dir / "hf_home"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if not check.gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU processes (gloo)
    return env


def start_child(check: Check, command: list[str], stream: Any) -> subprocess.Popen:
    """A child process leading its own process group, so that it can be ended with everything it started
    (`accelerate launch` starts the script as a grandchild); the group stays in this session, which ends it if this
    process is killed."""
    return subprocess.Popen(command, cwd=REPO, env=child_environment(check), stdout=stream, stderr=subprocess.STDOUT,
                            process_group=0)


def finish_child(process: subprocess.Popen, timeout_s: float) -> int | None:
    """The child's exit status, or None if it had to be ended after `timeout_s`: with its process group and every
    descendant (torch's elastic launcher, behind `accelerate launch` for FSDP and DeepSpeed, starts its workers in
    a session of their own)."""
    try:
        return process.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        return None
    finally:
        if process.poll() is None:  # timed out, or this process is being stopped
            descendants = psutil.Process(process.pid).children(recursive=True)
            os.killpg(process.pid, signal.SIGKILL)
            for descendant in descendants:
                with contextlib.suppress(psutil.NoSuchProcess):
                    descendant.kill()
            process.wait()


def run_child(check: Check, command: list[str], log: pathlib.Path, timeout_s: float) -> None:
    """Run a child process with its output in `log`; raise LaunchError with the log's tail if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    timeout_s = min(timeout_s, check.remaining())
    with log.open("w") as stream:
        returncode = finish_child(start_child(check, command, stream), timeout_s)
    if returncode is None:
        raise LaunchError(f"timed out after {timeout_s:.0f} s: {log}\n{log_tail(log)}")
    if returncode != 0:
        raise LaunchError(f"exit status {returncode}: {log}\n{log_tail(log)}")


def log_tail(log: pathlib.Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:]


def start_warmup(check: Check) -> None:
    """Start compiling the throughput model in the background: torch.compile caches what it compiles (on disk), so
    the throughput section then finds it compiled instead of spending a minute of the budget on it."""
    if check.args.compile and check.wants("throughput"):
        log = check.work_dir / "logs" / "compile_warmup.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as stream:
            check.warmup = start_child(check, [sys.executable, str(GPU_CHECK_SCRIPT), "--role", "warmup",
                                               *forwarded_flags(check.args)], stream)


def wait_for_warmup(check: Check, result: Results, reserve_s: float = 60.0) -> None:
    """Let the background compilation finish (leaving `reserve_s` to measure), or end it."""
    if check.warmup is not None:
        started = time.monotonic()
        result["warmup"] = {"exit_status": finish_child(check.warmup, check.remaining() - reserve_s),
                            "waited_s": round(time.monotonic() - started, 1)}
        check.warmup = None


def child_section(check: Check, role: str, record_name: str) -> Callable[[Results], None]:
    """Run a measuring child with the rest of the time budget; its record (partial if it was stopped) is the result."""
    def run(result: Results) -> None:
        wait_for_warmup(check, result)
        record = check.work_dir / "records" / f"{record_name}.json"
        record.unlink(missing_ok=True)
        command = [sys.executable, str(GPU_CHECK_SCRIPT), "--role", role, "--record", str(record),
                   "--deadline", str(time.time() + check.remaining() - 20), *forwarded_flags(check.args)]
        try:
            run_child(check, command, check.work_dir / "logs" / f"{record_name}.log", check.remaining())
        finally:
            result.update(read_json(record) or {})
    return run


def forwarded_flags(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--work_dir", args.work_dir, "--loader_workers",
            ",".join(map(str, args.loader_workers)), "--compile_modes", ",".join(args.compile_modes),
            "--compile" if args.compile else "--no-compile"] + (["--tiny"] if args.tiny else [])
