"""Fine-tuning by regime: the held-out part of the train split that choices are made on (`--holdout_fraction`), the
small-image augmentation flags, and the one line that names the regime."""

from __future__ import annotations

import collections
import hashlib
import pathlib

import pyarrow.parquet as pq
import pytest
import torch
from torchvision.transforms import v2

from modeling_mae.data.loader import build_dataloader
from modeling_mae.data.sources import DataArguments, sample_dataset_path
from modeling_mae.data.transforms import (
    RandAugmentWithMagnitudeNoise,
    eval_transform,
    finetune_transform,
)
from modeling_mae.evaluation.arguments import (
    SMALL_IMAGE_RECIPE,
    AugmentationArguments,
    recipe_regime,
)
from run_scripts.run_finetune import main as finetune_main

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def sample_train_records() -> list[tuple[bytes, int]]:
    """(PNG bytes, label) of every train record of the embedded sample, read with pyarrow, not `datasets`."""
    records = []
    for path in sorted((sample_dataset_path() / "data").glob("train-*.parquet")):
        table = pq.read_table(path, columns=["image", "label"]).to_pydict()
        records += [(image["bytes"], label) for image, label in zip(table["image"], table["label"], strict=True)]
    return records


def expected_held_out(fraction: float, seed: int) -> set[bytes]:
    """The spec, computed here on its own: per class, the round(fraction x n) images of smallest keyed BLAKE2b hash."""
    by_class = collections.defaultdict(list)
    for image, label in sample_train_records():
        digest = hashlib.blake2b(image, digest_size=8, key=seed.to_bytes(8, "big")).digest()
        by_class[label].append((int.from_bytes(digest, "big"), image))
    return {image for pairs in by_class.values() for _, image in sorted(pairs)[: round(fraction * len(pairs))]}


def batches_as_keys(loader) -> list[bytes]:
    """Each image the loader yields, as the bytes of its pixels (eval transform: deterministic)."""
    return [image.numpy().tobytes() for batch in loader for image in batch["pixel_values"]]


def pixel_key(png: bytes) -> bytes:
    from modeling_mae.data.transforms import decode_image

    return eval_transform(32)(decode_image(png)).numpy().tobytes()


def test_the_holdout_is_seeded_stratified_and_disjoint_from_training() -> None:
    args = DataArguments(holdout_fraction=0.1, holdout_seed=3)
    train = build_dataloader(args, "train", eval_transform(32), 500, train=False)
    held_out = build_dataloader(args, "validation", eval_transform(32), 500, train=False)
    assert (train.num_samples, held_out.num_samples) == (9_000, 1_000)
    labels = collections.Counter(int(label) for batch in held_out for label in batch["labels"])
    assert labels == {label: 100 for label in range(10)}  # 10% of each of the sample's 1,000 images per class

    expected = {pixel_key(png) for png in expected_held_out(0.1, seed=3)}
    assert set(batches_as_keys(held_out)) == expected
    training = batches_as_keys(train)
    assert len(training) == 9_000 and not set(training) & expected

    other_seed = build_dataloader(DataArguments(holdout_fraction=0.1, holdout_seed=4), "validation",
                                  eval_transform(32), 500, train=False)
    assert set(batches_as_keys(other_seed)) != expected


def test_the_small_image_recipe_drops_randaugment_and_erasing_and_keeps_large_crops() -> None:
    paper = [type(step) for step in finetune_transform(32).pipeline.transforms]
    assert RandAugmentWithMagnitudeNoise in paper and v2.RandomErasing in paper
    small = finetune_transform(32, crop_scale=(0.5, 1.0), rand_augment=False, erasing=0.0)
    steps = small.pipeline.transforms
    assert not any(isinstance(step, (RandAugmentWithMagnitudeNoise, v2.RandomErasing)) for step in steps)
    crop = next(step for step in steps if isinstance(step, v2.RandomResizedCrop))
    assert crop.scale == (0.5, 1.0)
    torch.manual_seed(0)
    assert small(v2.functional.to_pil_image(torch.zeros(3, 28, 28, dtype=torch.uint8))).shape == (3, 32, 32)


def test_the_regime_line_suggests_the_small_image_recipe_only_where_it_fits() -> None:
    paper, light = AugmentationArguments(), AugmentationArguments(crop_min_scale=0.5, rand_augment=False, mixup=0.0,
                                                                  cutmix=0.0)
    small = recipe_regime(32, 60_000, paper)
    assert small.startswith("Fine-tuning regime: small images or data (32 px, 60,000 training images")
    assert f"consider --config {SMALL_IMAGE_RECIPE}" in small
    assert "consider" not in recipe_regime(32, 60_000, light)
    assert "consider" in recipe_regime(224, 50_000, paper)  # a small data set of large images
    assert recipe_regime(224, 1_281_167, paper).startswith("Fine-tuning regime: large images and data")
    assert (REPOSITORY / SMALL_IMAGE_RECIPE).is_file()


def test_run_finetune_prints_its_regime_and_the_small_recipe_runs(tmp_path: pathlib.Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    results = finetune_main([
        "--config", str(REPOSITORY / SMALL_IMAGE_RECIPE), "--config_overrides",
        "hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32", "--max_train_samples", "32",
        "--max_eval_samples", "16", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
        "--output_dir", str(tmp_path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Fine-tuning regime:")]
    assert lines == [("Fine-tuning regime: small images or data (32 px, 32 training images; <= 64 px or <= 100,000 "
                      "images).")]
    assert results["eval_samples"] == 16
