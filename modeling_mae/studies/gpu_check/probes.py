"""The GPU check's engine worker, child side (under `accelerate launch`): run_mae.py's training between two probes
(the loss of a fixed batch with fixed masks, a function of the weights alone), then the export reloaded as a user
loads it and probed in the engine's precision; and the bf16-sized errors of the tolerance's control run."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable
from typing import Any

import torch

from ...loops import pretraining_setup
from ...training.checkpoints import list_checkpoints
from .config import Results, write_json
from .summary import BF16_UNIT_ROUNDOFF

PROBE_SEED = 1234  # the masking noise of the fixed probe batch


@torch.no_grad()
def probe_loss(model: torch.nn.Module, pixel_values: torch.Tensor, noise: torch.Tensor) -> float:
    """The training loss (masked patches only) of a fixed batch with fixed masks: a function of the weights alone."""
    return model(pixel_values, noise=noise, logits_to_keep="masked").loss.float().item()


def engine_precision(trainer: Any) -> tuple[torch.dtype, bool]:
    """(dtype the engine computes with its weights in, whether it autocasts): fp32 weights under bf16 autocast on one
    device or DDP, bf16 weights under DeepSpeed, fp32 shards cast to the policy's dtype under FSDP2 (+ autocast)."""
    accelerator = trainer.accelerator
    plugin = getattr(accelerator.state, "fsdp_plugin", None)  # the state raises AttributeError when it has none
    policy = getattr(plugin, "mixed_precision_policy", None)
    dtype = getattr(policy, "param_dtype", None) or next(trainer.unwrapped.parameters()).dtype
    return dtype, bool(accelerator.native_amp)


def probe_batch(trainer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's fixed figure batch (validation images, eval transform) and masking noise from PROBE_SEED."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    noise = torch.rand(trainer.figure_batch.shape[0], trainer.config.num_patches, generator=generator)
    device = trainer.accelerator.device
    return trainer.figure_batch.to(device), noise.to(device)


def export_probe(output_dir: pathlib.Path, pixel_values: torch.Tensor, noise: torch.Tensor, dtype: torch.dtype,
                 autocast: bool) -> float:
    """The probe loss of the exported folder, loaded as a user loads it, computed in the engine's precision."""
    from transformers import AutoModelForPreTraining
    from transformers.integrations import unset_hf_deepspeed_config

    # Accelerate registers its ZeRO-3 config with transformers, which then builds every model partitioned
    # (deepspeed.zero.Init). The run is over: load the export as a user does, in a plain process.
    unset_hf_deepspeed_config()
    model = AutoModelForPreTraining.from_pretrained(output_dir, trust_remote_code=True)
    model.to(device=pixel_values.device, dtype=dtype)
    with torch.autocast(pixel_values.device.type, dtype=torch.bfloat16, enabled=autocast):
        return probe_loss(model, pixel_values, noise)


def add_rounding_noise_to_each_step(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Errors as large as bf16's in every step, for the tolerance's control run: before each optimizer step, each
    gradient gets uniform noise of 2^-8 x its tensor's RMS (a sum rounded to bf16 is off by about 2^-8 of the size of
    its terms, whatever its own size, so small gradients can change sign); after it, each weight is multiplied by
    (1 + 2^-8 r), r uniform in [-1, 1] (the error of rounding it to bf16)."""
    generator = torch.Generator(device).manual_seed(PROBE_SEED)
    weights = [weight for group in optimizer.param_groups for weight in group["params"]]

    def uniform(tensor: torch.Tensor) -> torch.Tensor:
        return 2 * torch.rand(tensor.shape, generator=generator, device=device, dtype=tensor.dtype) - 1

    @torch.no_grad()
    def perturb_gradients(*_: Any) -> None:
        for weight in weights:
            if weight.grad is not None:
                rms = weight.grad.float().square().mean().sqrt()
                weight.grad.add_(uniform(weight.grad) * (BF16_UNIT_ROUNDOFF * rms).to(weight.grad.dtype))

    @torch.no_grad()
    def perturb_weights(*_: Any) -> None:
        for weight in weights:
            weight.mul_(1 + BF16_UNIT_ROUNDOFF * uniform(weight))

    optimizer.register_step_pre_hook(perturb_gradients)
    optimizer.register_step_post_hook(perturb_weights)


def run_between_probes(main: Callable[[list[str]], Any], record_path: pathlib.Path, run_argv: list[str],
                       rounding_noise: bool = False) -> None:
    """run_mae.py's `main`, passed in by the check's engine role (the package imports no script), with a probe before
    and after the training loop (`pretraining_setup.train`, wrapped for the run), then the export reloaded and probed.
    `rounding_noise`: the tolerance's control run (add_rounding_noise_to_each_step)."""
    record: Results = {}
    seen: dict[str, Any] = {}
    original_train = pretraining_setup.train

    def train_between_probes(trainer: Any, progress: Any) -> Any:
        seen["trainer"], seen["batch"] = trainer, probe_batch(trainer)
        dtype, autocast = engine_precision(trainer)
        record.update(distributed_type=str(trainer.accelerator.distributed_type), compute_dtype=str(dtype),
                      autocast=autocast, device=str(trainer.accelerator.device),
                      start_step=progress.completed_steps, probe_start=probe_loss(trainer.model, *seen["batch"]))
        if rounding_noise:
            # the torch optimizer inside Accelerate's wrapper: its step hooks run whoever calls step
            add_rounding_noise_to_each_step(trainer.optimizer.optimizer, trainer.accelerator.device)
        started, samples = time.perf_counter(), progress.train_samples
        progress = original_train(trainer, progress)
        record.update(train_seconds=time.perf_counter() - started, end_step=progress.completed_steps,
                      images_per_s=(progress.train_samples - samples) / (time.perf_counter() - started),
                      probe_end=probe_loss(trainer.model, *seen["batch"]))
        return progress

    pretraining_setup.train = train_between_probes
    try:
        record["results"] = main(run_argv)
    finally:
        pretraining_setup.train = original_train
    trainer = seen["trainer"]
    if trainer.accelerator.is_main_process:
        record["checkpoints"] = [path.name for path in list_checkpoints(trainer.output_dir)]
        record["probe_export"] = export_probe(trainer.output_dir, *seen["batch"], *engine_precision(trainer))
        write_json(record_path, record)
