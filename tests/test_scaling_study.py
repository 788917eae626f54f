"""The scaling study: its smoke budget end to end (what CI runs), its statistics, table and figures, the stage runner
it shares with evidence.py, and the full Fashion-MNIST build of make_sample_data.py."""

from __future__ import annotations

import gzip
import json
import math
import pathlib
import re
import shutil

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image

from modeling_mae.errors import UsageError
from modeling_mae.studies.scaling import PROTOCOLS
from modeling_mae.studies.scaling_report import (
    MAE_LABEL,
    SCRATCH_LABEL,
    cell,
    plot_model_size,
    plot_pretraining_epochs,
    render_table,
)
from modeling_mae.studies.stages import Stage, StageRunner
from run_scripts import make_sample_data
from run_scripts.make_sample_data import main as make_data_main
from run_scripts.scaling_study import main as study_main

CELL = re.compile(r"(\d+\.\d) ± (\d+\.\d|n/a)")


def hand_summary() -> dict:
    """Three sizes whose every cell differs, and a sweep: what `summarise` returns, written out by hand."""
    def cells(scratch: float, mae: float) -> dict:
        return {"scratch": {"mean": scratch, "std": 1.0}, "mae": {"mean": mae, "std": 2.0},
                "linprobe": {"mean": mae - 5, "std": 3.0}, "knn": {"mean": mae - 10, "std": None}}

    sizes = [{"name": f"ViT-{width}", "width": width, "depth": 6, "parameters": parameters, "cells": cells(s, m),
              "finetune_train_loss": {"scratch": 2.0, "mae": 1.5}}
             for width, parameters, s, m in ((48, 170_000, 60.0, 70.0), (96, 670_000, 61.0, 75.0),
                                             (192, 2_690_000, 62.0, 80.0))]
    sweep = {"1": {"mean": 65.0, "std": 0.5}, "2": {"mean": 70.0, "std": 1.5}, "4": {"mean": 75.0, "std": 2.0}}
    return {"seeds": [0, 1, 2], "sizes": sizes, "sweep": sweep}


# ------------------------------------------------------------------------------------------------------ statistics


def test_a_cell_is_the_percent_mean_and_sample_std_of_its_seeds() -> None:
    three = cell([0.5, 0.6, 0.7])
    assert three["values"] == pytest.approx([50.0, 60.0, 70.0])
    assert three["n"] == 3
    assert three["mean"] == pytest.approx(60.0)
    assert three["std"] == pytest.approx(10.0)  # sqrt((100 + 0 + 100) / (3 - 1)); the population std is 8.16
    assert cell([0.8])["std"] is None  # one seed has no spread: "n/a", not 0


def test_the_table_puts_every_cell_in_its_column_and_the_gain_of_mae() -> None:
    table = render_table(hand_summary(), "a budget line", "ViT-96")
    header = next(line for line in table.splitlines() if line.startswith("| model |"))
    columns = [title.strip() for title in header.strip("|").split("|")]
    assert columns[2:6] == list(PROTOCOLS.values()) and columns[6] == "MAE gain"
    row = next(line for line in table.splitlines() if line.startswith("| ViT-96 "))
    values = [value.strip() for value in row.strip("|").split("|")]
    assert values[1] == "670k"
    assert values[2:7] == ["61.0 ± 1.0", "75.0 ± 2.0", "70.0 ± 3.0", "65.0 ± n/a", "+14.0"]
    sweep = next(line for line in table.splitlines() if line.startswith("| fine-tuned top-1 % |"))
    # The middle size's scratch run is the 0-epoch point, then the pretraining lengths in order.
    assert CELL.findall(sweep) == [("61.0", "1.0"), ("65.0", "0.5"), ("70.0", "1.5"), ("75.0", "2.0")]
    assert "| ViT-96: pretraining epochs | 0 (from scratch) | 1 | 2 | 4 |" in table
    assert "a budget line; seeds 0, 1, 2." in table
    assert "ViT-96 2.00 from scratch, 1.50 from MAE;" in table


# --------------------------------------------------------------------------------------------------------- figures


def errorbar_series(figure) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """label -> (x, y, half height of each error bar), read back from the drawn artists."""
    series = {}
    for container in figure.axes[0].containers:
        line, _caps, (bars,) = container.lines
        spans = [abs(segment[1][1] - segment[0][1]) / 2 for segment in bars.get_segments()]
        series[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()), spans)
    return series


