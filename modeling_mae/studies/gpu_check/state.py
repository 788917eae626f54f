"""The state of one GPU check (`run_scripts/gpu_check.py`): its arguments, sizes, deadline and results so far, how a
section runs (guarded: ok, skipped with its reason, or failed with its traceback), and the reports rewritten after
each section (`gpu_check.json` and `gpu_check.md`, to --output_dir and $OUT)."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import Results, Sizes, now_utc, write_json
from .report import markdown
from .summary import summarise

RESULTS_JSON, RESULTS_MD = "gpu_check.json", "gpu_check.md"


class SectionSkipped(Exception):
    """A section that cannot run here (no GPU, a package missing, no time left): recorded with its reason."""


class LaunchError(RuntimeError):
    """A child process failed; the message ends with the tail of its log."""


@dataclass
class Check:
    """The state of one check: arguments, where things go, the deadline, and the results so far."""

    args: argparse.Namespace
    sizes: Sizes
    results: Results
    deadline: float
    warmup: subprocess.Popen | None = None  # compiles the throughput model while the engines run

    @property
    def work_dir(self) -> pathlib.Path:
        return pathlib.Path(self.args.work_dir)

    @property
    def data_dir(self) -> pathlib.Path:
        return self.work_dir / "data"

    @property
    def initial_weights(self) -> pathlib.Path:
        return self.work_dir / "initial_weights"

    @property
    def gpu(self) -> bool:
        return self.args.device == "cuda"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def wants(self, section: str) -> bool:
        """Whether --sections names `section` (by the start of its name); environment and data always: the other
        sections read them."""
        wanted = self.args.sections
        return wanted is None or section in ("environment", "data") or section.startswith(tuple(wanted))

    def run_section(self, name: str, run: Callable[[Results], None], start_if_remaining_s: float = 0.0,
                    needs_cuda: bool = False) -> None:
        """Run one section into `results["sections"][name]`: ok, skipped (with the reason) or failed (with the
        traceback, and what it had measured before failing). The reports are rewritten either way."""
        started = time.monotonic()
        entry: Results = {"status": "running", "started": now_utc(), "result": {}}
        self.results["sections"][name] = entry
        print(f"[gpu_check] {name} ... ({self.remaining():.0f} s left)", flush=True)
        try:
            if needs_cuda and not torch.cuda.is_available():
                raise SectionSkipped("CUDA is not available here (run with --device cpu --tiny for the CPU dry run)")
            if self.remaining() < start_if_remaining_s:
                raise SectionSkipped(f"out of time: {self.remaining():.0f} s left, it needs {start_if_remaining_s:.0f}")
            run(entry["result"])
            entry["status"] = "ok"
        except SectionSkipped as reason:
            entry.update(status="skipped", reason=str(reason))
        except Exception as error:  # noqa: BLE001 - one failed section must not lose the others
            entry.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        entry["seconds"] = round(time.monotonic() - started, 1)
        note = (entry.get("reason") or entry.get("error") or "").split("\n")[0]
        print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']} s {note}", flush=True)
        self.write()

    def write(self) -> str:
        """The JSON and the markdown, to --output_dir and $OUT. A bug in the summary or the tables must not lose
        the measurements: it is recorded, and the JSON is written anyway."""
        self.results["meta"]["seconds"] = round(time.monotonic() - self.results["meta"]["monotonic_start"], 1)
        try:
            self.results["summary"] = summarise(self.results, self.sizes)
            report = markdown(self.results)
        except Exception:  # noqa: BLE001 - see the docstring
            self.results["report_error"] = traceback.format_exc()
            report = f"The report failed; the measurements are in {RESULTS_JSON}:\n\n{self.results['report_error']}"
        output_dirs = [pathlib.Path(self.args.output_dir)] + ([pathlib.Path(os.environ["OUT"])]
                                                              if os.environ.get("OUT") else [])
        for output_dir in dict.fromkeys(output_dirs):
            write_json(output_dir / RESULTS_JSON, self.results)
            (output_dir / RESULTS_MD).write_text(report)
        return report
