"""The pretraining recipe, its state handling and `run_scripts/run_mae.py`, in one process on tiny data.

Multi-process runs (DDP, DeepSpeed) are in test_distributed.py and reuse the helpers here.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import tiny_config
from data_fixtures import make_parquet_shards
from huggingface_hub.utils import filter_repo_objects
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch._dynamo.utils import counters as dynamo_counters
from transformers import AutoModel, AutoModelForPreTraining

from modeling_mae import MAEForPreTraining
from modeling_mae.arguments import (
    OptimizationArguments,
    PretrainModelArguments,
    RunArguments,
    load_yaml_config,
    parse_arguments,
)
from modeling_mae.data.sources import DataArguments
from modeling_mae.errors import UsageError
from modeling_mae.loops import pretraining, pretraining_outputs
from modeling_mae.training.accelerator import fill_deepspeed_config, iterate_in_lockstep
from modeling_mae.training.checkpoints import list_checkpoints, rotate_checkpoints
from modeling_mae.training.optimization import (
    WarmupCosineSchedule,
    build_optimizer,
    build_scheduler,
    plan_training,
    restore_scheduler,
)
from modeling_mae.training.progress import (
    LossWindow,
    NonFiniteLossError,
    NonFiniteLossGuard,
    TrainingProgress,
    loss_is_finite_everywhere,
    tracked,
)
from modeling_mae.training.resume import resolve_resume_checkpoint
from run_scripts import (
    run_mae,  # a package module, as the other scripts' tests import theirs
)

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN_MAE = REPO / "run_scripts" / "run_mae.py"
ARGUMENT_TYPES = (PretrainModelArguments, DataArguments, OptimizationArguments, RunArguments)
EXPORTED_FILES = {
    "README.md",
    "all_results.json",
    "config.json",
    "configuration_mae.py",
    "log_history.json",
    "modeling_mae.py",
    "model.safetensors",
    "preprocessor_config.json",
    "reconstruction.png",
    "run_config.yaml",
}


# ----------------------------------------------------------------------------------------------------------- helpers


def run_args(data: pathlib.Path, model_config: pathlib.Path, output_dir: pathlib.Path, *extra: str) -> list[str]:
    """Flags of a tiny run: 16x16 images, 2 layers of 32, batch 8, 6 steps."""
    return [
        "--dataset_name",
        str(data),
        "--model_config",
        str(model_config),
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--max_train_steps",
        "6",
        "--warmup_steps",
        "2",
        "--logging_steps",
        "2",
        "--shuffle_buffer_size",
        "16",
        "--seed",
        "0",
        *extra,
    ]


def run_main(argv: list[str]) -> dict[str, Any]:
    """`run_mae.main` in this process; Accelerate's singletons are reset so that the next run starts clean."""
    try:
        return run_mae.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def printed_paths(text: str) -> dict[str, str]:
    """The `  label: path` lines a script ends with."""
    return {label.strip(): path.strip() for label, path in
            (line.split(":", 1) for line in text.splitlines() if line.startswith("  "))}


def drop_flag(flags: list[str], name: str) -> list[str]:
    """`flags` without `name` and its value."""
    index = flags.index(name)
    return flags[:index] + flags[index + 2 :]


def paper_learning_rate(
    step: int, base_lr: float, effective_batch: int, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> float:
    """The learning rate the official code applies at optimizer step `step` (0-based), written out independently of
    `modeling_mae.training`: `blr * batch / 256`, linear warmup from 0, then half-cycle cosine to `min_lr`
    (facebookresearch/mae `util/lr_sched.adjust_learning_rate`, called before each step, in step units)."""
    peak = base_lr * effective_batch / 256
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def logged_learning_rates(output_dir: pathlib.Path) -> dict[int, float]:
    """`{step: learning rate}` of a run's `log_history.json`."""
    history = json.loads((output_dir / "log_history.json").read_text())["log_history"]
    return {entry["step"]: entry["learning_rate"] for entry in history}


def weights(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], atol=atol, rtol=0 if atol == 0 else 1e-4, msg=name)


