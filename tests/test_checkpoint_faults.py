"""Checkpoints under faults, in one process: a poisoned pickle never runs, a resume with another batch layout, model,
data or objective is refused before anything is loaded or written, a damaged or malformed checkpoint is named with the
one to use instead (and the run resumed from that one replaces it), a linked checkpoint is used and rotated as a link,
a full disk keeps the previous checkpoint, a diverged run names a checkpoint it can really go on from, a second run
cannot share a folder in use, a read-only folder is refused at start-up, and SIGTERM saves a checkpoint that resumes
exactly. Each failure is one `UsageError` line.

The multi-process cases (DeepSpeed shards, 2 -> 1 processes, a missing process file, SIGUSR1 to 2 processes) are in
test_distributed.py.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import tiny_config
from data_fixtures import make_parquet_shards
from test_training import (
    RUN_MAE,
    assert_same_weights,
    export_model_on_a_full_disk,
    run_args,
    run_main,
    weights,
)

from modeling_mae import errors
from modeling_mae.arguments import RunArguments
from modeling_mae.data.sources import DataArguments
from modeling_mae.errors import UsageError
from modeling_mae.loops import finetuning, pretraining, pretraining_outputs
from modeling_mae.training import checkpoint_files, output_lock, run_identity
from modeling_mae.training.accelerator import BatchLayout, machine_count
from modeling_mae.training.checkpoint_files import (
    FULL_DISK_FREE_BYTES,
    PICKLE_SUFFIXES,
    UnusableFile,
    check_checkpoint_files,
    check_rng_states,
)
from modeling_mae.training.checkpoints import list_checkpoints
from modeling_mae.training.output_lock import (
    LOCK_NAME,
    STALE_AFTER_S,
    Holder,
    OutputDirLock,
)
from modeling_mae.training.progress import NonFiniteLossError
from modeling_mae.training.resume import (
    check_process_files,
    claim_output_dir,
    fits,
    resume_command,
    resume_elsewhere,
)
from run_scripts import run_finetune

PAGE = 4096


class Payload:
    """What a hostile checkpoint file holds: unpickling it runs code (here, it creates the file `marker`)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",)


