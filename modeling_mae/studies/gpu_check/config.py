"""What the GPU check (`run_scripts/gpu_check.py`) runs with: where things are, the engines, the sizes it trains and
measures (the real ones on a GPU, tiny ones for the dry run), the JSON its records are written in, and the installed
versions of packages (a missing one skips what needs it)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import pathlib
from dataclasses import dataclass
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[3]
# The check runs its children (the engine worker, the measurements) as this script with a --role.
GPU_CHECK_SCRIPT = REPO / "run_scripts" / "gpu_check.py"
ACCELERATE_CONFIGS = REPO / "configuration" / "accelerate"
GPU_ENGINES = ("single_gpu", "fsdp", "deepspeed_zero3", "deepspeed_zero2")  # the first is the reference
CPU_ENGINES = ("cpu", "fsdp", "deepspeed_zero3", "deepspeed_zero2")
Results = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """What the check trains and measures: the real sizes on a GPU, tiny ones for the dry run."""

    train_images: int
    train_copies: int  # rows per training image: long passes of the workers over the shards, as over ImageNet
    validation_images: int
    image_size: tuple[int, int]  # (width, height) of the JPEGs
    shards: int  # a multiple of every worker count: each DataLoader worker then reads whole shards
    engine_model: str  # preset of the engine runs
    engine_batch: int
    engine_steps: int  # the checkpoint is saved half way
    engine_learning_rate: float
    engine_workers: int
    launch_timeout_s: float  # a wave of parallel `accelerate launch`es: start-up, a few steps, checkpoint, export
    throughput_model: str  # preset of the throughput and MFU measurements
    throughput_batch: int
    min_timed_steps: int
    mfu_samples: int  # benchmark.py's method: samples of 3 steps
    loader_workers: tuple[int, ...]  # the most informative first
    decode_readers: int  # workers that only read bytes for --decode_on


GPU_SIZES = Sizes(2048, 4, 64, (500, 375), 16, "small", 32, 8, 1e-3, 2, 240, "large", 256, 24, 5, (16, 8, 4, 2), 2)
# bf16 is slow on a CPU, and 7 launches at once share its few cores
TINY_SIZES = Sizes(32, 1, 16, (160, 120), 2, "tiny-32px", 8, 4, 1e-3, 1, 1200, "tiny-32px", 8, 2, 2, (2,), 1)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_json(path: pathlib.Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
