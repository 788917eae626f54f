"""The scaling study: its statistics against textbook values, its report from a hand-written record, its smoke budget
end to end (what CI runs: learning rates chosen on the held-out split, records, a stage rerun from its record), the
committed records against their committed tables, the stage runner it shares with evidence.py, and the full
Fashion-MNIST build of make_sample_data.py."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image

from modeling_mae.errors import UsageError
from modeling_mae.studies.channels import render_record as render_evidence
from modeling_mae.studies.recipe_sweep import render_sweep
from modeling_mae.studies.scaling import PROTOCOLS, chosen_learning_rate
from modeling_mae.studies.scaling_report import (
    README_END,
    README_START,
    plot_gain,
    readme_section,
    render_table,
    replace_readme_section,
    summarise,
)
from modeling_mae.studies.scaling_statistics import (
    last_quarter_change,
    mean_interval,
    slope_interval,
    t_quantile,
)
from modeling_mae.studies.stages import RESUME_FLAGS, Stage, StageRunner
from run_scripts import make_sample_data
from run_scripts.make_sample_data import main as make_data_main
from run_scripts.scaling_study import main as study_main

DOCS_RECORDS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "records"

# ------------------------------------------------------------------------------------------------------ statistics


def test_t_quantiles_are_the_textbook_values() -> None:
    # Two-sided 95% critical values of Student's t (any printed t-table).
    for df, expected in ((1, 12.706), (2, 4.303), (3, 3.182), (7, 2.365), (10, 2.228), (30, 2.042)):
        assert t_quantile(df) == pytest.approx(expected, abs=5e-4)


def test_the_mean_interval_is_the_t_interval_of_the_mean() -> None:
    summary = mean_interval([1.0, 2.0, 3.0])  # std 1, n 3: half width 4.303 / sqrt(3) = 2.4843
    assert (summary["mean"], summary["std"]) == pytest.approx((2.0, 1.0))
    assert (summary["low"], summary["high"]) == pytest.approx((2.0 - 2.4843, 2.0 + 2.4843), abs=1e-3)
    assert mean_interval([5.0])["low"] is None  # one seed: no interval


def test_the_slope_interval_matches_numpys_least_squares() -> None:
    x = [float(v) for v in (16, 16, 16, 18, 18, 18, 20, 20, 20)]  # log2 parameters of three sizes, three seeds
    y = [0.5, 1.5, 1.0, 2.0, 3.5, 2.5, 4.0, 5.5, 4.5]
    (slope, _), covariance = np.polyfit(x, y, 1, cov=True)  # covariance scaled by residuals / (n - 2)
    got = slope_interval(x, y)
    assert got["slope"] == pytest.approx(slope)
    half = 2.365 * math.sqrt(covariance[0, 0])  # t(0.975, 7 df) from the table
    assert (got["low"], got["high"]) == pytest.approx((slope - half, slope + half), abs=1e-3)
    assert slope_interval([16.0, 16.0, 16.0], [1.0, 2.0, 3.0]) is None  # one size: no slope


def test_the_plateau_is_the_change_since_three_quarters_of_the_epochs() -> None:
    curve = [50.0, 60.0, 70.0, 71.0, 71.3, 71.4, 71.5, 71.6]  # 8 epochs: epoch 6 (71.4) to epoch 8 (71.6)
    assert last_quarter_change(curve) == pytest.approx(0.2)


def test_the_chosen_learning_rate_is_the_best_held_out_one_and_the_smaller_of_a_tie() -> None:
    assert chosen_learning_rate({4e-3: 0.7, 1e-3: 0.8, 2e-3: 0.75}) == 1e-3
    assert chosen_learning_rate({4e-3: 0.9, 1e-3: 0.8, 2e-3: 0.9}) == 2e-3


# ---------------------------------------------------------------------------------------------------------- report


def hand_record() -> dict:
    """Three sizes x three seeds whose every stage result is written out by hand; MAE gains 1/2/3, 3/4/5, 5/6/7."""
    sizes = [("ViT-32", 32, 2**16), ("ViT-64", 64, 2**18), ("ViT-128", 128, 2**20)]
    stages, runs = {}, {}
    for index, (name, _, _) in enumerate(sizes):
        runs[name] = {}
        for seed in range(3):
            scratch = 70.0 + seed
            accuracy = {"mae": scratch + 1 + 2 * index + seed, "scratch": scratch, "linprobe": 74.0 + index,
                        "knn": 72.0, "linprobe_random": 60.0 + index, "knn_random": 50.0}
            runs[name][str(seed)] = {key: f"{key}_{name}_s{seed}" for key in PROTOCOLS}
            for key, value in accuracy.items():
                history = [{"eval_accuracy": (value - 5) / 100}] * 3 + [{"eval_accuracy": value / 100}]
                stages[f"{key}_{name}_s{seed}"] = {"results": {"eval_accuracy": value / 100, "history": history}}
    stages["select"] = {"results": {"eval_accuracy": 0.8}, "cpu_seconds": 5400.0}
    return {
        "budget": "cpu", "budget_settings": {"depth": 6, "seeds": [0, 1, 2]}, "data_description": "hand data",
        "environment": {"git": {"sha": "0123456789abcdef", "dirty": False}}, "wall_seconds": 7200.0,
        "sizes": [{"name": name, "width": width, "parameters": parameters} for name, width, parameters in sizes],
        "selection": {"mae": {"0.001": "select", "0.002": "missing"}}, "chosen_learning_rates": {"mae": 0.001},
        "runs": runs, "stages": stages,
    }


def test_the_report_computes_paired_gains_and_the_criterion_from_the_record() -> None:
    summary = summarise(hand_record())
    gains = [size["gain"]["values"] for size in summary["sizes"]]
    assert gains == [pytest.approx([1, 2, 3]), pytest.approx([3, 4, 5]), pytest.approx([5, 6, 7])]
    # log2 parameters 16, 18, 20: the gain rises 2 points per 2 doublings, 1 per doubling, with the seeds' spread
    assert summary["slope"]["slope"] == pytest.approx(1.0) and summary["slope"]["low"] > 0
    assert summary["criterion_met"] is True
    assert summary["mae_above_linprobe_at_largest"] is True  # MAE 75/77/79 vs the probe's 76
    assert summary["sizes"][0]["plateau"] == {"mae": pytest.approx(5.0), "scratch": pytest.approx(5.0)}

    table = render_table(hand_record())
    row = next(line for line in table.splitlines() if line.startswith("| ViT-64 "))
    values = [value.strip() for value in row.strip("|").split("|")]
    assert values[1] == "262k"
    # MAE 73/75/77, scratch 70/71/72, then the four frozen protocols; the gain 4 ± 4.303 x 1 / sqrt(3)
    assert values[2:8] == ["75.0 ± 2.0", "71.0 ± 1.0", "75.0 ± 0.0", "72.0 ± 0.0", "61.0 ± 0.0", "50.0 ± 0.0"]
    assert values[8] == "+4.00 [+1.52, +6.48]"
    assert "Criterion (slope of the paired gain against log2(encoder parameters), 95% interval above 0): met" in table
    assert "- mae: held-out top-1 by base lr 0.001: 80.0, 0.002: not run; chosen: 0.001" in table
    assert "stages' wall time 2.00 h, CPU time 1.50 h." in table


def test_the_gain_figure_draws_each_sizes_gain_with_its_interval(tmp_path: pathlib.Path) -> None:
    figure = plot_gain(summarise(hand_record()), tmp_path / "gain.png", "title")
    (container,) = figure.axes[0].containers
    line, _caps, (bars,) = container.lines
    assert list(line.get_xdata()) == [2**16, 2**18, 2**20] and list(line.get_ydata()) == pytest.approx([2, 4, 6])
    spans = [abs(segment[1][1] - segment[0][1]) / 2 for segment in bars.get_segments()]
    assert spans == pytest.approx([2.4843] * 3, abs=1e-3)
    with Image.open(tmp_path / "gain.png") as image:
        assert image.format == "PNG"


def test_the_readme_section_states_each_gain_and_the_criterion_and_replaces_only_its_block() -> None:
    section = readme_section(hand_record(), "docs/records/x_gain.png")
    assert section.startswith("![Fine-tuned top-1 gain of MAE over scratch against encoder parameters, 95% "
                              "intervals](docs/records/x_gain.png)")
    assert "by +2.0 points at 66k, +4.0 points at 262k, +6.0 points at 1.05M;" in section
    assert "is met (slope +1.00 points per doubling of parameters [" in section and "3 paired seeds" in section
    readme = f"above\n{README_START}\nold text\n{README_END}\nbelow"
    assert replace_readme_section(readme, section) == f"above\n{README_START}\n{section}\n{README_END}\nbelow"


# ------------------------------------------------------------------------------------------------ the smoke study


def stage_folder_accuracy(folder: pathlib.Path) -> float:
    return json.loads((folder / "all_results.json").read_text())["eval_accuracy"]


def test_smoke_study_chooses_on_the_held_out_split_records_everything_and_reruns_a_stage(
    tmp_path: pathlib.Path,
) -> None:
    study = tmp_path / "study"
    record = study_main(["--budget", "smoke", "--output_dir", str(study), "--num_threads", "1"])
    for arm, stages in record["selection"].items():  # the lr of the best held-out accuracy, read off the stages
        accuracies = {float(lr): stage_folder_accuracy(study / name) for lr, name in stages.items()}
        assert record["chosen_learning_rates"][arm] == max(sorted(accuracies), key=accuracies.get)
        for name in stages.values():
            argv = record["stages"][name]["argv"]
            assert argv[argv.index("--holdout_fraction") + 1] == "0.1"
    mae_epochs, scratch_epochs = (
        len(record["stages"][record["runs"]["ViT-16"]["0"][arm]]["results"]["history"]) for arm in ("mae", "scratch"))
    assert scratch_epochs == 2 * mae_epochs
    for seeds in record["runs"].values():
        for stages in seeds.values():
            assert set(stages) == set(PROTOCOLS)
            for name in stages.values():  # scored on the test split, every main stage
                assert "--holdout_fraction" not in record["stages"][name]["argv"]
                assert record["stages"][name]["results"]["eval_accuracy"] == stage_folder_accuracy(study / name)
    assert record["environment"]["git"]["sha"] and record["environment"]["libraries"]["torch"]
    assert all(stage["cpu_seconds"] > 0 for stage in record["stages"].values())  # each ran here, and was timed

    written = (study / "scaling_study.md").read_text()
    assert study_main(["--from_record", str(study / "scaling_study.json")]) == json.loads(
        (study / "scaling_study.json").read_text())
    assert (study / "scaling_study.md").read_text() == written  # the table comes from the record alone
    assert (study / "scaling_study_gain.png").is_file() and (study / "scaling_study_curves.png").is_file()

    records = {path: path.stat().st_mtime_ns for path in study.glob("*/stage.json")}
    assert len(records) == 2 * 2 * 7 + 4  # sizes x seeds x (pretraining + 6 protocols) + 2 arms x 2 lrs
    study_main(["--budget", "smoke", "--output_dir", str(study)])
    assert {path: path.stat().st_mtime_ns for path in records} == records  # every stage reused, none rerun

    name = record["runs"]["ViT-8"]["1"]["mae"]
    rerun = study_main(["--from_record", str(study / "scaling_study.json"), "--rerun", name,
                        "--output_dir", str(tmp_path / "rerun")])
    assert (tmp_path / "rerun" / "pretrain_vit-8_s1" / "all_results.json").is_file()  # the stage it reads, first
    assert rerun["eval_accuracy"] == pytest.approx(record["stages"][name]["results"]["eval_accuracy"], abs=0.1)


# --------------------------------------------------------------------------------------------- committed records


@pytest.mark.parametrize("record_path", sorted(DOCS_RECORDS.glob("*.json")), ids=lambda path: path.name)
def test_every_committed_table_is_what_its_committed_record_makes(record_path: pathlib.Path) -> None:
    record = json.loads(record_path.read_text())
    renderers = {"recipe_sweep": render_sweep, "channels_evidence": render_evidence}
    assert record_path.with_suffix(".md").read_text() == renderers.get(record["study"], render_table)(record)


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

# A training as the study sees one: it saves a checkpoint (step_1) after its first epoch and is stopped then if --stop.
TRAINING_SCRIPT = '''
import json, pathlib

def main(argv):
    output_dir = pathlib.Path(argv[argv.index("--output_dir") + 1])
    found = sorted(path.name for path in output_dir.glob("step_*"))
    with (output_dir.parent / "trainings.jsonl").open("a") as log:
        log.write(json.dumps({"argv": list(argv), "checkpoints_found": found}) + "\\n")
    (output_dir / "step_1").mkdir(exist_ok=True)
    (output_dir / "step_1" / "trainer_state.json").write_text("{}")
    if "--stop" in argv and not found:
        raise KeyboardInterrupt  # as a session's end would stop it, part-way
    (output_dir / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.5}))
'''


@pytest.fixture
def scripts(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "counting.py").write_text(COUNTING_SCRIPT)
    (folder / "training.py").write_text(TRAINING_SCRIPT)
    return folder


def runs(output_dir: pathlib.Path) -> int:
    return len((output_dir / "runs.txt").read_text().splitlines())


@contextlib.contextmanager
def process_output_to(path: pathlib.Path) -> Iterator[None]:
    """What this process writes to its file descriptors 1 and 2, as a terminal would get it, into `path` instead."""
    saved = [os.dup(1), os.dup(2)]
    with path.open("wb") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for descriptor, copy in zip((1, 2), saved):
                os.dup2(copy, descriptor)
                os.close(copy)


def test_stage_runner_logs_a_stage_reuses_it_and_refuses_results_of_other_arguments(
    scripts: pathlib.Path, tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str]
) -> None:
    output_dir = tmp_path / "study"
    output_dir.mkdir()
    stage = Stage("one", "counting.py", ("--flag", "1"))
    terminal = tmp_path / "terminal.txt"
    # The process's real stdout and stderr, as outside pytest, kept off pytest's own output.
    with capfd.disabled(), process_output_to(terminal):
        assert StageRunner(scripts, output_dir).run(stage)["eval_accuracy"] == 0.5
    assert (output_dir / "one.log").read_text().splitlines() == ["printed by the stage", "warned by the stage"]
    command = f"python run_scripts/counting.py --flag 1 --output_dir {output_dir / 'one'}"
    assert re.fullmatch(rf"\[\d\d:\d\d:\d\d\] {re.escape(command)}\n", terminal.read_text())  # the stage: its log

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


def test_a_training_stopped_part_way_goes_on_from_its_checkpoint_only_with_the_same_arguments(
    scripts: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    output_dir = tmp_path / "study"
    output_dir.mkdir()

    def trainings() -> list[dict[str, Any]]:
        return [json.loads(line) for line in (output_dir / "trainings.jsonl").read_text().splitlines()]

    stopped = Stage("train", "training.py", ("--stop", "--lr", "1"), resumable=True)
    with pytest.raises(KeyboardInterrupt):
        StageRunner(scripts, output_dir).run(stopped)
    StageRunner(scripts, output_dir).run(stopped)
    first, second = trainings()
    assert first["argv"][-8:-2] == second["argv"][-8:-2] == list(RESUME_FLAGS)
    assert second["checkpoints_found"] == ["step_1"]  # went on from the stopped run's checkpoint
    assert json.loads((output_dir / "train" / "stage.json").read_text())["attempts"] == 2

    changed = Stage("train", "training.py", ("--stop", "--lr", "2"), resumable=True)
    with pytest.raises(KeyboardInterrupt):  # a run of other arguments does not continue the first one's checkpoint
        StageRunner(scripts, output_dir, force=True).run(changed)
    assert trainings()[-1]["checkpoints_found"] == []
    with pytest.raises(KeyboardInterrupt):
        StageRunner(scripts, output_dir).run(Stage("train", "training.py", ("--stop", "--lr", "3"), resumable=True))
    assert trainings()[-1]["checkpoints_found"] == []  # nor does a third run the second one's


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


def test_the_readme_shows_the_gain_plot_of_the_largest_committed_budget() -> None:
    readme = (DOCS_RECORDS.parents[1] / "README.md").read_text()
    records = [DOCS_RECORDS / f"scaling_study_{budget}.json" for budget in ("gpu", "cpu")]
    committed = next((path for path in records if path.is_file()), None)
    section = readme[readme.index(README_START) + len(README_START):readme.index(README_END)].strip()
    if committed is None:
        assert "not run yet" in section
        return
    figure = f"docs/records/{committed.stem}_gain.png"
    assert section == readme_section(json.loads(committed.read_text()), figure)
    assert (DOCS_RECORDS.parents[1] / figure).is_file()
