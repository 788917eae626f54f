"""`run_main`: a user's mistake is one line and exit status 2; our own bugs keep their traceback."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from test_training import RUN_MAE, run_args

from modeling_mae.errors import EXIT_INTERRUPTED, EXIT_USAGE, UsageError, run_main
from modeling_mae.training.checkpoints import list_checkpoints
from modeling_mae.training.resume import resume_command


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


def interrupted(argv: list[str]) -> None:
    raise KeyboardInterrupt


def test_ctrl_c_is_one_line_with_what_the_interrupted_code_noted_and_exit_status_130(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")

    def main(argv):
        interrupt = KeyboardInterrupt()
        interrupt.add_note("at step 3; newest checkpoint: /out/step_2")
        raise interrupt

    assert run_main(main, []) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted at step 3; newest checkpoint: /out/step_2\n"
    assert run_main(interrupted, []) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted\n"  # nothing noted: interrupted before training started


def test_under_several_processes_only_rank_0_tells_of_ctrl_c(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_main(interrupted, []) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == ""


def test_the_resume_command_is_the_runs_own_with_resume_latest(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    argv = ["run_scripts/run_mae.py", "--output_dir", "my run", "--resume_from_checkpoint", "my run/step_2",
            "--seed=1", "--resume-from-checkpoint=x"]
    assert resume_command(argv) == ("python run_scripts/run_mae.py --output_dir 'my run' --seed=1 "
                                    "--resume_from_checkpoint latest")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")  # several processes
    assert resume_command(argv[:1]).startswith("accelerate launch run_scripts/run_mae.py ")


def test_ctrl_c_in_a_real_run_names_the_step_the_newest_checkpoint_and_the_command_that_resumes(
    data_dir, model_config, tmp_path
):
    output = tmp_path / "run"
    flags = run_args(data_dir, model_config, output, "--checkpointing_steps", "2")
    flags[flags.index("--max_train_steps") + 1] = "100000"  # never reached: a loaded machine may starve this test
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # A background job of a non-interactive shell (CI, `nohup ... &`) inherits SIGINT ignored, and Python then keeps
    # ignoring it: give the run the disposition of a terminal's foreground process, where a user presses Ctrl-C.
    process = subprocess.Popen([sys.executable, str(RUN_MAE), *flags], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while len(list_checkpoints(output)) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert len(list_checkpoints(output)) >= 2, "no checkpoint written before Ctrl-C"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == EXIT_INTERRUPTED
    last_line = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted at step (\d+); newest checkpoint: (\S+); resume with: (.+)", last_line)
    assert match, stderr[-3000:]
    newest = list_checkpoints(output)[-1]
    assert pathlib.Path(match[2]) == newest.resolve() and int(match[1]) >= int(newest.name.removeprefix("step_"))
    assert shlex.split(match[3]) == ["python", str(RUN_MAE), *flags, "--resume_from_checkpoint", "latest"]
    assert "Traceback" not in stderr