def test_the_size_figure_draws_mae_and_scratch_against_parameters_with_their_std(tmp_path: pathlib.Path) -> None:
    figure = plot_model_size(hand_summary(), tmp_path / "size.png", "title")
    series = errorbar_series(figure)
    assert set(series) == {MAE_LABEL, SCRATCH_LABEL}
    assert series[MAE_LABEL] == ([170_000, 670_000, 2_690_000], [70.0, 75.0, 80.0], [2.0, 2.0, 2.0])
    assert series[SCRATCH_LABEL] == ([170_000, 670_000, 2_690_000], [60.0, 61.0, 62.0], [1.0, 1.0, 1.0])
    assert figure.axes[0].get_xscale() == "log"
    with Image.open(tmp_path / "size.png") as image:
        assert image.format == "PNG"


def test_the_epochs_figure_draws_the_sweep_and_the_scratch_level(tmp_path: pathlib.Path) -> None:
    figure = plot_pretraining_epochs(hand_summary(), tmp_path / "epochs.png", "title")
    assert errorbar_series(figure) == {MAE_LABEL: ([1.0, 2.0, 4.0], [65.0, 70.0, 75.0], [0.5, 1.5, 2.0])}
    (scratch,) = [line for line in figure.axes[0].get_lines() if line.get_label() == SCRATCH_LABEL]
    assert list(scratch.get_ydata()) == [61.0, 61.0]  # the middle size's scratch mean
    assert (tmp_path / "epochs.png").is_file()


# ------------------------------------------------------------------------------------------------ the smoke study


def stage_accuracy(folder: pathlib.Path) -> float:
    return 100 * json.loads((folder / "all_results.json").read_text())["eval_accuracy"]


def test_smoke_study_writes_every_cell_from_its_stages_and_reuses_them(tmp_path: pathlib.Path) -> None:
    summary = study_main(["--budget", "smoke", "--output_dir", str(tmp_path), "--num_threads", "1"])
    assert summary["seeds"] == [0, 1]
    stage_folders = {  # where each protocol's top-1 comes from, per size and seed
        "scratch": "finetune-scratch_{slug}_s{seed}", "mae": "finetune-mae_{slug}_ep1_s{seed}",
        "linprobe": "linprobe-mae_{slug}_s{seed}", "knn": "knn-mae_{slug}_s{seed}"}
    for size in summary["sizes"]:
        for key, pattern in stage_folders.items():
            a, b = (stage_accuracy(tmp_path / pattern.format(slug=size["name"].lower(), seed=seed)) for seed in (0, 1))
            got = size["cells"][key]
            assert got["values"] == pytest.approx([a, b]) and got["n"] == 2, (size["name"], key)
            assert (got["mean"], got["std"]) == pytest.approx(((a + b) / 2, abs(a - b) / math.sqrt(2)))
        scratch_losses = [json.loads((tmp_path / f"finetune-scratch_{size['name'].lower()}_s{seed}" / "all_results.json")
                                     .read_text())["train_loss"] for seed in (0, 1)]
        assert size["finetune_train_loss"]["scratch"] == pytest.approx(sum(scratch_losses) / 2)
    for epochs in ("0.5", "1"):  # the sweep: the middle size after each pretraining length
        seeds = [stage_accuracy(tmp_path / f"finetune-mae_vit-16_ep{epochs}_s{seed}") for seed in (0, 1)]
        assert summary["sweep"][epochs]["values"] == pytest.approx(seeds)

    numbers = json.loads((tmp_path / "scaling_study.json").read_text())
    assert numbers["sizes"] == json.loads(json.dumps(summary["sizes"])) and numbers["budget"] == "smoke"
    table = (tmp_path / "scaling_study.md").read_text()
    size_rows = [line for line in table.splitlines() if " wide, " in line]
    assert [row.split(" (")[0] for row in size_rows] == ["| ViT-8", "| ViT-16", "| ViT-32"]
    assert all(len(CELL.findall(row)) == len(PROTOCOLS) for row in size_rows)
    assert "32 training images, 16 validation" in table
    for figure in ("model_size.png", "pretraining_epochs.png"):
        with Image.open(tmp_path / figure) as image:
            assert image.format == "PNG" and image.size == (750, 600)

    records = {path: path.stat().st_mtime_ns for path in tmp_path.glob("*/stage.json")}
    # sizes x seeds x 5 stages, + per seed the 0.5-epoch pretraining and its fine-tuning
    assert len(records) == 3 * 2 * 5 + 2 * 2
    assert study_main(["--budget", "smoke", "--output_dir", str(tmp_path)]) == summary
    assert {path: path.stat().st_mtime_ns for path in records} == records  # every stage reused, none rerun


# ---------------------------------------------------------------------------------------------------- stage runner

COUNTING_SCRIPT = '''
import json, pathlib, sys

def main(argv):
    output_dir = pathlib.Path(argv[argv.index("--output_dir") + 1])
    runs = output_dir.parent / "runs.txt"
    runs.write_text(runs.read_text() + "run\\n" if runs.exists() else "run\\n")
    print("printed by the stage")
    print("warned by the stage", file=sys.stderr)
    if "--fail" in argv and len(runs.read_text().splitlines()) == 1:
        raise RuntimeError("first run fails")
    (output_dir / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.5}))
'''


