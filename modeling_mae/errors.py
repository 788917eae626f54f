"""Mistakes the user can fix, reported as one line: what is wrong and what to do.

Library code raises `UsageError` for a wrong flag, a missing folder, a corrupt checkpoint or shard, a full disk; the
scripts' entry points run through `run_main`, which prints that one line and exits with status 2 (argparse's status
for a bad command line). Ctrl-C is one line too, `interrupted` followed by the notes that the code it stopped added to
the `KeyboardInterrupt` (a training loop: the step, the newest checkpoint, the command that resumes), with status 130.
A run that SIGTERM or SIGUSR1 stopped once its checkpoint was saved (`StoppedBySignal`) is one line, with status 128 +
the signal's number. Every other exception keeps its traceback: it is a bug of ours. `exit_process` ends them.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


class UsageError(ValueError):
    """A mistake in the command line, the data, the environment or a checkpoint; the message says how to fix it.

    A `ValueError`, so code that validates inputs (and callers that catch `ValueError`) keep working.
    """


class StoppedBySignal(Exception):
    """A run stopped on a signal (a preemption's notice) after saving a checkpoint; the message says how to resume."""

    def __init__(self, signal_number: int, message: str) -> None:
        super().__init__(message)
        self.exit_status = 128 + signal_number  # what a shell reports for a command that the signal ended


def _rank_prefix() -> str:
    # Under `accelerate launch` every process may hit the same mistake: say which one speaks.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}] " if world_size > 1 else ""


def _tell_launcher(message: str) -> None:
    # Under torchrun (`accelerate launch` with several processes) the launcher prints a failure summary after the
    # child's output; with this reply file its "traceback :" line is our message instead of a link to its docs.
    reply_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if reply_file:
        pathlib.Path(reply_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


def run_main(main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None) -> int:
    """Run a script's `main(argv)`; a `UsageError` becomes one line on stderr and exit status 2, Ctrl-C one line
    (from the main process: every process gets the signal) and exit status 130.

    Use as `sys.exit(run_main(main))` under `if __name__ == "__main__":`.
    """
    try:
        main(list(sys.argv[1:] if argv is None else argv))
    except UsageError as error:
        message = f"{_rank_prefix()}error: {error}"
        print(message, file=sys.stderr, flush=True)
        _tell_launcher(message)
        return EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        if os.environ.get("RANK", "0") == "0":
            print(" ".join(["interrupted", *getattr(interrupt, "__notes__", [])]), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except StoppedBySignal as stopped:  # every process saved; one line is enough
        if os.environ.get("RANK", "0") == "0":
            print(stopped, file=sys.stderr, flush=True)
        return stopped.exit_status
    return 0


def exit_process(status: int) -> NoReturn:
    """End a script with `status`: `sys.exit`, except in a process that torchrun started (`accelerate launch` with
    several processes), which ends at once once its output is flushed.

    There, the gloo process groups of DDP and DeepSpeed outlive `destroy_process_group` (their threads were still
    running after `main` returned), and tearing them down with the interpreter made one process in ~7 abort with
    "terminate called without an active exception" after a complete run (measured: 3 of 20 two-process ZeRO-3 runs
    on a loaded 2-core machine), so the launcher reported a failure. Everything is written and every collective done
    by then: nothing is left for the teardown to do. Exceptions (our bugs) never get here and keep their traceback.
    """
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        sys.exit(status)
    logging.shutdown()  # what the interpreter's exit would have flushed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def describe(error: BaseException) -> str:
    """`Type: message` on one line (pyarrow's messages span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