def export_model_on_a_full_disk(*args: object) -> None:
    """`hub.export_model` on a disk that fills up: safetensors' own error."""
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def assert_loadable(folder: pathlib.Path, reference: dict[str, torch.Tensor]) -> None:
    """`AutoModel*.from_pretrained(trust_remote_code=True)` loads the folder with exactly these weights."""
    model = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "MAEForPreTraining"
    assert_same_weights({name: value for name, value in model.state_dict().items() if name in reference}, reference)
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(encoder).__name__ == "MAEModel"


# ----------------------------------------------------------------------------------------------- recipe building blocks


def test_param_groups_decay_only_matrices_and_apply_lr_scale() -> None:
    model = MAEForPreTraining(tiny_config())
    optimizer = build_optimizer(
        model,
        learning_rate=1e-3,
        weight_decay=0.05,
        lr_scale_fn=lambda name, _: 0.5 if name.startswith("decoder.") else 1.0,
    )
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            name = names[id(parameter)]
            decayed = parameter.ndim > 1 and not name.endswith(".bias")
            assert group["weight_decay"] == (0.05 if decayed else 0.0), name
            assert group["lr"] == pytest.approx(1e-3 * (0.5 if name.startswith("decoder.") else 1.0)), name
    grouped = sum(len(group["params"]) for group in optimizer.param_groups)
    assert grouped == sum(1 for p in model.parameters() if p.requires_grad)  # fixed sin-cos tables are left out