def poison(path: pathlib.Path, marker: pathlib.Path, archive: bool) -> None:
    """Replace `path` by a payload: a `torch.save` archive (what the file normally is) or a bare pickle."""
    if archive:
        torch.save({"state": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


@pytest.fixture(scope="module")
def straight(data_dir, model_config, tmp_path_factory) -> pathlib.Path:
    """A finished 6-step run with checkpoints step_3 and step_6 (tests copy what they change)."""
    output = tmp_path_factory.mktemp("straight") / "run"
    run_main(run_args(data_dir, model_config, output, "--checkpointing_steps", "3"))
    return output


def copy_run(straight: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    copy = tmp_path / "run"
    shutil.copytree(straight, copy)
    return copy


# ------------------------------------------------------------------------------------------------ running no code


RESUMED_PICKLES = ["optimizer.bin", "random_states_0.pkl"]  # every pickle of a one-process checkpoint, checked below


@pytest.mark.parametrize("archive", [True, False], ids=["torch-archive", "bare-pickle"])
@pytest.mark.parametrize("name", [*RESUMED_PICKLES, "custom_checkpoint_0.pkl"])
def test_a_poisoned_pickle_in_a_checkpoint_never_runs(
    name, archive, straight, data_dir, model_config, tmp_path
) -> None:
    """Each pickle a resume could load, and the one Accelerate unpickles with weights_only=False for registered
    objects (planted): the payload never runs, and the resume stops on one line naming the file."""
    assert sorted(p.name for p in (straight / "step_3").iterdir() if p.suffix in PICKLE_SUFFIXES) == RESUMED_PICKLES
    checkpoint = copy_run(straight, tmp_path) / "step_3"
    marker = tmp_path / "the-payload-ran"
    poison(checkpoint / name, marker, archive)
    flags = run_args(data_dir, model_config, tmp_path / "resumed", "--resume_from_checkpoint", str(checkpoint))
    with pytest.raises(UsageError, match=rf"^{re.escape(str(checkpoint / name))} (cannot be loaded safely|is an obj)"):
        run_main(flags)
    assert not marker.exists()


def test_a_poisoned_dcp_metadata_file_never_runs(tmp_path) -> None:
    """FSDP's sharded checkpoints go through torch.distributed.checkpoint, which unpickles its `.metadata` with plain
    `pickle`: a real one passes the check, a poisoned one is refused before DCP reads it."""
    checkpoint = tmp_path / "step_1"
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    for folder, state in (("pytorch_model_fsdp_0", model.state_dict()), ("optimizer_0", optimizer.state_dict())):
        dcp.save(state, checkpoint_id=checkpoint / folder)  # the layout Accelerate's FSDP save writes
    check_checkpoint_files(checkpoint, allowed=[], model_weights=None)

    marker = tmp_path / "the-payload-ran"
    poison(checkpoint / "optimizer_0" / ".metadata", marker, archive=False)
    with pytest.raises(UnusableFile, match=r"optimizer_0/.metadata cannot be loaded safely: .* \(builtins.exec\)"):
        check_checkpoint_files(checkpoint, allowed=[], model_weights=None)
    assert not marker.exists()


@pytest.mark.parametrize("content", ["not-a-mapping", "no-random-state", "no-numpy-state", "wrong-torch-state"])
def test_random_states_that_accelerate_cannot_restore_stop_the_resume(
    content, straight, data_dir, model_config, tmp_path
) -> None:
    """Safe to unpickle, but not the RNG states Accelerate restores (which it would skip with an info-level line, and
    the resumed run would silently not be exact): the resume stops on one line naming the file."""
    checkpoint = copy_run(straight, tmp_path) / "step_6"
    path = checkpoint / "random_states_0.pkl"
    states = torch.load(path, weights_only=False)
    damaged = {
        "not-a-mapping": [1, 2],
        "no-random-state": {"hello": 1},
        "no-numpy-state": {key: value for key, value in states.items() if key != "numpy_random_seed"},
        "wrong-torch-state": {**states, "torch_manual_seed": torch.zeros(3)},
    }[content]
    torch.save(damaged, path)
    flags = run_args(data_dir, model_config, checkpoint.parent, "--resume_from_checkpoint", "latest")
    with pytest.raises(UsageError) as refused:
        run_main([*flags, "--max_train_steps", "8"])
    assert str(refused.value).startswith(f"{path} holds ")
    assert str(refused.value).endswith(f"resume from the previous one with --resume_from_checkpoint {checkpoint.parent}"
                                       "/step_3")


def test_random_states_without_the_cuda_ones_resume_with_a_warning(straight, monkeypatch, caplog) -> None:
    """A checkpoint saved without a GPU, resumed on one: the CPU states are restored, the GPU's start afresh (said)."""
    path = straight / "step_6" / "random_states_0.pkl"
    states = torch.load(path, weights_only=False)
    monkeypatch.setattr(checkpoint_files, "is_cuda_available", lambda: True)
    check_rng_states(path, states)
    assert f"{path} holds no CUDA random-number-generator state" in caplog.text
    assert "not an exact continuation" in caplog.text


@pytest.mark.parametrize("content", [b'{\n  "train_loader": {"epo', b'{"hello": 1}'], ids=["truncated", "no-position"])
def test_a_damaged_process_state_names_its_file_and_the_previous_checkpoint(
    content, straight, data_dir, model_config, tmp_path
) -> None:
    output = copy_run(straight, tmp_path)
    path = output / "step_6" / "process_state_0.json"
    path.write_bytes(content)
    with pytest.raises(UsageError) as refused:
        run_main(run_args(data_dir, model_config, output, "--resume_from_checkpoint", "latest", "--max_train_steps", "8"))
    assert re.fullmatch(
        rf"{re.escape(str(path))} (cannot be read|holds no data-stream position) \(.+\); resume from the previous "
        rf"one with --resume_from_checkpoint {re.escape(str(output / 'step_3'))}",
        str(refused.value),
    )


# ------------------------------------------------------------------------------------------------ the batch layout


def layout(batch: int, accumulation: int) -> str:
    effective = batch * accumulation
    return f"1 process(es) x {batch} images x {accumulation} accumulation step(s) = effective batch {effective}"


@pytest.mark.parametrize(
    "change, now",
    [(("--per_device_train_batch_size", "4"), layout(4, 1)), (("--gradient_accumulation_steps", "2"), layout(8, 2))],
)
def test_a_resume_with_another_batch_layout_is_refused(change, now, straight, data_dir, model_config, tmp_path) -> None:
    """The lr follows the effective batch and the stream is split by process: another layout cannot continue
    exactly. (Another number of processes: test_distributed.py.)"""
    checkpoint = straight / "step_3"
    with pytest.raises(UsageError) as refused:
        run_main(run_args(data_dir, model_config, tmp_path, "--resume_from_checkpoint", str(checkpoint), *change))
    assert str(refused.value) == (
        f"{checkpoint} was saved by {layout(8, 1)}; this run has {now}. A resume continues exactly only with the same "
        "layout: launch 1 process(es) (accelerate launch --num_processes 1) with --per_device_train_batch_size 8 "
        "--gradient_accumulation_steps 1, or start a new run in another --output_dir"
    )
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["batch_layout"] == {
        "num_processes": 1,
        "num_machines": 1,
        "per_device_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "effective_batch_size": 8,
    }


def test_a_resume_with_other_dataloader_workers_is_refused(straight, data_dir, model_config, tmp_path) -> None:
    """Each DataLoader worker reads its own part of the stream: its position means nothing to another number."""
    flags = ("--resume_from_checkpoint", str(straight / "step_3"), "--dataloader_num_workers", "2")
    with pytest.raises(UsageError) as refused:
        run_main(run_args(data_dir, model_config, tmp_path, *flags))
    assert str(refused.value) == (
        "The checkpoint's data-stream position was saved with --dataloader_num_workers 0 or 1, and this run has "
        "--dataloader_num_workers 2: each worker reads its own part of the stream, so resume with "
        "--dataloader_num_workers 0 or 1 to continue exactly where it stopped."
    )


# ------------------------------------------------------------------------------------------ what the checkpoint trained


@pytest.fixture(scope="module")
def other_data(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Another data set laid out like `data_dir` (one train shard, one validation shard), of other images."""
    directory = tmp_path_factory.mktemp("other_data")
    make_parquet_shards(directory, 32, num_shards=1)
    make_parquet_shards(directory, 16, num_shards=1, split="validation")
    return directory


def snapshot(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: its modification time and size."""
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.stat().st_size)
            for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("change", ["dataset", "config_overrides", "model_config"])
def test_a_resume_on_other_data_or_another_model_is_refused_before_the_run_writes_anything(
    change, straight, data_dir, other_data, model_config, tmp_path
) -> None:
    """The stream position of other data, or the weights of another model (a 64-line state-dict traceback before):
    one line naming the old and the new values, and the output folder exactly as it was (run_config.yaml used to be
    rewritten first, and the later checkpoint step_6 would be set aside)."""
    output = copy_run(straight, tmp_path)
    deeper = tmp_path / "deeper" / "config.json"
    tiny_config(num_hidden_layers=3).save_pretrained(deeper.parent)
    data = other_data if change == "dataset" else data_dir
    flags = run_args(data, deeper if change == "model_config" else model_config, output, "--resume_from_checkpoint",
                     str(output / "step_3"))
    if change == "config_overrides":
        flags += ["--config_overrides", "hidden_size=64,intermediate_size=128"]
    before = snapshot(output)
    with pytest.raises(UsageError) as refused:
        run_main(flags)
    start_over = "or start a new run in another --output_dir"
    expected = {
        "dataset": rf'was trained on other data \(dataset "{re.escape(str(data_dir))}" -> "{re.escape(str(data))}", '
                   r'fingerprint "\w+" -> "\w+"\): its data-stream position means nothing on this data\. Resume with '
                   rf"the data it was trained on, {start_over}",
        "config_overrides": r"holds another model \(hidden_size 32 -> 64, intermediate_size 64 -> 128\): resume with "
                            r"the model flags it was trained with \(--model_config, --config_overrides: "
                            rf"{re.escape(str(output / 'run_config.yaml'))}\), {start_over}",
        "model_config": r"holds another model \(num_hidden_layers 2 -> 3\): resume with",
    }[change]
    assert re.match(rf"{re.escape(str(output / 'step_3'))} {expected}", str(refused.value)), str(refused.value)
    assert snapshot(output) == before


def test_a_checkpoint_of_an_older_version_resumes_unchecked_and_another_model_is_still_one_line(
    straight, data_dir, model_config, tmp_path, caplog
) -> None:
    """A checkpoint written before the run identity was recorded: resumed with a warning, and another model's weights
    stop the resume in one line, not in PyTorch's state-dict report."""
    output = copy_run(straight, tmp_path)
    path = output / "step_6" / "trainer_state.json"
    path.write_text(json.dumps({key: value for key, value in json.loads(path.read_text()).items()
                                if key != "run_identity"}))
    flags = run_args(data_dir, model_config, output, "--resume_from_checkpoint", "latest", "--max_train_steps", "8")
    with pytest.raises(UsageError) as refused:
        run_main([*flags, "--config_overrides", "hidden_size=64,intermediate_size=128"])
    assert str(refused.value) == (
        f"{output / 'step_6'} holds another model (Error(s) in loading state_dict for MAEForPreTraining:): resume "
        "with the model flags it was trained with, or start a new run in another --output_dir"
    )
    assert f"{output / 'step_6'} records neither its model nor its data (an older version wrote it)" in caplog.text
    assert run_main(flags)["train_steps"] == 8


def test_a_resume_with_another_objective_is_refused_unless_meant_then_logged(
    straight, data_dir, model_config, tmp_path
) -> None:
    """--mask_ratio and --norm_pix_loss change what the model learns: refused in one line, unless
    --allow_objective_change says the change is meant; the change is then in log_history.json and the new value in the
    next checkpoints."""
    output = copy_run(straight, tmp_path)
    resume = run_args(data_dir, model_config, output, "--resume_from_checkpoint", "latest", "--max_train_steps", "8",
                      "--checkpointing_steps", "4")
    for change, described in ((["--mask_ratio", "0.5"], "mask_ratio 0.75 -> 0.5"),
                              (["--norm_pix_loss", "true"], "norm_pix_loss false -> true")):
        with pytest.raises(UsageError) as refused:
            run_main([*resume, *change])
        assert str(refused.value) == (
            f"{output / 'step_6'} was trained with another objective ({described}): pass --allow_objective_change to "
            "go on with this run's (the change is logged in the run's history), or resume with the values it was "
            "trained with"
        )
    assert run_main([*resume, "--mask_ratio", "0.5", "--allow_objective_change"])["train_steps"] == 8
    history = json.loads((output / "log_history.json").read_text())["log_history"]
    assert [entry for entry in history if "objective_change" in entry] == [
        {"step": 6, "objective_change": {"mask_ratio": [0.75, 0.5]}}]
    state = json.loads((output / "step_8" / "trainer_state.json").read_text())
    assert state["run_identity"]["model"]["mask_ratio"] == 0.5


@pytest.mark.parametrize("key, value, problem", [
    ("completed_steps", "6", "completed_steps is '6', not int"),
    ("log_history", {"step": 2}, "log_history is {'step': 2}, not list[dict[str, typing.Any]]"),
    ("batch_layout", "num_processes", "batch_layout: TypeError: num_processes is '1', not a whole number"),
    ("lr_scheduler", "last_epoch", "lr_scheduler has no usable last_epoch"),
])
def test_a_malformed_trainer_state_is_one_line_naming_the_previous_checkpoint(
    key, value, problem, straight, data_dir, model_config, tmp_path
) -> None:
    """Valid JSON, but a string where a number belongs (a TypeError traceback before): the one line of a truncated
    file."""
    output = copy_run(straight, tmp_path)
    path = output / "step_6" / "trainer_state.json"
    state = json.loads(path.read_text())
    if isinstance(state[key], dict):
        state[key][value] = str(state[key][value])
    else:
        state[key] = value
    path.write_text(json.dumps(state))
    with pytest.raises(UsageError) as refused:
        run_main(run_args(data_dir, model_config, output, "--resume_from_checkpoint", "latest",
                          "--max_train_steps", "8"))
    assert str(refused.value) == (
        f"{path} cannot be read ({problem}); resume from the previous one with --resume_from_checkpoint "
        f"{output / 'step_3'}"
    )


def test_a_trainer_state_key_of_a_newer_version_resumes_with_a_warning(
    straight, data_dir, model_config, tmp_path, caplog
) -> None:
    output = copy_run(straight, tmp_path)
    path = output / "step_6" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "written_by_a_newer_version": {"x": 1}}))
    results = run_main(run_args(data_dir, model_config, output, "--resume_from_checkpoint", "latest",
                                "--max_train_steps", "8"))
    assert results["train_steps"] == 8
    warning = f"{path}: written_by_a_newer_version unknown to this version (a newer one wrote it?): left out"
    assert warning in caplog.text


