"""`run_main`: a user's mistake is one line and exit status 2; our own bugs keep their traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from modeling_mae.errors import EXIT_USAGE, UsageError, run_main


def test_a_usage_error_is_one_line_on_stderr_and_exit_status_2(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")

    def main(argv):
        raise UsageError(f"--flag {argv[0]} is wrong: use --flag 1")

    assert run_main(main, ["0"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err == "error: --flag 0 is wrong: use --flag 1\n"
    assert captured.out == ""


def test_under_several_processes_the_line_names_the_rank(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def main(argv):
        raise UsageError("bad")

    assert run_main(main, []) == EXIT_USAGE
    assert capsys.readouterr().err == "[rank 1] error: bad\n"


def test_other_exceptions_propagate_with_their_traceback():
    def main(argv):
        raise KeyError("our bug")

    with pytest.raises(KeyError, match="our bug"):
        run_main(main, [])


def test_a_successful_main_exits_0():
    seen = []
    assert run_main(seen.append, ["--a", "1"]) == 0
    assert seen == [["--a", "1"]]


def test_under_torchrun_the_error_is_also_the_launchers_reply(tmp_path, monkeypatch):
    """torchrun prints a failure summary after the child's output; its "traceback :" line shows this reply."""
    reply = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(reply))
    monkeypatch.setenv("WORLD_SIZE", "1")

    def main(argv):
        raise UsageError("bad")

    assert run_main(main, []) == EXIT_USAGE
    assert json.loads(reply.read_text())["message"] == "error: bad"


EXITING_SCRIPT = """
import atexit, logging, sys
from modeling_mae.errors import exit_process
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
atexit.register(lambda: print("interpreter teardown ran", flush=True))
logging.getLogger("script").info("all written")
print("buffered output", end="")
exit_process(3)
"""


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_exit_process_skips_the_teardown_only_under_torchrun(tmp_path, under_torchrun):
    """Under torchrun the process ends once its output is flushed, without the interpreter's teardown (where gloo's
    threads aborted a finished run); elsewhere it is sys.exit."""
    env = {key: value for key, value in os.environ.items() if key != "TORCHELASTIC_RUN_ID"}
    if under_torchrun:
        env["TORCHELASTIC_RUN_ID"] = "test"
    done = subprocess.run([sys.executable, "-c", EXITING_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout.startswith("buffered output") and "INFO:script:all written" in done.stderr
    assert ("interpreter teardown ran" in done.stdout) is not under_torchrun
