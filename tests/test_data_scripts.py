"""The scripts on messy data: string and ClassLabel labels (parquet, image folder), shards that cannot be read."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
from data_fixtures import (
    CLASS_NAMES,
    corrupt_page,
    make_imagefolder,
    make_parquet_shards,
    make_webdataset,
    truncate,
)
from test_evaluation import pretrained  # noqa: F401 - the fixture: a random tiny MAE saved once
from test_training import run_args, run_main

from modeling_mae import MAEForImageClassification
from modeling_mae.errors import EXIT_USAGE
from modeling_mae.errors import run_main as run_script
from run_scripts.run_finetune import main as finetune_main
from run_scripts.run_knn import main as knn_main
from run_scripts.run_linear_probe import main as linear_probe_main

UNSORTED_NAMES = ("fish", "cat", "dog")


def make_labelled(folder: pathlib.Path, form: str, validation_names: tuple[str, ...] = UNSORTED_NAMES) -> list[str]:
    """Train (18) and validation (9) splits; returns the class names the scripts must find, in id order. (ClassLabel
    parquet shards are the fixtures of test_evaluation.py.)"""
    if form == "imagefolder":  # `datasets` builds a ClassLabel from the folder names
        make_imagefolder(folder, 18, split="train")
        make_imagefolder(folder, 9, split="validation")
        return list(CLASS_NAMES)
    make_parquet_shards(folder, 18, labels="string", names=UNSORTED_NAMES)
    make_parquet_shards(folder, 9, num_shards=1, split="validation", labels="string", names=validation_names)
    return sorted(UNSORTED_NAMES)


@pytest.mark.parametrize("form", ["string", "imagefolder"])
def test_evaluation_scripts_take_string_and_class_label_labels(
    tmp_path: pathlib.Path, pretrained: pathlib.Path, form: str  # noqa: F811 - the imported fixture
) -> None:
    names = make_labelled(tmp_path / "data", form)
    common = ["--dataset_name", str(tmp_path / "data"), "--model_name_or_path", str(pretrained)]
    knn = knn_main([*common, "--output_dir", str(tmp_path / "knn"), "--k", "3", "--per_device_eval_batch_size", "4"])
    probe = linear_probe_main([*common, "--output_dir", str(tmp_path / "probe"), "--per_device_train_batch_size", "6",
                               "--num_train_epochs", "2", "--warmup_epochs", "1"])
    finetune = finetune_main([*common, "--output_dir", str(tmp_path / "finetune"), "--per_device_train_batch_size", "6",
                              "--num_train_epochs", "1", "--mixup", "0", "--cutmix", "0"])
    assert knn["eval_samples"] == probe["eval_samples"] == finetune["eval_samples"] == 9
    assert knn["train_samples"] == 18
    config = MAEForImageClassification.from_pretrained(tmp_path / "finetune").config
    assert config.id2label == dict(enumerate(names)) and config.label2id == {name: i for i, name in enumerate(names)}


def test_pretraining_never_reads_the_labels(tmp_path: pathlib.Path, model_config: pathlib.Path) -> None:
    # String labels, and a validation name the train split lacks: an error for the evaluation scripts, not here.
    make_labelled(tmp_path / "data", "string", validation_names=("cat", "bird"))
    results = run_main(run_args(tmp_path / "data", model_config, tmp_path / "run", "--max_train_steps", "2"))
    assert results["train_steps"] == 2 and results["skipped_images"] == 0 and math.isfinite(results["eval_loss"])


def bad_shard_data(folder: pathlib.Path) -> list[pathlib.Path]:
    """Four train shards of 12 images: one truncated (found before training), one damaged inside (fails when read)."""
    paths = make_parquet_shards(folder, 48, num_shards=4)
    truncate(paths[1])
    corrupt_page(paths[3])
    return paths


def test_pretraining_goes_on_without_bad_shards_and_counts_them(
    tmp_path: pathlib.Path, model_config: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modeling_mae.data.shards.SHARD_RETRY_DELAY_S", 0.0)
    bad_shard_data(tmp_path / "data")
    results = run_main(run_args(tmp_path / "data", model_config, tmp_path / "run", "--skip_bad_shards"))
    assert results["train_steps"] == 6 and results["skipped_shards"] == 2 and results["skipped_images"] == 0
    assert json.loads((tmp_path / "run" / "all_results.json").read_text())["skipped_shards"] == 2


@pytest.mark.parametrize("found", ["at start-up", "while streaming"])
def test_a_bad_shard_stops_pretraining_in_one_line_naming_it(
    tmp_path: pathlib.Path, model_config: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, found: str
) -> None:
    monkeypatch.setattr("modeling_mae.data.shards.SHARD_RETRY_DELAY_S", 0.0)
    paths = bad_shard_data(tmp_path / "data")
    if found == "while streaming":
        paths[1].unlink()  # left: the shard damaged inside, which only reading finds
    assert run_script(run_main, run_args(tmp_path / "data", model_config, tmp_path / "run")) == EXIT_USAGE
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "--skip_bad_shards" in error
    assert str(paths[3 if found == "while streaming" else 1]) in error
    assert not (tmp_path / "run" / "all_results.json").exists()


def finetune_exit(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Fine-tuning's exit status and the last line it wrote to stderr."""
    status = run_script(finetune_main, args)
    return status, capsys.readouterr().err.strip().splitlines()[-1]


def test_fine_tuning_integer_labels_takes_num_labels_and_checks_it(
    tmp_path: pathlib.Path, pretrained: pathlib.Path, capsys: pytest.CaptureFixture  # noqa: F811 - the fixture
) -> None:
    make_webdataset(tmp_path / "data", 18, split="train")  # .cls files: ids 0, 1, 2 without names
    make_webdataset(tmp_path / "data", 9, split="validation")
    common = ["--dataset_name", str(tmp_path / "data"), "--model_name_or_path", str(pretrained),
              "--per_device_train_batch_size", "6", "--num_train_epochs", "1", "--mixup", "0", "--cutmix", "0"]
    status, error = finetune_exit([*common, "--output_dir", str(tmp_path / "none")], capsys)
    assert status == EXIT_USAGE and "pass --num_labels" in error
    status, error = finetune_exit([*common, "--output_dir", str(tmp_path / "two"), "--num_labels", "2"], capsys)
    assert status == EXIT_USAGE and error.startswith("error: Label 2 is no class id") and "--num_labels" in error
    assert not (tmp_path / "two" / "all_results.json").exists()
    results = finetune_main([*common, "--output_dir", str(tmp_path / "three"), "--num_labels", "3"])
    assert results["eval_samples"] == 9
    assert MAEForImageClassification.from_pretrained(tmp_path / "three").config.id2label == {0: "0", 1: "1", 2: "2"}


def test_fine_tuning_named_labels_refuse_another_num_labels(
    tmp_path: pathlib.Path, pretrained: pathlib.Path, capsys: pytest.CaptureFixture  # noqa: F811 - the fixture
) -> None:
    names = make_labelled(tmp_path / "data", "string")
    status, error = finetune_exit(["--dataset_name", str(tmp_path / "data"), "--model_name_or_path", str(pretrained),
                                   "--output_dir", str(tmp_path / "run"), "--num_labels", "5"], capsys)
    assert status == EXIT_USAGE and f"name {len(names)} classes: drop --num_labels" in error
