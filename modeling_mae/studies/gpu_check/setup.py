"""The GPU check's first two sections: the environment (the card, versions, cores) and the data (ImageNet-like JPEG
parquet shards, and the initial weights every engine run starts from)."""

from __future__ import annotations

import os
import pathlib
import platform
import shutil
import subprocess
import time
from collections.abc import Callable

import torch

from ...configuration_mae import MAEConfig
from ...data.synthetic import write_imagenet_like
from ...modeling_mae import MAEForPreTraining
from .config import Results, package_version, read_json, write_json
from .state import Check


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True, timeout=30, check=False).stdout.strip() or None


def environment_section(check: Check) -> Callable[[Results], None]:
    def run(result: Results) -> None:
        result.update(
            gpu=nvidia_smi(), cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda,
            python=platform.python_version(), cpu_count=os.cpu_count(), usable_cores=len(os.sched_getaffinity(0)),
            memory_gb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            loadavg=[round(value, 2) for value in os.getloadavg()],
            packages={name: package_version(name) for name in (
                "torch", "torchvision", "transformers", "accelerate", "datasets", "deepspeed", "pyarrow", "fsspec",
                "huggingface-hub", "pydantic", "numpy", "pillow", "timm", "torchao")},
        )
    return run


def data_section(check: Check) -> Callable[[Results], None]:
    """ImageNet-like shards in the work dir (reused when a previous run of the same sizes left them there), and the
    initial weights every engine run starts from."""
    def run(result: Results) -> None:
        spec = {"train": check.sizes.train_images, "copies": check.sizes.train_copies,
                "validation": check.sizes.validation_images, "shards": check.sizes.shards,
                "size": list(check.sizes.image_size)}
        marker = check.data_dir / "gpu_check_data.json"
        previous = read_json(marker)
        if previous and previous["spec"] == spec:
            result.update(previous["summary"], reused=True)
        else:
            shutil.rmtree(check.data_dir, ignore_errors=True)
            started = time.monotonic()
            summary = write_imagenet_like(check.data_dir, spec["train"], spec["validation"], spec["shards"],
                                          size=check.sizes.image_size, processes=os.cpu_count(),
                                          train_copies=spec["copies"])
            summary["seconds"] = round(time.monotonic() - started, 1)
            write_json(marker, {"spec": spec, "summary": summary})
            result.update(summary, reused=False)
        save_initial_weights(check.sizes.engine_model, check.initial_weights)
    return run


def save_initial_weights(preset: str, directory: pathlib.Path) -> None:
    """One random initialisation (seed 0) saved for every engine run to load. Under ZeRO-3 transformers builds the
    model inside deepspeed.zero.Init (Accelerate registers the ZeRO-3 config with it even with zero3_init_flag
    false), which draws other initial weights from the same seed: loading saved ones makes the engines comparable."""
    torch.manual_seed(0)
    MAEForPreTraining._from_config(MAEConfig.from_preset(preset)).save_pretrained(directory)