@pytest.fixture
def scripts(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "counting.py").write_text(COUNTING_SCRIPT)
    return folder


def runs(output_dir: pathlib.Path) -> int:
    return len((output_dir / "runs.txt").read_text().splitlines())


def test_stage_runner_logs_a_stage_reuses_it_and_refuses_results_of_other_arguments(
    scripts: pathlib.Path, tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str]
) -> None:
    output_dir = tmp_path / "study"
    output_dir.mkdir()
    stage = Stage("one", "counting.py", ("--flag", "1"))
    with capfd.disabled():  # the process's real stdout and stderr, as outside pytest
        assert StageRunner(scripts, output_dir).run(stage)["eval_accuracy"] == 0.5
    assert (output_dir / "one.log").read_text().splitlines() == ["printed by the stage", "warned by the stage"]

    runner = StageRunner(scripts, output_dir)
    assert runner.run(stage)["wall_seconds"] >= 0 and runs(output_dir) == 1  # reused
    assert runner.total_wall_seconds == runner.stage_seconds["one"]
    with pytest.raises(UsageError, match="other arguments"):
        runner.run(Stage("one", "counting.py", ("--flag", "2")))
    StageRunner(scripts, output_dir, force=True).run(Stage("one", "counting.py", ("--flag", "2")))
    assert runs(output_dir) == 2


def test_a_copied_study_reuses_the_stages_that_read_its_own_folders(scripts: pathlib.Path, tmp_path: pathlib.Path) -> None:
    def reader(study: pathlib.Path) -> Stage:  # a stage fed by an earlier stage's folder, as a fine-tuning is
        return Stage("reader", "counting.py", ("--model_name_or_path", str(study / "pretrain")))

    original, copy = tmp_path / "study", tmp_path / "copy"
    original.mkdir()
    StageRunner(scripts, original).run(reader(original))
    shutil.copytree(original, copy)
    StageRunner(scripts, copy).run(reader(copy))
    assert runs(copy) == 1  # reused where it was copied to
    with pytest.raises(UsageError, match="other arguments"):  # the copy's stage did not read the original's folder
        StageRunner(scripts, copy).run(reader(original))


def test_a_failed_stage_leaves_no_record_and_runs_again(scripts: pathlib.Path, tmp_path: pathlib.Path) -> None:
    output_dir = tmp_path / "study"
    output_dir.mkdir()
    stage = Stage("flaky", "counting.py", ("--fail",))
    with pytest.raises(RuntimeError, match="first run fails"):
        StageRunner(scripts, output_dir).run(stage)
    assert not (output_dir / "flaky" / "stage.json").exists()
    assert StageRunner(scripts, output_dir).run(stage)["eval_accuracy"] == 0.5 and runs(output_dir) == 2


# ---------------------------------------------------------------------------------------------- full Fashion-MNIST


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    """The IDX format (the MNIST page): 0, 0, type 0x08 (uint8), number of dims, big-endian int32 dims, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(dim).to_bytes(4, "big") for dim in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_make_sample_data_full_writes_every_image_in_order_outside_the_package(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    source = tmp_path / "idx"
    source.mkdir()
    originals = {}
    for split, prefix, count in (("train", "train", 40), ("test", "t10k", 12)):
        images, labels = rng.integers(0, 256, (count, 28, 28)), rng.integers(0, 10, count)
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels)
        originals[split] = (images, labels)
    output = tmp_path / "full"
    assert make_data_main(["--full", "--source", str(source), "--output", str(output)]) == {"train": 40, "test": 12}
    assert len(list((output / "data").glob("train-*.parquet"))) == 16
    loaded = load_dataset(str(output))
    for split, (images, labels) in originals.items():
        assert loaded[split]["label"] == labels.tolist()
        decoded = [np.asarray(image) for image in loaded[split]["image"]]
        assert all(np.array_equal(image, original) for image, original in zip(decoded, images, strict=True))
    assert "# Fashion-MNIST (full)" in (output / "README.md").read_text()

    package = tmp_path / "modeling_mae"  # stands in for the package: the guard must not write into the real one
    monkeypatch.setattr(make_sample_data, "PACKAGE_DIR", package)
    with pytest.raises(UsageError, match="inside the package"):
        make_data_main(["--full", "--source", str(source), "--output", str(package / "sample_data" / "full")])
    with pytest.raises(UsageError, match="apt-get install -y dataset-fashion-mnist"):
        make_data_main(["--full", "--source", str(tmp_path / "nowhere"), "--output", str(output)])
