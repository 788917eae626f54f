"""`accelerate launch` with 2 CPU processes: DDP (gloo) matches one process, DeepSpeed ZeRO-2/3 train, checkpoint,
resume and export a loadable model."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest
from test_training import (
    REPO,
    RUN_MAE,
    assert_loadable,
    assert_same_weights,
    run_args,
    run_main,
    weights,
)

ACCELERATE = shutil.which("accelerate", path=str(pathlib.Path(sys.executable).parent)) or "accelerate"
LAUNCH_TIMEOUT_S = 300  # DeepSpeed's first CPU run also compiles its shared-memory collective op


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launch_flags: list[str], script_flags: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [
        ACCELERATE,
        "launch",
        *launch_flags,
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        str(RUN_MAE),
        *script_flags,
    ]
    completed = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-5000:]
    assert "2 process(es)" in completed.stderr
    return completed


def test_two_ddp_processes_match_one_process_with_the_same_global_batch(data_dir, model_config, tmp_path) -> None:
    # mask_ratio=0: each process draws its own masks; with nothing masked the model sees every patch whatever the
    # noise, so both runs must agree up to float summation order. The single parquet shard is split sample by sample,
    # so the 2 x 4 images of a step are the 8 images of the single-process step.
    common = ("--mask_ratio", "0", "--max_train_steps", "4", "--warmup_steps", "1")
    single = tmp_path / "one"
    run_main(run_args(data_dir, model_config, single, *common))
    double = tmp_path / "two"
    flags = run_args(data_dir, model_config, double, *common)
    flags[flags.index("--per_device_train_batch_size") + 1] = "4"
    launch(["--multi_gpu"], flags, {"ACCELERATE_USE_CPU": "true"})
    results = json.loads((double / "all_results.json").read_text())
    assert (results["num_processes"], results["train_steps"], results["train_samples"]) == (2, 4, 32)
    assert_same_weights(weights(double), weights(single), atol=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_checkpoints_resumes_and_exports(
    stage, data_dir, model_config, tmp_path, hf_home
) -> None:
    pytest.importorskip("deepspeed")
    output = tmp_path / "run"
    launch_flags = ["--config_file", str(REPO / "configuration" / "accelerate" / f"deepspeed_zero{stage}.yaml")]
    env = {"DS_ACCELERATOR": "cpu"}
    flags = run_args(data_dir, model_config, output, "--max_train_steps", "4", "--checkpointing_steps", "2")
    first = launch(launch_flags, flags, env)
    assert "DistributedType.DEEPSPEED" in first.stderr
    assert sorted(p.name for p in output.glob("step_*")) == ["step_2", "step_4"]
    uninterrupted = weights(output)

    # Resume from the middle into the same folder: the last two steps again, to the same weights.
    resumed = launch(launch_flags, [*flags, "--resume_from_checkpoint", str(output / "step_2")], env)
    assert f"resumed from {output / 'step_2'}: step 2" in resumed.stderr
    results = json.loads((output / "all_results.json").read_text())
    assert (results["train_steps"], results["train_samples"], results["num_processes"]) == (4, 64, 2)
    assert_same_weights(weights(output), uninterrupted, atol=1e-6)
    assert_loadable(output, uninterrupted)