def test_machine_count_from_the_launchers_environment() -> None:
    assert machine_count(1, {}) == 1  # no launcher
    assert machine_count(16, {"LOCAL_WORLD_SIZE": "8"}) == 2  # torchrun (accelerate launch)
    assert machine_count(16, {"LOCAL_SIZE": "4"}) == 4  # DeepSpeed's launcher


# ------------------------------------------------------------------------------------------------ damaged checkpoints


@pytest.mark.parametrize("damage, problem", [("truncate", "is damaged"), ("delete", "is missing")])
def test_a_damaged_newest_checkpoint_names_its_file_and_the_previous_checkpoint(
    damage, problem, straight, data_dir, model_config, tmp_path
) -> None:
    output = copy_run(straight, tmp_path)
    weights_file = output / "step_6" / "model.safetensors"
    if damage == "truncate":
        weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    else:
        weights_file.unlink()
    flags = run_args(data_dir, model_config, output, "--resume_from_checkpoint", "latest", "--max_train_steps", "8")
    with pytest.raises(UsageError) as refused:
        run_main(flags)
    message = str(refused.value)
    assert message.startswith(f"{weights_file} {problem}")
    assert message.endswith(f"resume from the previous one with --resume_from_checkpoint {output / 'step_3'}")


def test_resuming_an_earlier_checkpoint_sets_the_damaged_later_one_aside(
    straight, data_dir, model_config, tmp_path
) -> None:
    """Following the advice above: the run resumed from step_3 moves the damaged step_6 to superseded/ and saves its
    own (it used to log "saved" and keep the damaged folder), so `latest` then resumes cleanly."""
    output = copy_run(straight, tmp_path)
    weights_file = output / "step_6" / "model.safetensors"
    damaged = weights_file.read_bytes()[: weights_file.stat().st_size // 2]
    weights_file.write_bytes(damaged)
    run_main(run_args(data_dir, model_config, output, "--resume_from_checkpoint", str(output / "step_3"),
                      "--checkpointing_steps", "3"))
    assert_same_weights(weights(output / "step_6"), weights(straight / "step_6"))  # an exact resume's step 6
    assert sorted(path.name for path in output.iterdir() if "step_" in path.name) == ["step_3", "step_6"]
    assert (output / "superseded" / "step_6" / "model.safetensors").read_bytes() == damaged  # moved, not deleted
    results = run_main(run_args(data_dir, model_config, output, "--resume_from_checkpoint", "latest",
                                "--max_train_steps", "8"))
    assert results["train_steps"] == 8


def test_a_resumed_run_sets_aside_the_checkpoints_of_the_run_it_went_back_on(
    straight, data_dir, model_config, tmp_path
) -> None:
    """Resumed from step_3, the old run's step_6 is moved to superseded/ at once (a second time: under another name),
    so that `latest` after a preemption resumes this run, not the one it went back on; nothing is deleted."""
    output = copy_run(straight, tmp_path)
    flags = ("--resume_from_checkpoint", str(output / "step_3"), "--checkpointing_steps", "4", "--max_train_steps", "4")
    run_main(run_args(data_dir, model_config, output, *flags))
    assert sorted(path.name for path in output.iterdir() if "step_" in path.name) == ["step_3", "step_4"]
    assert_same_weights(weights(output / "superseded" / "step_6"), weights(straight / "step_6"))
    shutil.copytree(straight / "step_6", output / "step_6")
    run_main(run_args(data_dir, model_config, output, *flags))
    assert sorted(path.name for path in (output / "superseded").iterdir()) == ["step_4", "step_6", "step_6.2"]


def test_a_linked_checkpoint_resumes_with_latest_and_rotation_removes_the_link_not_its_target(
    straight, data_dir, model_config, tmp_path
) -> None:
    """step_6 a link to a checkpoint kept on another disk: `latest` resumes it (it used to be taken for another run's
    checkpoint), and --checkpoints_total_limit later removes the link (rmtree used to fail on it mid-training), never
    the folder it points to."""
    output = copy_run(straight, tmp_path)
    kept = tmp_path / "other-disk" / "step_6"
    kept.parent.mkdir()
    shutil.move(output / "step_6", kept)
    (output / "step_6").symlink_to(kept, target_is_directory=True)
    results = run_main(run_args(data_dir, model_config, output, "--resume_from_checkpoint", "latest",
                                "--max_train_steps", "8", "--checkpointing_steps", "1",
                                "--checkpoints_total_limit", "1"))
    assert results["train_steps"] == 8
    assert [path.name for path in list_checkpoints(output)] == ["step_8"]
    assert not os.path.lexists(output / "step_6")
    assert_same_weights(weights(kept), weights(straight / "step_6"))  # the target, untouched


def test_a_fresh_run_refuses_a_folder_that_holds_another_runs_checkpoints(
    straight, data_dir, model_config, tmp_path
) -> None:
    """Starting over in a used output_dir would mix two runs' checkpoints (and `latest` would pick the old one)."""
    output = copy_run(straight, tmp_path)
    for resume in ((), ("--resume_from_checkpoint", str(straight / "step_3"))):  # none, or one from elsewhere
        with pytest.raises(UsageError, match="holds the checkpoints of another run \\(step_3, step_6\\): continue"):
            run_main(run_args(data_dir, model_config, output, *resume))
    assert [path.name for path in list_checkpoints(output)] == ["step_3", "step_6"]


def test_saving_the_step_a_run_resumed_from_keeps_that_checkpoint(data_dir, model_config, tmp_path, caplog) -> None:
    """A checkpoint at an epoch's last step, resumed with --checkpointing_steps epoch: the epoch ends at once and
    saves that same step. The folder already holds this run's state there: it is kept, not rewritten (rewriting it
    would leave it missing for a moment, and it may be the only checkpoint), and the log says kept, not saved."""
    output = tmp_path / "run"
    run_main(run_args(data_dir, model_config, output, "--checkpointing_steps", "8", "--max_train_steps", "8"))
    saved = (output / "step_8" / "trainer_state.json").read_text()
    caplog.clear()
    results = run_main(run_args(data_dir, model_config, output, "--resume_from_checkpoint", "latest",
                                "--checkpointing_steps", "epoch", "--max_train_steps", "10"))
    assert results["train_steps"] == 10
    assert [path.name for path in list_checkpoints(output)] == ["step_8"]
    assert (output / "step_8" / "trainer_state.json").read_text() == saved
    assert f"step 8: kept {output / 'step_8'}, which already holds this run's state at that step" in caplog.text
    assert "step 8: saved" not in caplog.text


# ------------------------------------------------------------------------------------------------------- a full disk


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(
    straight, data_dir, model_config, tmp_path, monkeypatch
) -> None:
    """Fault injection: the second save runs out of space half-way. The run stops in one line; the previous
    checkpoint is intact, and resuming from it gives the uninterrupted run's weights."""
    save_state = Accelerator.save_state

    def save_state_until_the_disk_fills(self: Accelerator, output_dir: str, **kwargs: object) -> None:
        staging = pathlib.Path(output_dir)
        if list_checkpoints(staging.parent):
            staging.mkdir(parents=True, exist_ok=True)
            (staging / "model.safetensors").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        save_state(self, output_dir, **kwargs)

    output = tmp_path / "run"
    flags = run_args(data_dir, model_config, output, "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
    monkeypatch.setattr(Accelerator, "save_state", save_state_until_the_disk_fills)
    with pytest.raises(UsageError, match=r"^no space left on .+ while saving checkpoint step_6 to "):
        run_main(flags)
    assert [path.name for path in output.iterdir() if "step_" in path.name] == ["step_3"]  # the partial save is gone
    monkeypatch.undo()
    assert run_main(flags)["train_steps"] == 6
    assert_same_weights(weights(output), weights(straight))


def test_a_full_disk_at_the_final_export_names_the_last_checkpoint(
    straight, data_dir, model_config, tmp_path, monkeypatch
) -> None:
    """The model export at the end runs out of space (safetensors' own error): one line, like a checkpoint's, and the
    suggested rerun goes straight to the export."""

    output = copy_run(straight, tmp_path)
    (output / "model.safetensors").unlink()
    monkeypatch.setattr(pretraining_outputs, "export_model", export_model_on_a_full_disk)
    flags = run_args(data_dir, model_config, output, "--resume_from_checkpoint", "latest", "--checkpointing_steps", "3")
    with pytest.raises(UsageError) as refused:
        run_main(flags)
    assert re.fullmatch(
        rf"no space left on .+ while saving the final model to {re.escape(str(output))}; the previous checkpoint "
        rf"{re.escape(str(output / 'step_6'))} is intact. Free some space and rerun with --resume_from_checkpoint "
        "latest",
        str(refused.value),
    )
    monkeypatch.undo()
    assert run_main(flags)["train_steps"] == 6
    assert_same_weights(weights(output), weights(straight))


def can_mount_a_private_tmpfs() -> bool:
    """A user namespace with its own mounts: a tmpfs mounted there is seen by nobody else and needs no root."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def allocated(path: pathlib.Path) -> int:
    """Bytes a file takes on a tmpfs: whole pages."""
    return math.ceil(path.stat().st_size / PAGE) * PAGE


@pytest.mark.skipif(not can_mount_a_private_tmpfs(), reason="unshare -rm cannot mount a tmpfs here")
def test_a_full_disk_for_real_names_the_filesystem_and_keeps_the_previous_checkpoint(data_dir, tmp_path) -> None:
    """A run on a tmpfs that holds step_3, then fills up in the middle of step_6's optimizer.bin, where torch.save
    fails with a message that says nothing of space ("unexpected pos ..."). The filesystem is named, step_3 is kept,
    the partial step_6 removed. (A model of a few MB, so that the tmpfs is larger than the "disk is full" margin.)"""
    model_config = tmp_path / "model" / "config.json"
    tiny_config(hidden_size=128, intermediate_size=512).save_pretrained(model_config.parent)
    reference = tmp_path / "reference"
    run_main(run_args(data_dir, model_config, reference, "--checkpointing_steps", "3", "--max_train_steps", "3"))
    step = reference / "step_3"
    size = sum(allocated(path) for path in step.iterdir()) + allocated(reference / "run_config.yaml")
    size += allocated(step / "model.safetensors") + allocated(step / "optimizer.bin") // 2
    assert size > 4 * FULL_DISK_FREE_BYTES
    mount, kept = tmp_path / "tmpfs", tmp_path / "kept"
    mount.mkdir()
    flags = run_args(data_dir, model_config, mount / "run", "--checkpointing_steps", "3")
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {mount} && {sys.executable} {RUN_MAE} {' '.join(flags)}; "
        f"status=$?; cp -a {mount / 'run'} {kept}; exit $status"
    )
    completed = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, check=False)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert completed.stderr.strip().splitlines()[-1] == (
        f"error: no space left on tmpfs (mounted at {mount}) while saving checkpoint step_6 to {mount / 'run'}; the "
        f"previous checkpoint {mount / 'run' / 'step_3'} is intact. Free some space (a save needs room for one more "
        "checkpoint beside the --checkpoints_total_limit kept ones) and rerun with --resume_from_checkpoint latest"
    )
    assert sorted(path.name for path in kept.iterdir() if "step_" in path.name) == ["step_3"]
    assert_same_weights(weights(kept / "step_3"), weights(step))


# ------------------------------------------------------------------------------------------------------- divergence


def test_a_diverged_run_names_a_checkpoint_it_can_go_on_from(data_dir, model_config, tmp_path) -> None:
    """An absurd lr blows the weights up at the second step (the first warmup step has lr 0); the weights it saves
    from then on give non-finite losses. The error names step_1, and resuming it with a sane lr trains to the end."""
    output = tmp_path / "run"
    common = ("--checkpointing_steps", "1", "--max_consecutive_nonfinite", "3", "--warmup_steps", "2")
    with pytest.raises(NonFiniteLossError) as diverged:
        run_main(run_args(data_dir, model_config, output, *common, "--learning_rate", "1e12"))
    assert "from step 2 on: training diverged" in str(diverged.value)
    assert f"Resume from {output / 'step_1'}, the newest checkpoint saved before it" in str(diverged.value)
    assert [path.name for path in list_checkpoints(output)] == ["step_1", "step_2"]

    # Resumed from step_1 with a sane lr, and preempted right after saving step_2: the diverged step_2 was set aside,
    # so a resume of the newest checkpoint goes on from this run's state.
    sane = [*common, "--learning_rate", "1e-3"]
    run_main(run_args(data_dir, model_config, output, *sane, "--resume_from_checkpoint", str(output / "step_1"),
                      "--max_train_steps", "2"))
    state = json.loads((output / "step_2" / "trainer_state.json").read_text())
    assert set(state["lr_scheduler"]["base_lrs"]) == {1e-3}  # this run's schedule, not the diverged one's
    results = run_main(run_args(data_dir, model_config, output, *sane, "--resume_from_checkpoint", "latest"))
    assert results["train_steps"] == 6 and math.isfinite(results["final_loss"])
    assert results["nonfinite_losses"] == 0  # the count restarts with the state of step_1


# ------------------------------------------------------------------------------------------------ one run per folder


def wait_for(condition: Callable[[], bool], seconds: float = 120.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_a_second_run_in_a_folder_in_use_is_refused_naming_the_first_then_takes_it_back_once_the_first_died(
    data_dir, model_config, tmp_path, caplog
) -> None:
    """Two runs on one output_dir both ran and exited 0, their checkpoints, exports and results mixed. Now the second
    stops in one line naming the first; once the first is killed (its lock left behind), the lock is taken back."""
    output = tmp_path / "run"
    flags = run_args(data_dir, model_config, output)
    endless = [*flags]
    endless[endless.index("--max_train_steps") + 1] = "100000"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(RUN_MAE), *endless], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env)
    lock = output / LOCK_NAME
    try:
        assert wait_for(lambda: lock.is_file() and Holder.from_text(lock.read_text()) is not None), "no lock taken"
        with pytest.raises(UsageError) as refused:
            run_main(flags)
    finally:
        first.kill()
        first.wait()
    assert re.fullmatch(
        rf"--output_dir {re.escape(str(output))} is in use by another run \(process {first.pid} on "
        rf"{re.escape(socket.gethostname())}, started [-\d: ]+, heartbeat \d+ s ago: .+/run_mae\.py .+\): wait for it "
        r"to end, or pass another --output_dir\. A lock whose run is gone is taken back: at once for a process of this "
        rf"host, after 300 s without heartbeat for another host's \({re.escape(str(lock))}\)",
        str(refused.value),
    )
    assert lock.is_file()  # left behind by the killed run
    assert run_main(flags)["train_steps"] == 6
    assert f"Took back the lock of {output} from a run that is gone (its process {first.pid} has ended)" in caplog.text
    assert not lock.exists()  # released at the end


def write_lock(folder: pathlib.Path, heartbeat_age: float, **holder: Any) -> pathlib.Path:
    """A lock file as another run writes it, its heartbeat `heartbeat_age` seconds old."""
    path = folder / LOCK_NAME
    path.write_text(json.dumps({**asdict(Holder.this_process()), "token": "theirs", **holder}))
    beat = time.time() - heartbeat_age
    os.utime(path, (beat, beat))
    return path


def test_another_hosts_lock_is_refused_while_its_heartbeat_is_fresh_and_taken_back_once_stale(
    tmp_path, caplog
) -> None:
    """Another machine's process cannot be looked up: its heartbeat, as old as the filesystem's clock says, decides."""
    write_lock(tmp_path, 10, host="node-7", pid=4242)
    with pytest.raises(UsageError, match=r"another run \(process 4242 on node-7, started .+, heartbeat 1\d s ago"):
        OutputDirLock(tmp_path).acquire()
    write_lock(tmp_path, STALE_AFTER_S + 60, host="node-7", pid=4242)
    lock = OutputDirLock(tmp_path)
    lock.acquire()
    assert re.search(r"Took back the lock of .+ from a run that is gone \(no heartbeat for 36\d s\): process 4242 on "
                     "node-7", caplog.text)
    assert Holder.from_text(lock.path.read_text()) == lock.holder
    lock.release()
    assert not lock.path.exists()


def test_a_requeued_slurm_job_takes_back_the_lock_of_its_earlier_run(tmp_path, monkeypatch, caplog) -> None:
    """A requeued job may start on another node at once, before the lock's heartbeat is stale: the same job id with a
    lower restart count is its own earlier run. The same run of the job (another of its steps) is refused."""
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(tmp_path, 5, host="node-7", pid=4242, slurm_job="1234", slurm_restarts=0)
    lock = OutputDirLock(tmp_path)
    lock.acquire()
    lock.release()
    assert "a run that is gone (an earlier run of this SLURM job 1234, requeued since)" in caplog.text
    write_lock(tmp_path, 5, host="node-7", pid=4242, slurm_job="1234", slurm_restarts=1)
    with pytest.raises(UsageError, match=r"\(process 4242 on node-7, SLURM job 1234, started "):
        OutputDirLock(tmp_path).acquire()


def test_the_heartbeat_keeps_the_lock_fresh_and_a_lock_written_meanwhile_is_never_taken(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(output_lock, "HEARTBEAT_S", 0.05)
    lock = OutputDirLock(tmp_path)
    lock.acquire()
    os.utime(lock.path, (time.time() - 1000, time.time() - 1000))
    assert wait_for(lambda: time.time() - lock.path.stat().st_mtime < 10, seconds=5)
    lock.release()
    # Two runs start at once on a stale lock: the first takes it back and writes its own, then the second, acting on
    # what it saw before, must put the first one's lock back instead of removing it.
    seen = write_lock(tmp_path, STALE_AFTER_S + 60, host="node-7", pid=1).read_text()
    write_lock(tmp_path, 0, host="node-8", pid=2)
    OutputDirLock(tmp_path)._take_back(seen, "no heartbeat", "process 1 on node-7")
    assert Holder.from_text((tmp_path / LOCK_NAME).read_text()).host == "node-8"
    assert [path.name for path in tmp_path.iterdir()] == [LOCK_NAME]


@pytest.mark.skipif(not can_mount_a_private_tmpfs(), reason="unshare -rm cannot mount a tmpfs here")
def test_a_read_only_output_dir_is_refused_at_start_up(data_dir, model_config, tmp_path) -> None:
    """It used to fail with an OSError traceback once the model and data were built (writing run_config.yaml)."""
    mount = tmp_path / "read-only"
    mount.mkdir()
    flags = run_args(data_dir, model_config, mount / "run")
    script = f"mount -t tmpfs -o ro tmpfs {mount} && exec {sys.executable} {RUN_MAE} {' '.join(flags)}"
    completed = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, check=False)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert completed.stderr.strip().splitlines()[-1] == (
        f"error: --output_dir {mount / 'run'} is not writable (OSError: [Errno 30] Read-only file system: "
        f"'{mount / 'run'}'): pass a folder you can write to"
    )
    assert "process(es) on" not in completed.stderr  # refused before the accelerator's first log, the model and data


# ------------------------------------------------------------------------------------------------------- preemption


def test_save_on_signal_is_on_by_default_under_slurm(monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert not RunArguments().saves_on_signal() and RunArguments(save_on_signal=True).saves_on_signal()
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert RunArguments().saves_on_signal() and not RunArguments(save_on_signal=False).saves_on_signal()


def test_sigterm_finishes_the_step_saves_it_and_the_resumed_run_is_the_uninterrupted_one(
    straight, data_dir, model_config, tmp_path, monkeypatch, capsys
) -> None:
    """SIGTERM in the middle of step 4 (sent from its logging): the step ends, step_4 is saved, the run exits 143 in
    one line; `--resume_from_checkpoint latest` then ends with the uninterrupted run's weights and history."""
    output = tmp_path / "run"
    after_step = pretraining.after_step

    def signalled_after_step_4(trainer: Any, progress: Any, loop: Any, lr: float) -> None:
        after_step(trainer, progress, loop, lr)
        if progress.completed_steps == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(pretraining, "after_step", signalled_after_step_4)
    handler = signal.getsignal(signal.SIGTERM)
    flags = run_args(data_dir, model_config, output, "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
    assert errors.run_main(run_main, [*flags, "--save_on_signal"]) == 128 + signal.SIGTERM == 143
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"stopped by SIGTERM at step 4, its checkpoint saved: {output / 'step_4'}; resume with: ")
    assert [path.name for path in list_checkpoints(output)] == ["step_3", "step_4"]
    assert signal.getsignal(signal.SIGTERM) is handler  # the process's own handler again
    monkeypatch.undo()
    assert run_main(flags)["train_steps"] == 6
    assert_same_weights(weights(output), weights(straight))
    assert (output / "log_history.json").read_text() == (straight / "log_history.json").read_text()


def test_fine_tuning_saves_on_sigterm_the_same_way(data_dir, model_config, tmp_path, monkeypatch, capsys) -> None:
    """The same mechanism in run_finetune.py: SIGTERM during step 3 (8 steps an epoch), step_3 saved, status 143, and
    the resumed run ends with the weights and per-epoch history of one never stopped."""

    def finetune(output: pathlib.Path, *extra: str) -> dict[str, Any]:
        try:
            return run_finetune.main(["--dataset_name", str(data_dir), "--model_config", str(model_config),
                                      "--output_dir", str(output), "--per_device_train_batch_size", "8",
                                      "--per_device_eval_batch_size", "8", "--max_train_steps", "5", *extra])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()

    straight = finetune(tmp_path / "straight")
    seed_micro_batch = finetuning.seed_micro_batch

    def signalled_in_step_3(loop: Any, progress: Any) -> None:
        seed_micro_batch(loop, progress)
        if progress.completed_steps == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(finetuning, "seed_micro_batch", signalled_in_step_3)
    output = tmp_path / "run"
    assert errors.run_main(lambda argv: finetune(output, *argv), ["--save_on_signal"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"stopped by SIGTERM at step 3, its checkpoint saved: {output / 'step_3'}; resume with: ")
    monkeypatch.undo()
    resumed = finetune(output, "--resume_from_checkpoint", "latest")
    assert_same_weights(weights(output), weights(tmp_path / "straight"))
    assert resumed["history"] == straight["history"]


# ---------------------------------------------------------------- what a refusal says (found by mutation testing)


def test_an_empty_or_cut_pickle_is_refused_with_the_errors_first_line(tmp_path) -> None:
    """An empty file: EOFError without a message; a torch archive cut in half: torch's one-line zip error."""
    empty, cut = tmp_path / "optimizer.bin", tmp_path / "scheduler.bin"
    empty.write_bytes(b"")
    torch.save({"step": torch.ones(3)}, cut)
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(UnusableFile) as refused:
        checkpoint_files.check_pickle(empty, allowed=[])
    assert str(refused.value) == f"{empty} cannot be loaded safely: EOFError: "
    with pytest.raises(UnusableFile) as refused:
        checkpoint_files.check_pickle(cut, allowed=[])
    assert str(refused.value).startswith(
        f"{cut} cannot be loaded safely: RuntimeError: PytorchStreamReader failed reading zip archive: ")


def test_a_registered_object_in_a_checkpoint_is_refused_saying_why(tmp_path) -> None:
    (tmp_path / "custom_checkpoint_0.pkl").write_bytes(b"")
    with pytest.raises(UnusableFile) as refused:
        check_checkpoint_files(tmp_path, allowed=[], model_weights=None)
    assert str(refused.value) == (
        f"{tmp_path / 'custom_checkpoint_0.pkl'} is an object that Accelerate unpickles with weights_only=False: our "
        "checkpoints never hold one (the learning-rate schedule is in trainer_state.json)")


def test_a_full_disk_is_told_by_errno_or_by_a_chained_error_and_other_errors_are_not(tmp_path) -> None:
    """This disk has space (more than FULL_DISK_FREE_BYTES free), so only the error itself can say it is full."""
    assert shutil.disk_usage(tmp_path).free > FULL_DISK_FREE_BYTES
    assert checkpoint_files.disk_is_full(OSError(errno.ENOSPC, "write failed"), tmp_path)
    assert checkpoint_files.disk_is_full(OSError(errno.EDQUOT, "write failed"), tmp_path)
    wrapped = RuntimeError("unexpected pos 1984 vs 1920")
    wrapped.__cause__ = OSError(errno.ENOSPC, "write failed")  # torch.save's writer, as `raise ... from`
    assert checkpoint_files.disk_is_full(wrapped, tmp_path)
    assert not checkpoint_files.disk_is_full(PermissionError(errno.EACCES, "Permission denied"), tmp_path)
    assert not checkpoint_files.disk_is_full(RuntimeError("unexpected pos 1984 vs 1920"), tmp_path)


@pytest.mark.skipif(not pathlib.Path("/proc/mounts").is_file() or shutil.which("df") is None, reason="Linux only")
def test_the_filesystem_of_a_path_is_the_device_and_mount_point_that_df_names(tmp_path, monkeypatch) -> None:
    for path in (tmp_path, pathlib.Path("/dev/shm"), pathlib.Path("/proc/self")):
        if path.exists():
            device, *_, mount = subprocess.run(["df", "-P", str(path)], capture_output=True, text=True,
                                               check=True).stdout.splitlines()[-1].split()
            assert checkpoint_files.filesystem_of(path) == f"{device} (mounted at {mount})"
    # A mount point that /proc/mounts does not list (e.g. in a container's chroot): the mount point alone.
    monkeypatch.setattr(os.path, "ismount", lambda path: pathlib.Path(path) == tmp_path)
    assert checkpoint_files.filesystem_of(tmp_path / "run") == str(tmp_path)


def test_deepspeed_checkpoints_may_also_build_the_classes_named_by_their_dotted_path(monkeypatch) -> None:
    """DeepSpeed is not installed here: two importable stand-ins for its class names, resolved as they are."""
    monkeypatch.setattr(checkpoint_files, "DEEPSPEED_GLOBALS", ("torch.nn.Linear", "collections.OrderedDict"))
    plain = checkpoint_files.allowed_globals(deepspeed=False)
    assert checkpoint_files.allowed_globals(deepspeed=True) == [*plain, torch.nn.Linear, collections.OrderedDict]



def test_the_resume_command_keeps_every_flag_but_the_checkpoint_to_resume(monkeypatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)  # one process: python, not accelerate launch
    argv = ["run_mae.py", "--output_dir", "my run", "--resume_from_checkpoint", "step_3", "--seed=3",
            "--resume-from-checkpoint=step_6"]
    assert resume_command(argv) == "python run_mae.py --output_dir 'my run' --seed=3 --resume_from_checkpoint latest"


def test_a_missing_process_file_names_the_previous_checkpoint_or_says_there_is_none(tmp_path) -> None:
    layout = BatchLayout(num_processes=1, per_device_batch_size=8, gradient_accumulation_steps=1, num_machines=2)
    for step in (2, 4):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "trainer_state.json").write_text("{}")
    with pytest.raises(UsageError) as missing:
        check_process_files(tmp_path / "step_4", layout)
    assert str(missing.value) == (
        f"{tmp_path / 'step_4' / 'process_state_0.json'} is missing: process 0 writes it into the checkpoint folder, so "
        "when processes run on several machines (this run: 2), output_dir must be on a filesystem that all of them "
        f"share; resume from the previous one with --resume_from_checkpoint {tmp_path / 'step_2'}")
    assert resume_elsewhere(tmp_path / "step_2") == (
        "no earlier checkpoint is in that folder: start again without --resume_from_checkpoint")



def test_a_trainer_state_value_fits_a_list_or_dict_field_only_when_it_is_one() -> None:
    """What `progress_from_state` checks each JSON value with: an empty string or mapping is no list, a string or a
    list no dict, whatever their items."""
    assert fits([1, 2], list[int]) and fits([], list[int]) and fits({"a": 1}, dict[str, int]) and fits({}, dict)
    for value, kind in (("", list[int]), ({}, list[int]), (3, list[int]), ("x", dict), ([], dict[str, int]),
                        ([1], dict)):
        assert not fits(value, kind), (value, kind)



def test_going_back_to_an_earlier_checkpoint_says_where_the_later_ones_went(tmp_path, caplog) -> None:
    for step in (2, 4, 6):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "trainer_state.json").write_text("{}")
    main_process = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    claim_output_dir(main_process, tmp_path, tmp_path / "step_2")
    assert sorted(path.name for path in (tmp_path / "superseded").iterdir()) == ["step_4", "step_6"]
    said = (f"Resumed from step_2: moved the later checkpoints of the run it went back on to {tmp_path / 'superseded'} "
            "(step_4, step_6); delete them once they are no longer needed")
    assert [record.getMessage() for record in caplog.records if record.levelname == "WARNING"] == [said]



def test_a_hub_datasets_identity_is_its_name_and_files_whatever_the_revision(monkeypatch) -> None:
    """Recorded by name, not as a path under the working directory; each file's URL without the revision (only the
    first @...: a folder may hold an @), and a fingerprint of the first 16 hex digits of their SHA-256."""
    files = ["hf://datasets/org/name@abc123/images@2x/train-0.parquet", "hf://datasets/org/name@abc123/train-1.parquet"]
    source = SimpleNamespace(config=SimpleNamespace(data_files={"train": files}))
    monkeypatch.setattr(run_identity, "load_source", lambda args: source)
    identity = run_identity.data_identity(DataArguments(dataset_name="org/name"), "train")
    entries = [["hf://datasets/org/name/images@2x/train-0.parquet", None], ["hf://datasets/org/name/train-1.parquet",
                                                                           None]]
    assert (identity[run_identity.DATA_LOCATION], identity["files"]) == ("org/name", 2)
    assert identity["fingerprint"] == hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def test_a_damaged_lock_file_is_refused_while_fresh_and_taken_back_once_stale(tmp_path, caplog) -> None:
    """A lock file that names no run (cut while written): a run writing it now, until its heartbeat goes stale."""
    path = tmp_path / LOCK_NAME
    path.write_text('{"host": "node-')
    with pytest.raises(UsageError, match=r"in use by another run \(a run starting at this moment\)"):
        OutputDirLock(tmp_path).acquire()
    beat = time.time() - STALE_AFTER_S - 60
    os.utime(path, (beat, beat))
    lock = OutputDirLock(tmp_path)
    lock.acquire()
    assert re.search(r"Took back the lock of .+ from a run that is gone \(no heartbeat for 36\d s\): unreadable",
                     caplog.text)
    lock.release()


def test_a_lock_released_without_being_taken_leaves_the_folder_alone(tmp_path) -> None:
    """A run that stopped before taking its lock (e.g. refused) releases it on the way out: nothing to do."""
    other = write_lock(tmp_path, 10, host="node-7", pid=4242)
    OutputDirLock(tmp_path).release()
    assert json.loads(other.read_text())["host"] == "node-7"


def test_the_lock_file_is_a_plain_readable_file(tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        lock = OutputDirLock(tmp_path)
        lock.acquire()
        assert stat.S_IMODE(lock.path.stat().st_mode) == 0o644  # not executable
        lock.release()
    finally:
        os.umask(previous)
