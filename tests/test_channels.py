"""Your own images, end to end (issue 22): 1-channel 8-bit and 16-bit PNGs, 4-band parquet arrays and 4-band `.npy`
webdataset shards go through pretraining, fine-tuning and k-NN, are exported with their own statistics, and load back
through `AutoModel`, `AutoImageProcessor` and the `image-feature-extraction` pipeline.

The statistics are checked against numpy on the same pixels, the processor's output against the normalisation written
out by hand, and the whole run against what a user sees: the scripts' `main(argv)` and the exported folder.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from data_fixtures import (
    band_arrays,
    make_array_parquet,
    make_image_parquet,
    make_npy_webdataset,
    single_band_png,
)
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline

from run_scripts.run_finetune import main as finetune_main
from run_scripts.run_knn import main as knn_main
from run_scripts.run_mae import main as pretrain_main

SIZE = 16
TINY = ("image_size=16,patch_size=4,hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,"
        "decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=32")
TRAIN, VALIDATION = 24, 12


@dataclass(frozen=True)
class OwnData:
    """One kind of user data: how many channels, the pixels (C, H, W) on the data's own scale, and a writer."""

    name: str
    num_channels: int
    max_value: int  # the dtype's largest value: 8-bit 255, 16-bit 65535
    write: Callable[[pathlib.Path, list[np.ndarray], str], None]
    label_flags: tuple[str, ...] = ()  # webdataset `.cls` labels are integers without names


def gray_png(bits: int) -> Callable[[pathlib.Path, list[np.ndarray], str], None]:
    dtype = np.uint8 if bits == 8 else np.uint16

    def write(folder: pathlib.Path, images: list[np.ndarray], split: str) -> None:
        make_image_parquet(folder, [single_band_png(image[0].astype(dtype)) for image in images], split=split)

    return write


def band_parquet(folder: pathlib.Path, images: list[np.ndarray], split: str) -> None:
    make_array_parquet(folder, [np.moveaxis(image, 0, -1) for image in images], split=split)  # channels last


def band_webdataset(folder: pathlib.Path, images: list[np.ndarray], split: str) -> None:
    make_npy_webdataset(folder, images, split=split)  # channels first


KINDS = [OwnData("gray8_png", 1, 255, gray_png(8)), OwnData("gray16_png", 1, 65535, gray_png(16)),
         OwnData("bands_parquet", 4, 65535, band_parquet), OwnData("bands_npy_webdataset", 4, 65535, band_webdataset, ("--num_labels", "3"))]


def images_of(kind: OwnData, count: int, seed: int) -> list[np.ndarray]:
    dtype = "uint8" if kind.max_value == 255 else "uint16"
    return band_arrays(count, kind.num_channels, (SIZE, SIZE), dtype=dtype, seed=seed)  # (C, H, W) each


