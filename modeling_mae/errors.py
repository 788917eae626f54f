"""Mistakes the user can fix, reported as one line: what is wrong and what to do.

Library code raises `UsageError` for a wrong flag, a missing folder, a corrupt checkpoint or shard, a full disk; the
scripts' entry points run through `run_main`, which prints that one line and exits with status 2 (argparse's status
for a bad command line). Every other exception keeps its traceback: it is a bug of ours.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_USAGE = 2


class UsageError(ValueError):
    """A mistake in the command line, the data, the environment or a checkpoint; the message says how to fix it.

    A `ValueError`, so code that validates inputs (and callers that catch `ValueError`) keep working.
    """


def _rank_prefix() -> str:
    # Under `accelerate launch` every process may hit the same mistake: say which one speaks.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}] " if world_size > 1 else ""


def run_main(main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None) -> int:
    """Run a script's `main(argv)`; a `UsageError` becomes one line on stderr and exit status 2.

    Use as `sys.exit(run_main(main))` under `if __name__ == "__main__":`.
    """
    try:
        main(list(sys.argv[1:] if argv is None else argv))
    except UsageError as error:
        print(f"{_rank_prefix()}error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return 0
