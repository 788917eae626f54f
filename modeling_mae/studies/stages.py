"""Studies built from the run scripts: chains of stages, each one script's `main(argv)` run in this process.

`run_scripts/evidence.py` (does pretraining help?) and `run_scripts/scaling_study.py` (does it help more as the model
grows?) are such chains: pretrainings, then evaluations of what they wrote. A `StageRunner` runs each `Stage` with
the output it prints in `output_dir/NAME.log` and its results in `output_dir/NAME/all_results.json`. A stage whose
results exist is reused, so an interrupted study continues where it stopped; a stage found with results of other
arguments is an error (its inputs may have changed under the stages after it), unless `force` reruns everything.
Records write the study's own folder as `{output_dir}`, so a study moved or copied elsewhere is still reused.
A resumable stage (a training) also checkpoints every epoch: stopped part-way (a session's end, a reboot), it goes on
from its newest checkpoint when the study runs again with the same arguments, and starts afresh otherwise.

Stages run in this process rather than as subprocesses: a stage of the CI's smoke study takes about a second, a fresh
Python importing torch, transformers and datasets several.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

RESULTS_FILE = "all_results.json"
STAGE_RECORD_FILE = "stage.json"  # the arguments a stage ran with and how long it took
ATTEMPT_FILE = "attempt.json"  # the arguments of the run a stage's checkpoints belong to, and how many runs it took
STUDY_FOLDER = "{output_dir}"  # the study's folder in a record's arguments (a later stage reads an earlier one's)

ScriptMain = Callable[[Sequence[str]], Any]
# run_mae.py's and run_finetune.py's flags: one checkpoint, the newest epoch's, and continue from it if there is one.
RESUME_FLAGS = ("--checkpointing_steps", "epoch", "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest")


@dataclass(frozen=True)
class Stage:
    """One run of a script: its folder under the study's output_dir and its flags (the runner adds --output_dir)."""

    name: str
    script: str  # a file name in the scripts folder, e.g. "run_mae.py"
    argv: tuple[str, ...]
    resumable: bool = False  # the script takes RESUME_FLAGS (a training); they are not part of the stage's arguments

    def command(self, folder: pathlib.Path) -> str:
        """The same run as a shell command, for the log and for a user repeating one stage by hand."""
        return shlex.join(["python", f"run_scripts/{self.script}", *self.argv, "--output_dir", str(folder)])


@functools.cache
def script_main(path: pathlib.Path) -> ScriptMain:
    """The `main(argv)` of a script file (run scripts are no package: loaded by path, once)."""
    spec = importlib.util.spec_from_file_location(f"_stage_script_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path} is not a Python script")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the script is executed
    spec.loader.exec_module(module)
    return module.main


@contextlib.contextmanager
def output_to(path: pathlib.Path) -> Iterator[None]:
    """Send everything this process writes to stdout and stderr (print, logging, tqdm, C libraries) to `path`.

    At the file-descriptor level, as a subprocess's output would be: a logging handler created during a stage keeps
    writing to `sys.stderr`, which stays the same object, so nothing points at a closed file after the stage.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(path, "w") as log:
            for fd in saved:
                os.dup2(log.fileno(), fd)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def release_memory() -> None:
    """Free what a finished stage left behind (its models and optimizer states) before the next one starts."""
    import torch  # here, not at the top: a study's --help answers without loading torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class StageRunner:
    """Runs or reuses the stages of one study, all under `output_dir`."""

    def __init__(
        self, scripts_dir: pathlib.Path, output_dir: pathlib.Path, *, force: bool = False,
        num_threads: int | None = None,
    ) -> None:
        self.scripts_dir = scripts_dir
        self.output_dir = output_dir
        self.force = force
        self.num_threads = num_threads
        self.stage_seconds: dict[str, float] = {}  # of every stage run or reused, as long as it took when it ran

    def folder(self, name: str) -> pathlib.Path:
        """Where stage `name` writes (and what later stages read, e.g. a pretrained model)."""
        return self.output_dir / name

    def run(self, stage: Stage) -> dict[str, Any]:
        """The stage's `all_results.json`, plus `wall_seconds`: the time it took when it ran."""
        folder = self.folder(stage.name)
        if self.force or not self._reusable(stage):
            self._execute(stage, folder)
        results = json.loads((folder / RESULTS_FILE).read_text())
        results["wall_seconds"] = json.loads((folder / STAGE_RECORD_FILE).read_text())["wall_seconds"]
        self.stage_seconds[stage.name] = results["wall_seconds"]
        return results

    @property
    def total_wall_seconds(self) -> float:
        """The study's compute time: every stage's wall time, summed."""
        return sum(self.stage_seconds.values())

    def _reusable(self, stage: Stage) -> bool:
        folder = self.folder(stage.name)
        record_path = folder / STAGE_RECORD_FILE
        # Results without a record: the stage was stopped between the two writes; run it again.
        if not (record_path.is_file() and (folder / RESULTS_FILE).is_file()):
            return False
        recorded, expected = json.loads(record_path.read_text())["argv"], self._recorded_form(stage.argv)
        if recorded != expected:
            raise UsageError(
                f"{folder} holds the results of other arguments ({shlex.join(recorded)}), not of "
                f"{shlex.join(expected)}: pass --force to rerun every stage, or choose another --output_dir"
            )
        return True

    def _recorded_form(self, argv: Sequence[str]) -> list[str]:
        """`argv` as records keep it: a path into this study's folder starts with `STUDY_FOLDER`, not with where the
        folder is now, so that the record still matches after the study is moved or copied."""
        prefix = f"{self.output_dir}{os.sep}"
        return [STUDY_FOLDER + os.sep + arg.removeprefix(prefix) if arg.startswith(prefix) else arg for arg in argv]

    def _execute(self, stage: Stage, folder: pathlib.Path) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {stage.command(folder)}", flush=True)
        main = script_main(self.scripts_dir / stage.script)
        if self.num_threads is not None:
            import torch  # see release_memory

            torch.set_num_threads(self.num_threads)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STAGE_RECORD_FILE).unlink(missing_ok=True)
        attempt = self._start_attempt(stage, folder)
        log = self.output_dir / f"{stage.name}.log"
        start = time.perf_counter()
        try:
            with output_to(log):
                main([*stage.argv, *(RESUME_FLAGS if stage.resumable else ()), "--output_dir", str(folder)])
        except Exception:
            print(f"stage {stage.name} failed; its output: {log}", file=sys.stderr, flush=True)
            raise
        finally:
            release_memory()
        # The times are the last attempt's: an attempt stopped part-way is not timed (it could not write its time).
        record = {"argv": attempt["argv"], "wall_seconds": time.perf_counter() - start, "attempts": attempt["attempts"]}
        (folder / STAGE_RECORD_FILE).write_text(json.dumps(record))

    def _start_attempt(self, stage: Stage, folder: pathlib.Path) -> dict[str, Any]:
        """Count this run of the stage; checkpoints of a run with other arguments (or any, under `force`) are removed
        first, so that a resumable stage continues only its own run."""
        # Imported here: a study's --help answers without loading torch.
        from ..training.checkpoints import list_checkpoints

        path, argv = folder / ATTEMPT_FILE, self._recorded_form(stage.argv)
        earlier = json.loads(path.read_text()) if path.is_file() else None
        if self.force or earlier is None or earlier["argv"] != argv:
            earlier = {"argv": argv, "attempts": 0}
            for checkpoint in list_checkpoints(folder):
                shutil.rmtree(checkpoint)
        attempt = {"argv": argv, "attempts": earlier["attempts"] + 1}
        path.write_text(json.dumps(attempt))
        return attempt
