"""The GPU check's measuring children (`--role throughput`, `warmup`, `compile_modes`): ViT-L/16 trained from (a)
synthetic tensors on the device, (b) the streaming loader with N worker processes, (c) `--decode_on cuda`; nvjpeg
decode and augmentation alone; the MFU by the benchmark's method, also under other torch.compile modes. Each
measurement is guarded and the record rewritten after each, so a child stopped at its deadline leaves what it
measured."""

from __future__ import annotations

import argparse
import gc
import math
import pathlib
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...configuration_mae import MAEConfig
from ...data.fast_decode import FastPretrainTransform
from ...data.loader import build_dataloader
from ...data.sources import DataArguments
from ...data.transforms import (
    augment_on_device,
    decode_image_tensor,
    decode_images_on_device,
    pretrain_transform,
)
from ...modeling_mae import MAEForPreTraining
from ...training.accelerator import move_to_device
from ..benchmark import (
    make_train_step,
    peak_flops,
    pretraining_flops,
    synchronize,
    time_alternating,
)
from ..stages import release_memory
from .config import Results, Sizes, write_json


@dataclass
class Bench:
    """The model every throughput measurement trains: a train step that takes its batches from a function."""

    model: torch.nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    batch_size: int
    image_size: tuple[int, int]
    flops: float
    peak: float | None

    def step(self, batches: torch.Tensor | Callable[[], torch.Tensor]) -> Callable[[], None]:
        autocast = torch.bfloat16 if self.device.type == "cuda" else None
        return make_train_step(self.loss, list(self.model.parameters()), batches, autocast)


def build_bench(sizes: Sizes, device: torch.device, compile_mode: str | None) -> Bench:
    """Our MAE as run_mae.py trains it (masked-only loss, SDPA), compiled with `compile_mode` unless None."""
    config = MAEConfig.from_preset(sizes.throughput_model)
    with device:
        model = MAEForPreTraining._from_config(config, attn_implementation="sdpa").train()
    compiled = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    return Bench(model, lambda pixels: compiled(pixels, logits_to_keep="masked").loss, device,
                 sizes.throughput_batch, config.image_size, pretraining_flops(config, sizes.throughput_batch),
                 peak_flops(device))


def timed_rate(step: Callable[[], Any], warmup: int, timed: int, images: int, device: torch.device) -> Results:
    """Images/s over `timed` calls after `warmup` ones, synchronising after each as the training loop does (it reads
    every loss with .item()); also how long the warm-up took (compilation, worker start-up)."""
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    timed_from = time.perf_counter()
    for _ in range(timed):
        step()
        synchronize(device)
    seconds = time.perf_counter() - timed_from
    return {"images_per_s": images * timed / seconds, "timed_steps": timed, "warmup_s": timed_from - started}