def test_warmup_cosine_schedule_and_its_state(caplog: pytest.LogCaptureFixture) -> None:
    schedule = WarmupCosineSchedule(warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    assert [schedule(step) for step in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert schedule(8) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert schedule(12) == pytest.approx(0.1) and schedule(50) == pytest.approx(0.1)

    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([parameter], lr=2.0)
    scheduler = build_scheduler(optimizer, warmup_steps=4, total_steps=12, peak_lr=2.0, min_lr=0.2)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(2.0 * schedule(6))
    saved = json.loads(json.dumps(scheduler.state_dict()))  # as trainer_state.json keeps it

    def restored(peak_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
        optimizer = torch.optim.AdamW([parameter], lr=peak_lr)
        fresh = build_scheduler(optimizer, warmup_steps=4, total_steps=12, peak_lr=peak_lr, min_lr=0.1 * peak_lr)
        restore_scheduler(fresh, saved)
        fresh.optimizer.step()
        fresh.step()
        return fresh

    same = restored(2.0)  # the same flags: the uninterrupted run's lr, step after step
    assert (same.last_epoch, same.get_last_lr()[0]) == (7, pytest.approx(2.0 * schedule(7)))
    assert not caplog.records
    lower = restored(0.5)  # a lower --learning_rate on resume (e.g. after a divergence) takes effect at once
    assert lower.get_last_lr()[0] == pytest.approx(0.5 * schedule(7))
    assert lower.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * schedule(7))
    assert "(then: peak lr 2, min_lr_ratio 0.1, total_steps 12, warmup_steps 4; now: peak lr 0.5," in caplog.text


def test_plan_training_from_epochs_or_steps() -> None:
    plan = plan_training(batches_per_epoch=10, gradient_accumulation_steps=3, num_train_epochs=2.5, warmup_epochs=1)
    assert (plan.steps_per_epoch, plan.total_steps, plan.num_epochs, plan.warmup_steps) == (3, 8, 3, 3)
    plan = plan_training(10, 1, num_train_epochs=100, max_train_steps=7, warmup_steps=20)
    assert (plan.total_steps, plan.warmup_steps) == (7, 7)
    with pytest.raises(ValueError, match="max_train_steps"):
        plan_training(None, 1, num_train_epochs=1)
    plan = plan_training(None, 1, num_train_epochs=1, max_train_steps=10, warmup_epochs=0)  # a stream of unknown length
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (None, 10, 0)
    with pytest.raises(ValueError, match="set --warmup_steps instead of --warmup_epochs"):
        plan_training(None, 1, num_train_epochs=1, max_train_steps=10, warmup_epochs=0.5)
    with pytest.raises(ValueError, match="shorter than one optimizer step"):
        plan_training(2, 4, num_train_epochs=1)


def test_nonfinite_guard_counts_and_stops_after_a_streak() -> None:
    guard = NonFiniteLossGuard(max_consecutive=3)
    for step, finite in enumerate((True, False, False, True, False, False)):
        guard.update(finite, step)
        assert not guard.diverged
    guard.update(False, 6)
    assert guard.diverged and guard.total == 5
    assert guard.streak_start_step == 4  # where the streak of the last three began


def test_loss_window_averages_micro_batches_then_steps() -> None:
    class OneProcess:
        num_processes, device = 1, torch.device("cpu")

    window, progress = LossWindow(), TrainingProgress()
    for micro_batches in ([1.0, 3.0], [4.0, 4.0]):
        for loss in micro_batches:
            window.add_micro_batch(loss)
        window.end_step()
    window.add_micro_batch(100.0)
    window.discard_step()  # a skipped step leaves no trace
    assert window.flush(OneProcess(), progress) == 3.0
    assert (progress.loss_steps, progress.train_loss) == (2, 3.0)


class TwoProcesses:
    """The collectives of process 0 of 2 whose peer holds `peer` (what `reduce(..., "sum")` adds from it)."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, peer: Any) -> None:
        self.peer = peer

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return tensor + (self.peer(tensor) if callable(self.peer) else self.peer)


def test_loss_window_averages_over_processes() -> None:
    """Process 0 logged steps of mean loss 1 and 3, process 1 (the peer) 5 and 7: the logged loss is the mean of all;
    the next window (2 here, 4 there) adds to the run's statistics."""
    window, progress = LossWindow(), TrainingProgress()
    for loss in (1.0, 3.0):
        window.add_micro_batch(loss)
        window.end_step()
    assert window.flush(TwoProcesses(torch.tensor([12.0, 2.0], dtype=torch.float64)), progress) == 4.0
    assert (progress.loss_steps, progress.loss_sum, progress.train_loss) == (2, 8.0, 4.0)
    window.add_micro_batch(2.0)
    window.end_step()
    assert window.flush(TwoProcesses(torch.tensor([4.0, 1.0], dtype=torch.float64)), progress) == 3.0
    assert (progress.loss_steps, progress.loss_sum, progress.train_loss) == (3, 11.0, pytest.approx(11 / 3))


def test_evaluation_batches_go_in_lockstep_until_every_process_is_done() -> None:
    """This process has 2 batches, its peer 4: the last one is repeated (not to be counted) while the peer finishes,
    and a finite loss here with a non-finite one there is non-finite everywhere."""
    peer_batches = iter([1.0, 1.0, 1.0, 1.0, 0.0])
    lockstep = iterate_in_lockstep(TwoProcesses(lambda _: torch.tensor([next(peer_batches)])), [{"b": 0}, {"b": 1}])
    assert list(lockstep) == [({"b": 0}, True), ({"b": 1}, True), ({"b": 1}, False), ({"b": 1}, False)]
    with pytest.raises(RuntimeError, match="this process has no evaluation batch at all"):
        list(iterate_in_lockstep(TwoProcesses(torch.tensor([1.0])), []))
    assert not loss_is_finite_everywhere(TwoProcesses(torch.tensor([1.0])), torch.tensor(0.5))
    assert loss_is_finite_everywhere(TwoProcesses(torch.tensor([0.0])), torch.tensor(0.5))


@pytest.mark.parametrize("eval_batch_size", [16, 8, 5])  # one batch, an exact multiple, an uneven last batch of 1
def test_the_validation_loss_is_the_mean_over_images_whatever_the_eval_batch(eval_batch_size: int) -> None:
    """`validation_loss` of 16 images is the loss of one forward over all 16 with the same masks (the run's seed
    draws them in order, whatever the batches): every image has as many masked patches, so that loss is the mean over
    images. A mean of batch means is off with an uneven last batch."""
    model = MAEForPreTraining(tiny_config())
    images = torch.randn(16, 3, 16, 16)
    trainer = SimpleNamespace(
        model=model, config=model.config, args=SimpleNamespace(run=SimpleNamespace(seed=3)),
        accelerator=SimpleNamespace(num_processes=1, device=torch.device("cpu")),
        eval_loader=[{"pixel_values": images[start : start + eval_batch_size]} for start in range(0, 16, eval_batch_size)],
    )
    noise = torch.rand(16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.eval()(images, noise=noise).loss.item()
    model.train()
    assert pretraining_outputs.validation_loss(trainer) == pytest.approx(expected, rel=1e-6)
    assert model.training  # back to training


def test_deepspeed_auto_values_are_filled_without_clipping() -> None:
    """The JSON's "auto" micro-batch and clipping become the run's batch and --max_grad_norm (0: no clipping, the
    paper's), values set in the JSON stay."""

    def filled(config: dict[str, Any], max_grad_norm: float | None) -> dict[str, Any]:
        plugin = SimpleNamespace(deepspeed_config=dict(config))
        fill_deepspeed_config(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)), 8, max_grad_norm)
        return plugin.deepspeed_config

    auto = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}
    assert filled(auto, None) == {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0}
    assert filled(auto, 1.5) == {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.5}
    fixed = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 2.0}
    assert filled(fixed, 1.5) == fixed
    fill_deepspeed_config(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), 8, None)  # not DeepSpeed


