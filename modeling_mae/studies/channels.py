"""Evidence that images of any channel count go through the whole pipeline (`run_scripts/channels_evidence.py`).

Two comparisons, each a chain of the run scripts' stages (`stages.StageRunner`):
- **1 channel against RGB-expanded**, on the embedded Fashion-MNIST sample (grayscale): the same pretraining with
  `num_channels=1` and with the default 3 channels (each gray pixel copied to R, G and B), then the same k-NN. The 1-
  channel patch embedding reads a third of the inputs, and its pixel head predicts a third of the outputs.
- **A fourth band that carries the label**: a synthetic 4-band data set whose R, G and B bands are label-free smooth
  noise and whose fourth band (a "near-infrared" band) holds stripes whose orientation is the class. A 4-channel MAE
  and a 3-channel MAE on the R, G and B bands alone are pretrained alike and scored by the same linear probe: the
  pipeline keeps the fourth band's information only if the first probe is far above the second, which is at chance.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .records import environment, stage_entries, write_record
from .stages import Stage, StageRunner

BANDS = 4  # R, G, B and the band that carries the label
NUM_CLASSES = 10
IMAGE_SIDE = 32
STRIPE_PERIOD = 6.0  # pixels: a few periods per 16-px crop, coarse enough to survive the 32-px resize


def smooth_noise(rng: np.random.Generator, count: int, side: int) -> np.ndarray:
    """`count` label-free smooth fields in [0, 1]: a coarse 4x4 random grid, bilinearly upsampled -> (count, side,
    side)."""
    coarse = rng.random((count, 5, 5))
    axis = np.linspace(0, 4, side)
    low, frac = np.floor(axis).astype(int).clip(max=3), axis - np.floor(axis).clip(max=3)
    rows = coarse[:, low] * (1 - frac)[None, :, None] + coarse[:, low + 1] * frac[None, :, None]  # (count, side, 5)
    return rows[:, :, low] * (1 - frac) + rows[:, :, low + 1] * frac  # (count, side, side)


def stripes(rng: np.random.Generator, labels: np.ndarray, side: int) -> np.ndarray:
    """One band per label: stripes at the label's orientation (k * 180 / NUM_CLASSES degrees), random phase, plus a
    little noise, in [0, 1] -> (count, side, side)."""
    angles = labels * math.pi / NUM_CLASSES
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    along = x[None] * np.cos(angles)[:, None, None] + y[None] * np.sin(angles)[:, None, None]  # (count, side, side)
    phase = rng.uniform(0, 2 * math.pi, size=(len(labels), 1, 1))
    wave = 0.5 + 0.4 * np.sin(2 * math.pi * along / STRIPE_PERIOD + phase)
    return np.clip(wave + rng.normal(0, 0.05, wave.shape), 0, 1)


def four_band_images(count: int, seed: int, side: int = IMAGE_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """(images (count, side, side, 4) uint8, channels last; labels (count,) int64), the classes balanced."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % NUM_CLASSES)
    rgb = np.stack([smooth_noise(rng, count, side) for _ in range(3)], axis=-1)  # (count, side, side, 3)
    band = stripes(rng, labels, side)[..., None]  # (count, side, side, 1)
    return np.round(255 * np.concatenate([rgb, band], axis=-1)).astype(np.uint8), labels


def write_parquet_split(folder: pathlib.Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """One parquet shard `folder/data/SPLIT-00000-of-00001.parquet`: an `image` Array3D column (H, W, C) and a
    `label` ClassLabel column, as `datasets` writes them."""
    from datasets import Array3D, ClassLabel, Dataset, Features

    features = Features({"image": Array3D(shape=images.shape[1:], dtype="uint8"),
                         "label": ClassLabel(names=[f"angle_{k * 180 // NUM_CLASSES}" for k in range(NUM_CLASSES)])})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    dataset = Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
    dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))


