"""Checkpoints under faults, in one process: a poisoned pickle never runs, a resume with another batch layout is
refused, a damaged checkpoint is named with the one to use instead (and the run resumed from that one replaces it),
a full disk keeps the previous checkpoint, and a diverged run names a checkpoint it can really go on from. Each
failure is one `UsageError` line.

The multi-process cases (DeepSpeed shards, 2 -> 1 processes, a missing process file) are in test_distributed.py.
"""

from __future__ import annotations

import errno
import json
import math
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from conftest import tiny_config
from test_training import (
    RUN_MAE,
    assert_same_weights,
    export_model_on_a_full_disk,
    run_args,
    run_main,
    weights,
)

from modeling_mae.errors import UsageError
from modeling_mae.loops import pretraining_outputs
from modeling_mae.training import checkpoint_files
from modeling_mae.training.accelerator import machine_count
from modeling_mae.training.checkpoint_files import (
    FULL_DISK_FREE_BYTES,
    PICKLE_SUFFIXES,
    UnusableFile,
    check_checkpoint_files,
    check_rng_states,
)
from modeling_mae.training.checkpoints import list_checkpoints
from modeling_mae.training.progress import NonFiniteLossError

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


def test_a_fresh_run_refuses_a_folder_that_holds_another_runs_checkpoints(
    straight, data_dir, model_config, tmp_path
) -> None:
    """Starting over in a used output_dir would mix two runs' checkpoints (and `latest` would pick the old one)."""
    output = copy_run(straight, tmp_path)
    for resume in ((), ("--resume_from_checkpoint", str(straight / "step_3"))):  # none, or one from elsewhere
        with pytest.raises(UsageError, match="holds the checkpoints of another run \\(step_3, step_6\\): continue"):
            run_main(run_args(data_dir, model_config, output, *resume))
    assert [path.name for path in list_checkpoints(output)] == ["step_3", "step_6"]


def test_saving_the_step_a_run_resumed_from_keeps_that_checkpoint(data_dir, model_config, tmp_path) -> None:
    """A checkpoint at an epoch's last step, resumed with --checkpointing_steps epoch: the epoch ends at once and
    saves that same step. The folder already holds this run's state there: it is kept, not rewritten (rewriting it
    would leave it missing for a moment, and it may be the only checkpoint)."""
    output = tmp_path / "run"
    run_main(run_args(data_dir, model_config, output, "--checkpointing_steps", "8", "--max_train_steps", "8"))
    saved = (output / "step_8" / "trainer_state.json").read_text()
    results = run_main(run_args(data_dir, model_config, output, "--resume_from_checkpoint", "latest",
                                "--checkpointing_steps", "epoch", "--max_train_steps", "10"))
    assert results["train_steps"] == 10
    assert [path.name for path in list_checkpoints(output)] == ["step_8"]
    assert (output / "step_8" / "trainer_state.json").read_text() == saved


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