def test_the_oldest_checkpoints_are_deleted_beyond_the_limit(tmp_path: pathlib.Path) -> None:
    for name in ("step_2", "step_10", "step_4", ".step_12.incomplete"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
    rotate_checkpoints(tmp_path, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_12.incomplete", "step_10", "step_4"]


def test_only_complete_checkpoints_are_resumed(tmp_path: pathlib.Path) -> None:
    for name in ("step_2", "step_10", "step_12", ".step_14.incomplete"):
        (tmp_path / name).mkdir()
    for name in ("step_2", "step_10"):
        (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / ".step_14.incomplete" / "trainer_state.json").write_text("{}")  # crashed before its rename
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_10"]
    assert resolve_resume_checkpoint("latest", tmp_path).name == "step_10"
    assert resolve_resume_checkpoint("latest", tmp_path / "nothing-yet") is None
    with pytest.raises(UsageError, match="step_12: not a complete checkpoint"):
        resolve_resume_checkpoint(str(tmp_path / "step_12"), tmp_path)


# ------------------------------------------------------------------------------------------------------------ arguments


def test_yaml_config_with_command_line_overrides(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("base_learning_rate: 1.5e-4\nnum_train_epochs: 800\nnorm_pix_loss: true\nmask_ratio: 0.6\n")
    model, data, optim, run = parse_arguments(
        ARGUMENT_TYPES, ["--config", str(config), "--num_train_epochs", "3", "--dataset_name", "x", "--seed", "7"]
    )
    assert (optim.base_learning_rate, optim.num_train_epochs, model.norm_pix_loss, model.mask_ratio) == (
        1.5e-4,
        3,
        True,
        0.6,
    )
    assert (data.dataset_name, run.seed, optim.weight_decay) == ("x", 7, 0.05)  # untouched fields keep the defaults
    config.write_text("base_learing_rate: 1.0\n")
    with pytest.raises(ValueError, match="base_learing_rate"):
        parse_arguments(ARGUMENT_TYPES, ["--config", str(config)])


@pytest.mark.parametrize(
    "preset, model_config, epochs",
    [
        ("mae_vit_base_800ep", "base", 800),
        ("mae_vit_large_1600ep", "large", 1600),
        ("mae_vit_huge_1600ep", "huge", 1600),
    ],
)
def test_paper_presets(preset: str, model_config: str, epochs: int) -> None:
    path = REPO / "configuration" / "pretrain" / f"{preset}.yaml"
    model, _, optim, run = parse_arguments(ARGUMENT_TYPES, ["--config", str(path)])
    assert (model.model_config, model.mask_ratio, model.norm_pix_loss) == (model_config, 0.75, True)
    assert (optim.base_learning_rate, optim.weight_decay, optim.num_train_epochs, optim.warmup_epochs) == (
        1.5e-4,
        0.05,
        epochs,
        40,
    )
    assert (optim.adam_beta1, optim.adam_beta2) == (0.9, 0.95)
    assert optim.per_device_train_batch_size * optim.gradient_accumulation_steps * 8 == 4096  # on 8 GPUs
    assert run.resume_from_checkpoint == "latest"
    assert optim.torch_compile  # 1.23x on an H200 for ViT-L/16 (docs/benchmarks.md)
    assert set(load_yaml_config(path)) <= {f for cls in ARGUMENT_TYPES for f in cls.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------------------- end to end


def test_end_to_end_exports_a_loadable_model(data_dir, model_config, tmp_path, hf_home, capsys) -> None:
    output = tmp_path / "run"
    results = run_main(
        run_args(
            data_dir,
            model_config,
            output,
            "--with_tracking",
            "--log_images_steps",
            "3",
            "--eval_steps",
            "3",
            "--norm_pix_loss",
            "true",
        )
    )
    for key in (
        "train_loss",
        "train_steps",
        "train_samples",
        "skipped_images",
        "train_runtime",
        "train_samples_per_second",
    ):
        assert key in results
    assert (results["train_steps"], results["train_samples"], results["skipped_images"]) == (6, 48, 0)
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])
    assert json.loads((output / "all_results.json").read_text()) == results
    printed = capsys.readouterr().out
    assert re.search(r"^Done: 6 steps, final loss \d\.\d{4}$", printed, re.MULTILINE)
    assert printed_paths(printed) == {  # where everything went, whatever the working directory
        "model": str(output.resolve()), "reconstruction": str((output / "reconstruction.png").resolve()),
        "results": str((output / "all_results.json").resolve())}
    assert EXPORTED_FILES | {"reconstruction_step3.png", "reconstruction_step6.png"} <= {
        p.name for p in output.iterdir()
    }
    config = json.loads((output / "config.json").read_text())
    assert config["norm_pix_loss"] is True and "AutoModelForPreTraining" in config["auto_map"]
    card = (output / "README.md").read_text()
    for fact in ("| dataset | local data |", "6 of 6", "0.75", "final_loss", f"{results['final_loss']:.4g}",
                 "(0.9, 0.95)"):
        assert fact in card
    assert "--dataset_name" not in card and str(data_dir) not in card  # the card is uploaded: no local path
    assert "hub_token" not in (output / "run_config.yaml").read_text()
    assert list((output / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs"
    assert_loadable(output, weights(output))


def test_the_applied_learning_rate_is_the_papers_schedule(data_dir, model_config, tmp_path, monkeypatch) -> None:
    """Every optimizer step of a real run applies `blr * effective batch / 256` with linear warmup then half-cycle
    cosine: read at AdamW's own `step` and in `log_history.json`. Accumulation 2, so a scheduler stepped per
    micro-batch, twice per step or once too early shows."""
    applied: list[list[float]] = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        applied.append([group["lr"] for group in self.param_groups])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    output = tmp_path / "run"
    flags = drop_flag(drop_flag(run_args(data_dir, model_config, output), "--max_train_steps"), "--warmup_steps")
    run_main([
        *flags, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--num_train_epochs", "1",
        "--warmup_epochs", "0.25", "--base_learning_rate", "0.016", "--min_lr", "1e-5", "--logging_steps", "1",
    ])
    # 64 images / (4 x 2 accumulated) = 8 optimizer steps of 8 images; warmup 0.25 epoch = 2 steps.
    expected = [paper_learning_rate(step, 0.016, 8, 2, 8, min_lr=1e-5) for step in range(8)]
    assert expected[2] == pytest.approx(5e-4)  # the peak: 0.016 x 8 / 256
    assert len(applied) == 8
    for step, group_lrs in enumerate(applied):
        assert group_lrs == pytest.approx([expected[step]] * len(group_lrs), rel=1e-9, abs=1e-15), step
    logged = logged_learning_rates(output)
    assert list(logged) == list(range(1, 9))  # optimizer steps, counted from 1 as the trackers log them
    assert list(logged.values()) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    card = (output / "README.md").read_text()  # the records say the same: batch 4 x 2 accumulated
    assert "| effective batch | 8 |" in card and "| learning rate | 0.0005 (base 0.016 x 8 / 256) |" in card


def test_bad_images_are_skipped_and_counted_in_the_results(model_config, tmp_path) -> None:
    """A truncated and an undecodable image among 64: one epoch of 8 batches of 8 reads every record once in file
    order (no shuffle), skips and counts the 2 bad ones, and fills its last batch from the start of a second pass."""
    data = tmp_path / "data"
    make_parquet_shards(data, 64, num_shards=1, kinds={20: "truncated", 63: "garbage"})
    results = run_main(run_args(data, model_config, tmp_path / "run", "--shuffle_buffer_size", "1",
                                "--max_train_steps", "8"))
    assert (results["skipped_images"], results["train_samples"], results["train_epochs"]) == (2, 64, 1.0)


def test_each_process_draws_its_own_masks_and_the_same_again_on_resume() -> None:
    """`pretraining.mask_noise`: the noise of a micro-batch depends on the process (the official code seeds with seed +
    rank, so processes mask differently), the epoch and the micro-batch, and on nothing else."""

    def noise(process_index: int, epoch: int, micro_batch: int, seed: int = 0) -> torch.Tensor:
        trainer = SimpleNamespace(
            accelerator=SimpleNamespace(process_index=process_index, device=torch.device("cpu")),
            args=SimpleNamespace(run=SimpleNamespace(seed=seed)),
            config=tiny_config(),
        )
        return pretraining.mask_noise(trainer, TrainingProgress(epoch=epoch, epoch_micro_batches=micro_batch), 4)

    first = noise(0, 0, 0)
    assert first.shape == (4, 16)
    for other in (noise(1, 0, 0), noise(0, 1, 0), noise(0, 0, 1), noise(0, 0, 0, seed=1)):
        assert not torch.equal(first, other)
    torch.rand(100)  # the global RNG plays no part
    assert torch.equal(noise(0, 0, 0), first)


def test_start_from_pretrained_weights(model_config, data_dir, tmp_path, hf_home) -> None:
    pretrained = tmp_path / "pretrained"
    MAEForPreTraining(tiny_config(norm_pix_loss=True)).save_pretrained(pretrained)
    output = tmp_path / "run"
    results = run_main(
        run_args(
            data_dir,
            model_config,
            output,
            "--model_config",
            str(pretrained),
            "--model_name_or_path",
            str(pretrained),
            "--max_train_steps",
            "0",
        )
    )
    assert results["train_steps"] == 0
    assert json.loads((output / "config.json").read_text())["norm_pix_loss"] is True
    assert_same_weights(weights(output), weights(pretrained))


def test_checkpoint_and_resume_continue_exactly(data_dir, model_config, tmp_path) -> None:
    straight = tmp_path / "straight"
    run_main(run_args(data_dir, model_config, straight, "--checkpointing_steps", "3"))
    assert [p.name for p in list_checkpoints(straight)] == ["step_3", "step_6"]
    state = json.loads((straight / "step_3" / "trainer_state.json").read_text())
    position = json.loads((straight / "step_3" / "process_state_0.json").read_text())["train_loader"]
    assert (state["completed_steps"], state["epoch"], state["epoch_micro_batches"]) == (3, 0, 3)
    assert (position["epoch"], position["batches"]) == (0, 3)

    resumed = tmp_path / "resumed"
    results = run_main(
        run_args(
            data_dir,
            model_config,
            resumed,
            "--resume_from_checkpoint",
            str(straight / "step_3"),
            "--checkpointing_steps",
            "3",
            "--checkpoints_total_limit",
            "1",
        )
    )
    assert (results["train_steps"], results["train_samples"]) == (6, 48)  # counted from the start of the run
    assert [p.name for p in list_checkpoints(resumed)] == ["step_6"]
    assert_same_weights(weights(resumed), weights(straight))  # same data order, masks and schedule
    assert results["train_loss"] == pytest.approx(json.loads((straight / "all_results.json").read_text())["train_loss"])


def test_torch_compile_trains_like_eager_and_exports_plain_weights(tmp_path) -> None:
    """`--torch_compile` (the GPU presets' setting) compiles the model in place: the run matches the eager one up to
    inductor's reordering of float sums, and the export keeps the plain model's parameter names. Inductor's compiling
    is most of the test's time, so the case is small: one encoder block, 2 steps, and no validation split (the
    training step and the figure's forward are compiled, not a validation forward too)."""
    data, model_config = tmp_path / "data", tmp_path / "model"
    make_parquet_shards(data, 16, num_shards=1)
    tiny_config(num_hidden_layers=1).save_pretrained(model_config)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    graphs = dynamo_counters["stats"]["unique_graphs"]
    run_main(run_args(data, model_config, eager, "--max_train_steps", "2"))
    assert dynamo_counters["stats"]["unique_graphs"] == graphs
    run_main(run_args(data, model_config, compiled, "--max_train_steps", "2", "--torch_compile"))
    assert dynamo_counters["stats"]["unique_graphs"] > graphs  # it did run compiled
    assert_same_weights(weights(compiled), weights(eager), atol=1e-4)


def test_epoch_checkpoints_with_gradient_accumulation(data_dir, model_config, tmp_path) -> None:
    # 64 images / 8 = 8 batches per epoch = 2 steps of 3 micro-batches (the trailing 2 are dropped).
    output = tmp_path / "run"
    results = run_main(
        run_args(
            data_dir,
            model_config,
            output,
            "--gradient_accumulation_steps",
            "3",
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "epoch",
        )
    )
    assert [p.name for p in list_checkpoints(output)] == ["step_2", "step_4"]
    state = json.loads((output / "step_2" / "trainer_state.json").read_text())
    assert (state["epoch"], state["epoch_micro_batches"], state["train_samples"]) == (1, 0, 48)
    assert (results["train_steps"], results["train_samples"]) == (4, 96)


def test_nonfinite_losses_are_skipped_then_stop_the_run(data_dir, model_config, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(MAEForPreTraining, "forward_loss", lambda self, pixels, logits, mask: logits.sum() * math.nan)
    output = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="3 consecutive .* from step 0 on: .* No checkpoint was saved before"):
        run_main(
            run_args(data_dir, model_config, output, "--max_consecutive_nonfinite", "3", "--checkpointing_steps", "1")
        )
    assert list_checkpoints(output) == []  # the diverged weights are not saved: they would diverge again


class FakeHfApi:
    """Stands in for `huggingface_hub.HfApi`: uploads copy the files upload_folder would send into `remote/`; the
    first `failures` uploads raise, as a dropped connection does."""

    remote: ClassVar[pathlib.Path]
    calls: ClassVar[list[dict[str, Any]]] = []
    failures: ClassVar[int] = 0

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False) -> Any:
        self.calls.append({"call": "create_repo", "repo_id": repo_id, "private": private})
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id: str, folder_path: str, commit_message: str, ignore_patterns: list[str]) -> None:
        background = threading.current_thread() is not threading.main_thread()
        self.calls.append({"call": "upload_folder", "message": commit_message, "background": background})
        if FakeHfApi.failures > 0:
            FakeHfApi.failures -= 1
            raise ConnectionError("Connection reset by peer")
        folder = pathlib.Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        selected = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        for name in selected:
            (self.remote / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, self.remote / name)
        self.calls[-1]["files"] = selected


def test_sigkill_then_resume_latest(data_dir, model_config, tmp_path) -> None:
    """A run killed with SIGKILL and started again with the same command ends with the weights of a run never
    interrupted. The learning rate is constant (min_lr = lr, no warmup), so that the killed run's 400-step schedule
    and the shorter runs' schedules agree step by step."""
    output = tmp_path / "run"

    def flags(max_train_steps: int, output_dir: pathlib.Path) -> list[str]:
        flags = run_args(data_dir, model_config, output_dir, "--logging_steps", "50", "--learning_rate", "1e-3",
                         "--min_lr", "1e-3", "--warmup_steps", "0")
        flags[flags.index("--max_train_steps") + 1] = str(max_train_steps)
        return flags

    def command(max_train_steps: int) -> list[str]:
        resume = ["--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"]
        return [sys.executable, str(RUN_MAE), *flags(max_train_steps, output), *resume]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command(400), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list_checkpoints(output)) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert len(list_checkpoints(output)) >= 2, "no checkpoint written before the kill"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (output / "all_results.json").exists()
    last = list_checkpoints(output)[-1]  # a save cut short by the kill stays a hidden staging folder
    step = int(last.name.split("_")[1])

    completed = subprocess.run(command(step + 4), env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"resumed from {last}: step {step}" in completed.stderr
    results = json.loads((output / "all_results.json").read_text())
    assert (results["train_steps"], results["train_samples"]) == (step + 4, (step + 4) * 8)
    state = json.loads((output / f"step_{step + 4}" / "trainer_state.json").read_text())
    assert state["epoch"] * 8 + state["epoch_micro_batches"] == step + 4  # 8 batches per epoch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the killed runs: the same float summation order
    try:
        straight = run_main(flags(step + 4, tmp_path / "straight"))
    finally:
        torch.set_num_threads(threads)
    assert_same_weights(weights(output), weights(tmp_path / "straight"))
    assert results["train_loss"] == pytest.approx(straight["train_loss"])


# --------------------------------------------------------- progress and rotation messages (found by mutation testing)


def test_tracked_counts_each_item_against_its_length_or_the_given_total(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In a log (no terminal): the total is the items' length, or the one given; a disabled bar says nothing."""
    monkeypatch.setattr("modeling_mae.training.progress.is_terminal", lambda: False)
    caplog.set_level("INFO", logger="modeling_mae.training.progress")
    assert list(tracked([5, 6, 7], "k-NN", unit="chunk")) == [5, 6, 7]
    assert caplog.records[-1].getMessage().startswith("k-NN: 3/3 chunk (100%), ")
    assert list(tracked([1, 2], "features", unit="batch", total=4)) == [1, 2]  # e.g. this process's share of 4
    assert caplog.records[-1].getMessage().startswith("features: 2/4 batch (50%), ")
    caplog.clear()
    assert list(tracked([1, 2], "quiet", enabled=False)) == [1, 2]  # every process but the main one
    assert not caplog.records


def test_rotation_removes_the_link_of_a_linked_checkpoint_and_says_its_target_stays(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="modeling_mae.training.checkpoints")
    target, output = tmp_path / "elsewhere" / "step_2", tmp_path / "run"
    for folder in (target, output / "step_4"):
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
    (output / "step_2").symlink_to(target)
    rotate_checkpoints(output, total_limit=1)
    assert [path.name for path in output.iterdir()] == ["step_4"] and target.is_dir()
    assert f"Removing the link of old checkpoint {output / 'step_2'} (its target {target} stays)" in [
        record.getMessage() for record in caplog.records]


def test_an_epoch_shorter_than_one_step_says_both_lengths() -> None:
    with pytest.raises(ValueError) as refused:
        plan_training(2, 4, num_train_epochs=1)
    assert str(refused.value) == ("an epoch of 2 batches is shorter than one optimizer step of 4 micro-batches: lower "
                                  "the batch size or the accumulation")
