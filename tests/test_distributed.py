"""`accelerate launch` with 2 CPU processes: DDP (gloo) matches one process, DeepSpeed ZeRO-2/3 train, checkpoint,
resume (and refuse a poisoned shard) and export a loadable model; 2 machines are counted, and a resume on another
number of processes or with a process's file missing stops in one line; SIGUSR1 to every process of the launch saves
one checkpoint in lockstep, from which the run resumes exactly. FSDP2 (which Accelerate runs on GPUs only)
with torch's `fully_shard` on 2 CPU processes, sharded as Accelerate shards it, gives the unsharded model's
gradients."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import tiny_config
from data_fixtures import make_parquet_shards
from test_checkpoint_faults import poison
from test_training import (
    REPO,
    RUN_MAE,
    assert_loadable,
    assert_same_weights,
    logged_learning_rates,
    paper_learning_rate,
    run_args,
    run_main,
    weights,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.multiprocessing import spawn

from modeling_mae import MAEForPreTraining
from modeling_mae.errors import UsageError
from modeling_mae.training.checkpoints import list_checkpoints

ACCELERATE = shutil.which("accelerate", path=str(pathlib.Path(sys.executable).parent)) or "accelerate"
LAUNCH_TIMEOUT_S = 300  # DeepSpeed's first CPU run also compiles its shared-memory collective op


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(launch_flags: list[str], script_flags: list[str], port: int | None = None) -> list[str]:
    """`accelerate launch` of run_mae.py on 2 processes (on one machine unless `launch_flags` say otherwise)."""
    return [
        ACCELERATE,
        "launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        *launch_flags,
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(port or free_port()),
        str(RUN_MAE),
        *script_flags,
    ]


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env},  # 1 thread per process, 2 cores
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(launched: subprocess.Popen[str], succeed: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = launched.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        launched.kill()
    completed = subprocess.CompletedProcess(launched.args, launched.returncode, stdout, stderr)
    assert (completed.returncode == 0) == succeed, completed.stdout[-2000:] + completed.stderr[-5000:]
    assert "2 process(es)" in completed.stderr
    return completed


def launch(
    launch_flags: list[str], script_flags: list[str], env: dict[str, str], succeed: bool = True
) -> subprocess.CompletedProcess[str]:
    return finished(start(launch_command(launch_flags, script_flags), env), succeed)


def test_two_ddp_processes_match_one_process_with_the_same_global_batch(data_dir, model_config, tmp_path) -> None:
    # mask_ratio=0: each process draws its own masks; with nothing masked the model sees every patch whatever the
    # noise, so both runs must agree up to float summation order. The single parquet shard is split sample by sample,
    # so the 2 x 4 images of a step are the 8 images of the single-process step. The 16 validation images in batches
    # of 3: 3, 3, 2 on each of 2 processes, 5 x 3 and 1 on one.
    common = ("--mask_ratio", "0", "--max_train_steps", "4", "--warmup_steps", "1", "--logging_steps", "1",
              "--per_device_eval_batch_size", "3")
    single = tmp_path / "one"
    single_results = run_main(run_args(data_dir, model_config, single, *common))
    double = tmp_path / "two"
    flags = run_args(data_dir, model_config, double, *common)
    flags[flags.index("--per_device_train_batch_size") + 1] = "4"
    launch(["--multi_gpu"], flags, {"ACCELERATE_USE_CPU": "true"})
    results = json.loads((double / "all_results.json").read_text())
    assert (results["num_processes"], results["train_steps"], results["train_samples"]) == (2, 4, 32)
    assert_same_weights(weights(double), weights(single), atol=1e-5)
    for name in ("train_loss", "final_loss", "eval_loss"):  # averaged over images, whatever the process
        assert results[name] == pytest.approx(single_results[name], rel=1e-5), name
    # The learning rate of an effective batch of 2 processes x 4 (the default base lr 1.5e-3), step by step.
    expected = [paper_learning_rate(step, 1.5e-3, 8, 1, 4) for step in range(4)]
    assert list(logged_learning_rates(double).values()) == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.fixture(scope="module")
def data_with_bad_images(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """64 train images of which records 2 (truncated) and 3 (not an image) are bad: 2 processes splitting the shard
    sample by sample each meet one of them in their first batches."""
    directory = tmp_path_factory.mktemp("bad_images")
    make_parquet_shards(directory, 64, num_shards=1, kinds={2: "truncated", 3: "garbage"})
    return directory


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_checkpoints_resumes_and_exports(
    stage, data_with_bad_images, model_config, tmp_path, hf_home
) -> None:
    pytest.importorskip("deepspeed")
    output = tmp_path / "run"
    launch_flags = ["--config_file", str(REPO / "configuration" / "accelerate" / f"deepspeed_zero{stage}.yaml")]
    env = {"DS_ACCELERATOR": "cpu"}
    flags = run_args(data_with_bad_images, model_config, output, "--max_train_steps", "3", "--checkpointing_steps",
                     "2", "--shuffle_buffer_size", "1")
    first = launch(launch_flags, flags, env)
    assert "DistributedType.DEEPSPEED" in first.stderr
    assert sorted(p.name for p in output.glob("step_*")) == ["step_2"]
    uninterrupted = weights(output)

    # Resume from the middle into the same folder: the last step again, to the same weights.
    resumed = launch(launch_flags, [*flags, "--resume_from_checkpoint", str(output / "step_2")], env)
    assert f"resumed from {output / 'step_2'}: step 2" in resumed.stderr
    results = json.loads((output / "all_results.json").read_text())
    assert (results["train_steps"], results["train_samples"], results["num_processes"]) == (3, 48, 2)
    assert results["skipped_images"] == 2  # one per process, summed, and kept across the resume
    assert_same_weights(weights(output), uninterrupted, atol=1e-6)
    assert_loadable(output, uninterrupted)

    # DeepSpeed's checkpoint engine unpickles its shards with weights_only=False: a poisoned one must not run.
    shard = output / "step_2" / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "the-payload-ran"
    poison(shard, marker, archive=True)
    refused = launch(launch_flags, [*flags, "--resume_from_checkpoint", str(output / "step_2")], env, succeed=False)
    assert f"error: {shard} cannot be loaded safely: it holds an object other than tensors" in refused.stderr
    assert not marker.exists()


def test_two_machines_then_one_process_then_a_lost_process_file(data_dir, model_config, tmp_path) -> None:
    """A 2-machine launch (two launchers on this host) logs 2 machines and records them. Resuming its checkpoint on 1
    process is refused in one line; on 2 processes with a process's state file missing (what a filesystem that the
    machines do not share leaves), the line says so, and torchrun's summary ends with it."""
    output = tmp_path / "run"
    flags = run_args(data_dir, model_config, output, "--per_device_train_batch_size", "4", "--max_train_steps", "2")
    flags += ["--checkpointing_steps", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    port = free_port()
    machines = [
        subprocess.Popen(
            launch_command(
                ["--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"],
                flags,
                port,
            ),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=LAUNCH_TIMEOUT_S) for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "2 process(es) on 2 machine(s)" in outputs[0][1]
    checkpoint = output / "step_2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["batch_layout"]["num_machines"] == 2

    with pytest.raises(UsageError, match=r"saved by 2 process\(es\) x 4 images .* this run has 1 process\(es\) x 4 "):
        run_main([*flags, "--resume_from_checkpoint", str(checkpoint)])

    (checkpoint / "process_state_1.json").unlink()
    refused = launch(["--multi_gpu"], [*flags, "--resume_from_checkpoint", str(checkpoint)], env, succeed=False)
    error = (
        f"error: {checkpoint / 'process_state_1.json'} is missing: process 1 writes it into the checkpoint folder, "
        "so when processes run on several machines (this run: 1), output_dir must be on a filesystem that all of "
        "them share"
    )
    assert f"[rank 0] {error}" in refused.stderr
    summary = refused.stderr[refused.stderr.index("Root Cause (first observed failure):") :]
    assert f"traceback : [rank 0] {error}" in summary or f"traceback : [rank 1] {error}" in summary


def test_sigusr1_to_a_two_process_run_saves_in_lockstep_and_the_resumed_run_is_the_uninterrupted_one(
    data_dir, model_config, tmp_path
) -> None:
    """SIGUSR1 to the launcher, which ignores it as the sbatch template makes it (`trap '' USR1`), and to training
    process 1 only (SLURM signals every process, each at a moment of its own): the processes agree at each step, so
    both finish the same step, save it, and exit with 128 + SIGUSR1; resuming `latest` ends with the weights of a
    2-process run never stopped. The learning rate is constant (min_lr = lr, no warmup), so that the 400-step schedule
    of the stopped run and the shorter runs' agree step by step."""

    def flags(max_train_steps: int, output: pathlib.Path, *extra: str) -> list[str]:
        flags = run_args(data_dir, model_config, output, "--per_device_train_batch_size", "4", "--logging_steps", "50",
                         "--learning_rate", "1e-3", "--min_lr", "1e-3", "--warmup_steps", "0", *extra)
        flags[flags.index("--max_train_steps") + 1] = str(max_train_steps)
        return flags

    output, env = tmp_path / "run", {"ACCELERATE_USE_CPU": "true"}
    command = launch_command(["--multi_gpu"], flags(400, output, "--checkpointing_steps", "2", "--save_on_signal"))
    launcher = start(["bash", "-c", 'trap "" USR1; exec "$@"', "bash", *command], env)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not list_checkpoints(output) and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until training runs: every handler is set by then
    children = psutil.Process(launcher.pid).children(recursive=True)
    rank_1 = [child for child in children if child.environ().get("RANK") == "1"]
    assert len(rank_1) == 1
    for process in [psutil.Process(launcher.pid), *rank_1]:
        process.send_signal(signal.SIGUSR1)
    stderr = finished(launcher, succeed=False).stderr
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+), its checkpoint saved: (\S+); resume with: ", stderr)
    assert stopped, stderr[-5000:]
    step = int(stopped[1])
    assert stopped[2] == str(output / f"step_{step}") == str(list_checkpoints(output)[-1])
    assert "exitcode  : 138" in stderr  # torchrun's summary: 128 + SIGUSR1, for each process
    assert {path.name for path in (output / f"step_{step}").glob("process_state_*.json")} == {
        "process_state_0.json", "process_state_1.json"}

    resumed = start(launch_command(["--multi_gpu"], flags(step + 3, output, "--resume_from_checkpoint", "latest")), env)
    straight = start(launch_command(["--multi_gpu"], flags(step + 3, tmp_path / "straight")), env)  # side by side
    assert f"resumed from {output / f'step_{step}'}: step {step}" in finished(resumed).stderr
    finished(straight)
    assert_same_weights(weights(output), weights(tmp_path / "straight"))


def shard_like_accelerate(model: MAEForPreTraining, layer_class: str) -> None:
    """The FSDP2 units of Accelerate 1.15's `fsdp2_prepare_model` with TRANSFORMER_BASED_WRAP: each `layer_class`
    block, the input embeddings, the base model's final norm (kept gathered after forward), then the root."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in list(model.modules()):
        if type(module).__name__ == layer_class:
            fully_shard(module, mesh=mesh)
    fully_shard(model.get_input_embeddings(), mesh=mesh)
    fully_shard(model.mae.layernorm, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)


def fsdp2_gradients_match(rank: int, world_size: int, init_file: str, layer_class: str) -> None:
    """One process of the FSDP2 check: every rank builds the same model and data, the reference gets the whole batch
    unsharded, the sharded model this rank's part; FSDP averages the gradients over ranks, as the loss over the whole
    batch does (every sample has the same number of masked patches)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        config = tiny_config()
        model = MAEForPreTraining(config).train()
        reference = MAEForPreTraining(config).train()
        reference.load_state_dict(model.state_dict())
        pixel_values = torch.randn(2 * world_size, 3, 16, 16)
        noise = torch.rand(2 * world_size, config.num_patches)
        reference(pixel_values, noise=noise, logits_to_keep="masked").loss.backward()
        shard_like_accelerate(model, layer_class)
        mine = slice(2 * rank, 2 * rank + 2)
        model(pixel_values[mine], noise=noise[mine], logits_to_keep="masked").loss.backward()  # as run_mae.py trains
        for (name, sharded), expected in zip(model.named_parameters(), reference.parameters()):
            if expected.grad is None:
                assert sharded.grad is None, name
            else:
                torch.testing.assert_close(sharded.grad.full_tensor(), expected.grad, atol=1e-6, rtol=1e-4, msg=name)
        dist.barrier()  # neither process tears gloo down while the other still uses it (an abort otherwise)
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_as_accelerate_does_gives_the_unsharded_gradients(tmp_path) -> None:
    """FSDP2 gathers a unit's weights in its forward pre-hook: a weight read outside its module's forward stays a
    sharded DTensor and the step fails (as the visible-only patch embedding once did on a GPU)."""
    accelerate_config = yaml.safe_load((REPO / "configuration" / "accelerate" / "fsdp.yaml").read_text())
    layer_class = accelerate_config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    spawn(fsdp2_gradients_match, args=(2, str(tmp_path / "init"), layer_class), nprocs=2)