def synthetic_rates(bench: Bench, sizes: Sizes) -> Results:
    """(a) the model alone on tensors already on the device: in the training loop's way (a sync per step), and in
    benchmark.py's way (median of 3-step samples) for the MFU."""
    pixels = torch.randn(bench.batch_size, 3, *bench.image_size, device=bench.device)
    step = bench.step(pixels)
    result = timed_rate(step, 2, sizes.min_timed_steps, bench.batch_size, bench.device)
    samples = time_alternating({"step": step}, sizes.mfu_samples, 1, 3, bench.device)["step"]["wall"]
    median = sorted(samples)[len(samples) // 2]
    result["benchmark_method"] = {"images_per_s": bench.batch_size / median, "step_ms": median * 1e3,
                                  "tflops_per_s": bench.flops / median / 1e12,
                                  "mfu": bench.flops / median / bench.peak if bench.peak else None}
    return result


def loader_rates(bench: Bench, sizes: Sizes, data_dir: pathlib.Path, workers: int, decode_on: str) -> Results:
    """The streaming loader alone, then training from it (b, c). Measured over whole waves of workers: every
    worker builds whole batches, so they arrive N at a time; timing from one wave to another cancels that."""
    arguments = DataArguments(dataset_name=str(data_dir), dataloader_num_workers=workers, shuffle_buffer_size=256,
                              num_train_samples=10**8, decode_on=decode_on)  # an epoch that never ends here
    loader = build_dataloader(arguments, "train", pretrain_transform(bench.image_size), bench.batch_size, train=True)
    batches = iter(loader)
    try:
        started = time.perf_counter()
        next(batches)
        wave = max(workers, 1)
        waves = max(2, math.ceil(sizes.min_timed_steps / wave))
        result: Results = {"workers": workers, "decode_on": decode_on,
                           "first_batch_s": time.perf_counter() - started}
        result["loader_alone"] = timed_rate(lambda: next(batches), wave - 1, waves * wave, bench.batch_size,
                                            bench.device)

        def next_pixels() -> torch.Tensor:
            return move_to_device(next(batches), bench.device)["pixel_values"]

        result["training"] = timed_rate(bench.step(next_pixels), wave, waves * wave, bench.batch_size, bench.device)
        return result
    finally:
        batches.close()
        gc.collect()  # shuts the workers down before the next measurement starts its own


def first_jpegs(data_dir: pathlib.Path, count: int) -> list[bytes]:
    import pyarrow.parquet as pq

    shard = min((data_dir / "data").glob("train-*.parquet"))
    return [row["bytes"] for row in pq.read_table(shard, columns=["image"]).column("image").to_pylist()[:count]]


def decode_rates(bench: Bench, data_dir: pathlib.Path) -> Results:
    """nvjpeg decode and the on-device augmentation alone (img/s), the CPU fast path on one core, and how far the
    device's pixels are from the CPU decoder's."""
    encoded = first_jpegs(data_dir, bench.batch_size)
    images: list[torch.Tensor] = []

    def decode() -> None:
        images[:] = decode_images_on_device(encoded, bench.device)

    result = {"decode": timed_rate(decode, 1, 5, len(encoded), bench.device)}
    result["augment"] = timed_rate(lambda: augment_on_device(images, bench.image_size), 1, 5, len(encoded),
                                   bench.device)
    result["decode_and_augment"] = timed_rate(lambda: (decode(), augment_on_device(images, bench.image_size)), 1, 5,
                                              len(encoded), bench.device)
    difference = torch.cat([(image.cpu().int() - decode_image_tensor(data).int()).abs().flatten()
                            for image, data in zip(images[:16], encoded)]).float()
    result["pixels_vs_cpu_decoder"] = {"mean_abs": difference.mean().item(), "max_abs": difference.max().item()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's share
    try:
        transform = FastPretrainTransform(bench.image_size, seed=0)
        result["cpu_fast_path_one_core"] = timed_rate(lambda: [transform(data) for data in encoded[:64]], 1, 2,
                                                      len(encoded[:64]), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    return result


def measure(record: Results, name: str, run: Callable[[], Any], record_path: pathlib.Path, deadline: float) -> None:
    """One guarded measurement of a child: recorded, or its error; the record is rewritten after each."""
    if time.time() > deadline:
        record["skipped"].append(f"{name}: out of time")
    else:
        try:
            record[name] = run()
        except Exception as error:  # noqa: BLE001 - a failed measurement must not lose the others
            record["errors"].append({"measurement": name, "error": f"{type(error).__name__}: {error}",
                                     "traceback": traceback.format_exc()})
    write_json(record_path, record)


def device_description(device: torch.device) -> Results:
    if device.type != "cuda":
        return {"name": f"CPU {platform.processor() or platform.machine()}", "threads": torch.get_num_threads()}
    properties = torch.cuda.get_device_properties(device)
    return {"name": properties.name, "memory_gb": round(properties.total_memory / 1e9, 1),
            "multiprocessors": properties.multi_processor_count, "capability": f"{properties.major}.{properties.minor}"}


def throughput_child(args: argparse.Namespace, sizes: Sizes) -> None:
    """(a), decode alone, (c), then (b) for each worker count; MFU from (a)."""
    device, record_path = torch.device(args.device), pathlib.Path(args.record)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bench = build_bench(sizes, device, "default" if args.compile else None)
    record: Results = {"device": device_description(device), "model": sizes.throughput_model,
                       "batch_size": bench.batch_size, "compiled": args.compile, "step_flops": bench.flops,
                       "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
                       "peak_flops": bench.peak, "errors": [], "skipped": []}
    data_dir = pathlib.Path(args.work_dir) / "data"
    measure(record, "synthetic", lambda: synthetic_rates(bench, sizes), record_path, args.deadline)
    measure(record, "decode", lambda: decode_rates(bench, data_dir), record_path, args.deadline)
    decode_on = args.device
    measure(record, f"decode_on_{decode_on}",
            lambda: loader_rates(bench, sizes, data_dir, sizes.decode_readers, decode_on), record_path, args.deadline)
    for workers in args.loader_workers:
        def run(workers: int = workers) -> Results:
            return loader_rates(bench, sizes, data_dir, workers, "workers")

        measure(record, f"workers_{workers}", run, record_path, args.deadline)


def warmup_child(args: argparse.Namespace, sizes: Sizes) -> None:
    """Compile the throughput model with two training steps (what throughput_child compiles first), and exit."""
    bench = build_bench(sizes, torch.device(args.device), "default")
    step = bench.step(torch.randn(bench.batch_size, 3, *bench.image_size, device=bench.device))
    step()
    step()
    synchronize(bench.device)


def compile_modes_child(args: argparse.Namespace, sizes: Sizes) -> None:
    """MFU of the compiled step under each of `--compile_modes` (benchmark.py's method), one fresh model each."""
    device, record_path = torch.device(args.device), pathlib.Path(args.record)
    record: Results = {"device": device_description(device), "model": sizes.throughput_model, "errors": [],
                       "skipped": []}
    for mode in args.compile_modes:
        def run(mode: str = mode) -> Results:
            torch._dynamo.reset()
            bench = build_bench(sizes, device, mode)
            return synthetic_rates(bench, sizes)

        measure(record, mode, run, record_path, args.deadline)
        release_memory()