def write_rgb_split(folder: pathlib.Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """The R, G and B bands alone, as PNG images in an `image` column: what an RGB pipeline would be given."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    features = Features({"image": ImageFeature(),
                         "label": ClassLabel(names=[f"angle_{k * 180 // NUM_CLASSES}" for k in range(NUM_CLASSES)])})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pictures = [Image.fromarray(np.ascontiguousarray(image[..., :3]), mode="RGB") for image in images]
    dataset = Dataset.from_dict({"image": pictures, "label": labels.tolist()}, features=features)
    dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))


def write_band_data_sets(output_dir: pathlib.Path, train_images: int, test_images: int, seed: int) -> dict[str, str]:
    """The 4-band data set and its R, G, B copy (train and test splits, written once) -> their folders."""
    folders = {"four_band": output_dir / "data_four_band", "rgb_bands": output_dir / "data_rgb_bands"}
    for split, count, split_seed in (("train", train_images, seed), ("test", test_images, seed + 1)):
        images, labels = four_band_images(count, split_seed)
        if not any((folders["four_band"] / "data").glob(f"{split}-*.parquet")):
            write_parquet_split(folders["four_band"], split, images, labels)
        if not any((folders["rgb_bands"] / "data").glob(f"{split}-*.parquet")):
            write_rgb_split(folders["rgb_bands"], split, images, labels)
    return {name: str(folder) for name, folder in folders.items()}


def gray_stages(epochs: float, seed: int, folder: Callable[[str], pathlib.Path]) -> list[Stage]:
    """The embedded Fashion-MNIST sample pretrained with 1 channel and RGB-expanded, each scored by the same k-NN."""
    stages = []
    for channels in (1, 3):
        pretrain = f"pretrain_gray_c{channels}"
        stages += [Stage(pretrain, "run_mae.py", ("--config_overrides", f"num_channels={channels}", "--num_train_epochs",
                                                  f"{epochs:g}", "--seed", str(seed), "--logging_steps", "50"),
                         resumable=True),
                   Stage(f"knn_gray_c{channels}", "run_knn.py",
                         ("--model_name_or_path", str(folder(pretrain)), "--seed", str(seed)))]
    return stages


def band_stages(epochs: float, seed: int, data: dict[str, str], folder: Callable[[str], pathlib.Path]) -> list[Stage]:
    """The 4-band data set with 4 channels and its R, G, B bands with 3, pretrained alike, each scored by the same
    linear probe."""
    stages = []
    for name, channels in (("four_band", 4), ("rgb_bands", 3)):
        pretrain, dataset = f"pretrain_{name}", ("--dataset_name", data[name])
        stages += [Stage(pretrain, "run_mae.py", ("--config_overrides", f"num_channels={channels}", *dataset,
                                                  "--num_train_epochs", f"{epochs:g}", "--seed", str(seed),
                                                  "--logging_steps", "50"), resumable=True),
                   Stage(f"probe_{name}", "run_linear_probe.py",
                         ("--model_name_or_path", str(folder(pretrain)), *dataset, "--seed", str(seed)))]
    return stages


def step_milliseconds(pretraining: dict[str, Any]) -> float:
    return 1000 * pretraining["train_runtime"] / pretraining["train_steps"]


def render_table(results: dict[str, dict[str, Any]]) -> str:
    """The evidence table (markdown) from the stages' results."""
    rows = ["| data | channels | pretraining step (ms) | images/s | score | top-1 % |", "|---|---:|---:|---:|---|---:|"]
    layout = [("Fashion-MNIST sample (gray)", "gray_c1", 1, "knn"), ("Fashion-MNIST sample, RGB-expanded", "gray_c3",
              3, "knn"), ("synthetic 4-band", "four_band", 4, "probe"), ("synthetic, R, G, B bands only",
              "rgb_bands", 3, "probe")]
    for label, name, channels, protocol in layout:
        pretraining, score = results[f"pretrain_{name}"], results[f"{protocol}_{name}"]
        rows.append(f"| {label} | {channels} | {step_milliseconds(pretraining):.1f} | "
                    f"{pretraining['train_samples_per_second']:.0f} | "
                    f"{'k-NN' if protocol == 'knn' else 'linear probe'} | {100 * score['eval_accuracy']:.1f} |")
    return "\n".join(rows) + "\n"


def render_record(record: dict[str, Any]) -> str:
    """The evidence table from a committed record alone."""
    return render_table({name: stage["results"] for name, stage in record["stages"].items()})


def run_evidence(args: Any, scripts: pathlib.Path) -> dict[str, Any]:
    """Run (or reuse) every stage, then write the record and its table; returns the record."""
    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(scripts, output_dir, force=args.force, num_threads=args.num_threads)
    data = write_band_data_sets(output_dir, args.band_train_images, args.band_test_images, args.seed)
    stages = [*gray_stages(args.gray_epochs, args.seed, runner.folder),
              *band_stages(args.band_epochs, args.seed, data, runner.folder)]
    results = {stage.name: runner.run(stage) for stage in stages}
    table = render_table(results)
    record = {"study": "channels_evidence", "arguments": vars(args), "environment": environment(scripts.parent),
              "stages": stage_entries(runner, stages), "table": table}
    for folder in filter(None, (output_dir, args.record_dir and pathlib.Path(args.record_dir))):
        write_record(folder / "channels_evidence.json", record)
        (folder / "channels_evidence.md").write_text(table)
    print(table)
    return record
