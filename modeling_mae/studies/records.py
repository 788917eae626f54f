"""A study's record: one JSON file that holds every stage's arguments, results and curves, with the code's git SHA,
the library versions, the machine and the wall time. It is the only source of a study's tables and figures (they are
rendered from it, never typed), and one stage can be run again from it (`rerun_stage`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from ..errors import UsageError
from .stages import RESULTS_FILE, STAGE_RECORD_FILE, STUDY_FOLDER, Stage, StageRunner

CPU_FILE = "cpu_seconds.json"  # beside a stage's stage.json: the process CPU time it took (threads summed)

LIBRARIES = ("torch", "torchvision", "transformers", "datasets", "accelerate", "numpy", "matplotlib")


def git_revision(repository: pathlib.Path) -> dict[str, Any]:
    """The commit the code ran from, and whether the working tree had changes on top of it."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(repository), *args], capture_output=True, text=True, check=False)
        return result.stdout.strip()

    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": git("rev-parse", "HEAD") or "unknown", "dirty": bool(changes)}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def cpu_model() -> str:
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if found:
            return found.group(1).strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch  # here, not at the top: a study's --help answers without loading torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"system": platform.system(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpu": gpu}


def environment(repository: pathlib.Path) -> dict[str, Any]:
    return {"git": git_revision(repository), "libraries": library_versions(), "machine": machine(),
            "command": " ".join(["python", *sys.argv])}


def write_cpu_seconds(folder: pathlib.Path, seconds: float) -> None:
    (folder / CPU_FILE).write_text(json.dumps({"cpu_seconds": seconds}))


def stage_entry(runner: StageRunner, stage: Stage) -> dict[str, Any]:
    """A finished stage as the record keeps it: script, arguments (`{output_dir}` form), wall time, CPU time (when
    measured), results."""
    folder = runner.folder(stage.name)
    ran = json.loads((folder / STAGE_RECORD_FILE).read_text())
    cpu = json.loads((folder / CPU_FILE).read_text())["cpu_seconds"] if (folder / CPU_FILE).is_file() else None
    return {"script": stage.script, "argv": ran["argv"], "wall_seconds": ran["wall_seconds"], "cpu_seconds": cpu,
            "results": json.loads((folder / RESULTS_FILE).read_text())}


def stage_entries(runner: StageRunner, stages: Iterable[Stage]) -> dict[str, dict[str, Any]]:
    return {stage.name: stage_entry(runner, stage) for stage in stages}


def write_record(path: pathlib.Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")


def load_record(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"no study record at {path}")
    return json.loads(path.read_text())


def recorded_stage(record: dict[str, Any], name: str) -> Stage:
    """Stage `name` as it ran, its `{output_dir}` paths left for the runner to place."""
    stages = record["stages"]
    if name not in stages:
        raise UsageError(f"the record has no stage {name!r}; its stages: {', '.join(stages)}")
    return Stage(name, stages[name]["script"], tuple(stages[name]["argv"]))


def inputs_of(record: dict[str, Any], stage: Stage) -> list[str]:
    """The stages whose folders `stage` reads (a fine-tuning reads its pretraining), in the order to run them."""
    prefix = STUDY_FOLDER + os.sep
    names = [arg.removeprefix(prefix).split(os.sep)[0] for arg in stage.argv if arg.startswith(prefix)]
    return [upstream for name in names for upstream in (*inputs_of(record, recorded_stage(record, name)), name)]


def rerun_stage(record: dict[str, Any], name: str, runner: StageRunner) -> dict[str, Any]:
    """Run stage `name` of the record again under the runner's folder (after the stages it reads, reused if there);
    returns its new results."""
    def placed(stage: Stage) -> Stage:
        folder = f"{runner.output_dir}{os.sep}"
        return Stage(stage.name, stage.script, tuple(arg.replace(STUDY_FOLDER + os.sep, folder) for arg in stage.argv))

    for upstream in inputs_of(record, recorded_stage(record, name)):
        runner.run(placed(recorded_stage(record, upstream)))
    return runner.run(placed(recorded_stage(record, name)))