@pytest.fixture(params=KINDS, ids=lambda kind: kind.name)
def own_data(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> tuple[OwnData, pathlib.Path, np.ndarray]:
    """The data set's folder (train and validation splits) and its train pixels (N, C, H, W)."""
    kind, folder = request.param, tmp_path / "data"
    train = images_of(kind, TRAIN, seed=0)
    kind.write(folder, train, "train")
    kind.write(folder, images_of(kind, VALIDATION, seed=1), "validation")
    return kind, folder, np.stack(train)


def test_own_images_pretrain_finetune_knn_and_load_back_with_their_statistics(
    own_data: tuple[OwnData, pathlib.Path, np.ndarray], tmp_path: pathlib.Path, hf_home: pathlib.Path
) -> None:
    kind, data, train = own_data
    pretrained, common = tmp_path / "pretrained", ["--dataset_name", str(data), "--seed", "0"]
    results = pretrain_main(["--config_overrides", f"{TINY},num_channels={kind.num_channels}", *common,
                             "--max_train_steps", "2", "--per_device_train_batch_size", "8",
                             "--output_dir", str(pretrained)])
    assert results["skipped_images"] == 0 and np.isfinite(results["final_loss"])

    # The data set's own statistics (--image_stats auto, the default for a new model of other than 3 channels),
    # on its own scale, in the exported processor: numpy's over every train pixel.
    scaled = train.astype(np.float64) / kind.max_value  # (N, C, H, W)
    processor_config = json.loads((pretrained / "preprocessor_config.json").read_text())
    np.testing.assert_allclose(processor_config["image_mean"], scaled.mean(axis=(0, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose(processor_config["image_std"], scaled.std(axis=(0, 2, 3)), rtol=1e-3)
    assert processor_config["rescale_factor"] == pytest.approx(1 / kind.max_value)

    colour = ["--rand_augment", "false"] if kind.num_channels == 4 else []  # RandAugment's colours: 1 or 3 channels
    finetuned = finetune_main(["--model_name_or_path", str(pretrained), *common, *colour, *kind.label_flags,
                               "--max_train_steps", "2",
                               "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "finetuned")])
    assert finetuned["eval_samples"] == VALIDATION
    classifier = json.loads((tmp_path / "finetuned" / "config.json").read_text())
    assert classifier["num_channels"] == kind.num_channels
    assert classifier["image_mean"] == pytest.approx(processor_config["image_mean"])
    scratch = tmp_path / "scratch"  # a classifier from a random init measures the data set's statistics itself
    finetune_main(["--config_overrides", f"{TINY},num_channels={kind.num_channels}", *common, *colour,
                   *kind.label_flags, "--max_train_steps", "1", "--per_device_train_batch_size", "8",
                   "--output_dir", str(scratch)])
    assert json.loads((scratch / "preprocessor_config.json").read_text()) == processor_config
    knn = knn_main(["--model_name_or_path", str(pretrained), *common, "--output_dir", str(tmp_path / "knn")])
    assert knn["train_samples"] == TRAIN and knn["eval_samples"] == VALIDATION

    check_loading_back(pretrained, kind, processor_config)


def check_loading_back(folder: pathlib.Path, kind: OwnData, processor_config: dict[str, list[float]]) -> None:
    """`AutoImageProcessor` normalises a raw array as written out by hand; `AutoModel` and the pipeline encode it."""
    raw = images_of(kind, 1, seed=2)[0]  # (C, H, W), the data's dtype
    channels_last = np.moveaxis(raw, 0, -1)  # (H, W, C): what a user reads from a file
    processor = AutoImageProcessor.from_pretrained(folder)
    pixel_values = processor(channels_last, return_tensors="pt")["pixel_values"]  # (1, C, H, W)
    mean = np.asarray(processor_config["image_mean"])[:, None, None]
    std = np.asarray(processor_config["image_std"])[:, None, None]
    expected = (raw.astype(np.float64) / kind.max_value - mean) / std  # same size: the resize keeps the pixels
    np.testing.assert_allclose(pixel_values[0].double().numpy(), expected, atol=1e-4)

    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(pixel_values=pixel_values).last_hidden_state
    assert hidden.shape[-1] == 32 and torch.isfinite(hidden).all()
    picture = Image.fromarray(raw[0]) if kind.num_channels == 1 else channels_last  # a 16-bit PIL image stays I;16
    features = pipeline("image-feature-extraction", model=str(folder), trust_remote_code=True)(picture)
    assert np.asarray(features).shape[-1] == 32


def test_the_committed_evidence_shows_the_fourth_bands_information_kept() -> None:
    """docs/records/channels_evidence.json (its table: tests/test_scaling_study.py, with every committed record)."""
    record = json.loads((pathlib.Path(__file__).resolve().parents[1] / "docs" / "records" /
                         "channels_evidence.json").read_text())
    results = {name: stage["results"] for name, stage in record["stages"].items()}
    four_band, rgb_only = results["probe_four_band"]["eval_accuracy"], results["probe_rgb_bands"]["eval_accuracy"]
    assert four_band > 0.5 and rgb_only < 0.2  # the fourth band's information kept; without it, chance (0.1)
