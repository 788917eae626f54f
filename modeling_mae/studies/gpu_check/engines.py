"""The GPU check's engine sections, parent side: every engine (an Accelerate config) trains the same short
pretraining through `accelerate launch` of the check's engine worker, in bf16 (checkpoint half way) and in fp32, next
to the reference engine's rounding-noise control; then each resumes from its checkpoint; and the reference engine runs
with run_mae.py's options (--torch_compile, --decode_on). Launches of one section run at once on the one GPU."""

from __future__ import annotations

import pathlib
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .children import finish_child, log_tail, start_child, start_warmup
from .config import (
    ACCELERATE_CONFIGS,
    GPU_CHECK_SCRIPT,
    Results,
    package_version,
    read_json,
)
from .state import Check, LaunchError, SectionSkipped


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def skip_reason(check: Check, engine: str) -> str | None:
    if engine == "fsdp" and not check.gpu:
        return "FSDP through Accelerate runs on GPUs only (its sharding is tested on CPU in tests/test_distributed.py)"
    if engine.startswith("deepspeed") and package_version("deepspeed") is None:
        return "deepspeed is not installed (bring the wheels: run_scripts/gpu_wheels.sh, docs/benchmarks.md)"
    return None


def run_mae_flags(check: Check, output_dir: pathlib.Path, *extra: str) -> list[str]:
    """A short pretraining from the shards: the same seed, data and masks for every engine."""
    sizes = check.sizes
    return ["--dataset_name", str(check.data_dir), "--model_name_or_path", str(check.initial_weights),
            "--norm_pix_loss", "true", "--attn_implementation", "sdpa", "--output_dir", str(output_dir),
            "--per_device_train_batch_size", str(sizes.engine_batch),
            "--per_device_eval_batch_size", str(sizes.engine_batch), "--max_eval_samples", str(sizes.engine_batch),
            "--max_train_steps", str(sizes.engine_steps), "--warmup_steps", "2",
            "--learning_rate", str(sizes.engine_learning_rate), "--logging_steps", "1", "--shuffle_buffer_size", "64",
            "--dataloader_num_workers", str(sizes.engine_workers), "--seed", "0", *extra]


@dataclass(frozen=True)
class Launch:
    """One `accelerate launch` of the check script's engine worker (run_mae.py plus the probes) on one process."""

    name: str  # its run folder and log
    section: str  # the results section it reports to, under result["runs"][key]
    key: str
    engine: str
    mixed_precision: str = "bf16"
    extra: tuple[str, ...] = ()  # run_mae.py flags
    worker_flags: tuple[str, ...] = ()

    def command(self, check: Check, record: pathlib.Path) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ACCELERATE_CONFIGS / f"{self.engine}.yaml"), "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", self.mixed_precision, "--main_process_port", str(free_port()),
                str(GPU_CHECK_SCRIPT), "--role", "engine", "--record", str(record), *self.worker_flags, "--",
                *run_mae_flags(check, run_dir(check, self.name) / "out", *self.extra)]


def run_dir(check: Check, name: str) -> pathlib.Path:
    return check.work_dir / "runs" / name


def run_launches(check: Check, launches: list[Launch]) -> None:
    """Start every launch at once and wait for all: one GPU holds them together (small models), and their numbers do
    not depend on what else runs. Each outcome goes to its section: the record, or the error with its log's tail.
    Raises LaunchError naming the launches that failed."""
    started = []
    for launch in launches:
        shutil.rmtree(run_dir(check, launch.name), ignore_errors=True)
        record = run_dir(check, launch.name) / "gpu_check_record.json"
        log = check.work_dir / "logs" / f"{launch.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as stream:
            started.append((launch, record, log, start_child(check, launch.command(check, record), stream)))
    deadline = time.monotonic() + min(check.sizes.launch_timeout_s, check.remaining())
    failed = [launch.name for launch, record, log, process in started
              if not report_launch(check, launch, record, log, finish_child(process, deadline - time.monotonic()))]
    if failed:
        raise LaunchError(f"failed: {', '.join(failed)} (logs in {check.work_dir / 'logs'})")


def report_launch(check: Check, launch: Launch, record: pathlib.Path, log: pathlib.Path,
                  returncode: int | None) -> bool:
    """Put a finished launch's record (or its error) into its section; returns whether it succeeded."""
    entry = check.results["sections"].setdefault(launch.section, {"status": "ok", "result": {}})
    if returncode == 0 and record.is_file():
        entry["result"].setdefault("runs", {})[launch.key] = {"mixed_precision": launch.mixed_precision,
                                                              "flags": list(launch.extra), **read_json(record)}
        return True
    outcome = "timed out" if returncode is None else f"exit status {returncode}"
    entry["status"] = "failed"
    entry["error"] = "; ".join(filter(None, [entry.get("error"), f"{launch.key}: {outcome}, {log}"]))
    entry.setdefault("log_tails", {})[launch.key] = log_tail(log)
    return False


def engines_train_section(check: Check) -> Callable[[Results], None]:
    """Every engine trains twice at once, in bf16 (checkpoint half way) and in fp32, next to the reference engine's
    rounding-noise control. The fp32 runs tell a bf16 difference (arithmetic) from a real one (the algorithm)."""
    half = check.sizes.engine_steps // 2

    def run(result: Results) -> None:
        launches = [Launch("noise", "engine rounding-noise control", "run", reference_engine(check),
                           worker_flags=("--rounding_noise",))]
        for engine in check.args.engines:
            if reason := skip_reason(check, engine):
                check.results["sections"][f"engine {engine}"] = {"status": "skipped", "reason": reason, "result": {}}
                continue
            check.results["sections"][f"engine {engine}"] = {"status": "ok", "result": {"engine": engine}}
            launches += [Launch(f"{engine}_full", f"engine {engine}", "full", engine,
                                extra=("--checkpointing_steps", str(half))),
                         Launch(f"{engine}_fp32", f"engine {engine}", "fp32", engine, mixed_precision="no")]
        result["launches"] = [launch.name for launch in launches]
        run_launches(check, launches)
    return run


def engines_resume_section(check: Check) -> Callable[[Results], None]:
    """Each engine whose bf16 run saved its checkpoint resumes from it in a fresh folder and trains to the final
    step; meanwhile the throughput model compiles in the background."""
    half = check.sizes.engine_steps // 2

    def run(result: Results) -> None:
        start_warmup(check)
        launches = [Launch(f"{engine}_resumed", f"engine {engine}", "resumed", engine, extra=(
            "--checkpointing_steps", str(half), "--resume_from_checkpoint",
            str(run_dir(check, f"{engine}_full") / "out" / f"step_{half}")))
            for engine in check.args.engines
            if "full" in check.results["sections"].get(f"engine {engine}", {}).get("result", {}).get("runs", {})]
        if not launches:
            raise SectionSkipped("no engine saved a checkpoint")
        result["launches"] = [launch.name for launch in launches]
        run_launches(check, launches)
    return run


def option_section(check: Check, name: str, *extra: str) -> Callable[[Results], None]:
    """One bf16 run of the reference engine with a run_mae.py option (--torch_compile, --decode_on)."""
    def run(result: Results) -> None:
        run_launches(check, [Launch(name, f"option {name}", "run", reference_engine(check), extra=extra)])
    return run


def reference_engine(check: Check) -> str:
    return check.args.engines[0]
