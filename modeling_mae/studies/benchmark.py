"""The measuring kit of the benchmark (`run_scripts/benchmark.py`), also used by the GPU check: the models compared,
their FLOPs, and timing.

- models: transformers' `ViTMAEForPreTraining` with our shapes, and the mask-token baseline of the asymmetric section
  (the encoder on all patches, removed ones replaced by a mask token, as SimMIM/BEiT);
- FLOPs: of the official training step, and the card's bf16 peak for the model FLOPs utilisation;
- timing: a training step, variants timed in alternation, the memory of a step, where a step's time goes (profile),
  and the speedups read from the timings.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from ..configuration_mae import MAEConfig
from ..modeling_mae import (
    MAEForPreTraining,
    gather_tokens,
    loss_patch_index,
    random_masking,
)

# Dense bf16 peak of the card (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
# Kinds of GPU kernels in a profile, by a pattern of the kernel's name; first match wins, the rest is "other".
# Attention comes first: cuDNN's attention kernels carry "wgmma" in their names too.
KERNEL_KINDS = (("attention", r"flash|fmha|attention|sdpa"), ("matmul", r"gemm|gemv|xmma|nvjet|cutlass|wgmma"),
                ("optimizer", r"adam"), ("compiled element-wise", r"^triton"))
Results = dict[str, Any]
Step = Callable[[], None]


# ---------------------------------------------------------------------------------------------------- models


def vitmae_config(config: MAEConfig) -> ViTMAEConfig:
    """transformers' ViTMAE with exactly our shapes (it takes square images and patches only)."""
    return ViTMAEConfig(
        image_size=config.image_size[0], patch_size=config.patch_size[0], num_channels=config.num_channels,
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        decoder_hidden_size=config.decoder_hidden_size, decoder_num_hidden_layers=config.decoder_num_hidden_layers,
        decoder_num_attention_heads=config.decoder_num_attention_heads,
        decoder_intermediate_size=config.decoder_intermediate_size, hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps, qkv_bias=config.qkv_bias, mask_ratio=config.mask_ratio,
        norm_pix_loss=config.norm_pix_loss,
    )


def build_models(size: str, attn: str, device: torch.device) -> tuple[MAEConfig, nn.Module, nn.Module]:
    config = MAEConfig.from_preset(size)
    with device:  # initialise on the device: ViT-H's 630M parameters take long to initialise on a CPU
        ours = MAEForPreTraining._from_config(config, attn_implementation=attn).train()
        reference = ViTMAEForPreTraining._from_config(vitmae_config(config), attn_implementation=attn).train()
    return config, ours, reference


def encode_all_patches(model: MAEForPreTraining, mask_token: torch.Tensor, pixel_values: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder on all L patches, removed ones replaced by `mask_token` (+ position): `(B, 1 + L, D)`, mask."""
    embeddings = model.mae.embeddings
    tokens = embeddings(pixel_values.to(mask_token.dtype))  # (B, 1 + L, D): CLS, then patches with positions
    _, mask, _ = random_masking(tokens[:, 1:], model.config.mask_ratio)
    masked = mask_token + embeddings.position_embeddings[:, 1:]  # the token still carries its position
    patch_tokens = torch.where(mask.unsqueeze(-1).bool(), masked, tokens[:, 1:])
    hidden_states = model.mae.encoder(torch.cat([tokens[:, :1], patch_tokens], dim=1))
    return model.mae.layernorm(hidden_states), mask


def mask_token_loss(model: MAEForPreTraining, mask_token: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pretraining loss of the symmetric baseline: the decoder gets the encoder's L tokens (no mask tokens left)."""
    latent, mask = encode_all_patches(model, mask_token, pixel_values)
    decoder = model.decoder
    tokens = decoder.decoder_embed(latent) + decoder.position_embeddings  # (B, 1 + L, D_dec)
    tokens = decoder.transformer(tokens)
    logits = decoder.pred(decoder.norm(tokens[:, 1:]))  # (B, L, p * q * C), as MAEDecoder without logits_to_keep
    patch_index = loss_patch_index(mask, num_masked=int(mask[0].sum()))  # (B, L - L_vis)
    return model.forward_loss(pixel_values.to(logits.dtype), gather_tokens(logits, patch_index), patch_index)


# ---------------------------------------------------------------------------------------------------- FLOPs


def transformer_flops(tokens: int, width: int, mlp: int, layers: int) -> float:
    """Forward FLOPs of pre-norm blocks: qkv + proj + MLP matmuls (2 m n k) and attention's QK^T and AV."""
    return layers * (2 * tokens * width * (4 * width + 2 * mlp) + 4 * tokens * tokens * width)


def pretraining_flops(config: MAEConfig, batch_size: int, visible_only: bool = True) -> float:
    """FLOPs of the official training step (3x forward): patch embedding of all patches, encoder on 1 + L_vis tokens
    (1 + L for the mask-token baseline), decoder and head on 1 + L. Every model's MFU is counted against this same
    work; our training step skips some of it (visible-only embedding, masked-only last block and head)."""
    patches = config.num_patches
    patch_dim = config.patch_size[0] * config.patch_size[1] * config.num_channels
    encoder_tokens = 1 + (int(patches * (1 - config.mask_ratio)) if visible_only else patches)
    forward = (
        2 * patches * patch_dim * config.hidden_size
        + transformer_flops(encoder_tokens, config.hidden_size, config.intermediate_size, config.num_hidden_layers)
        + 2 * encoder_tokens * config.hidden_size * config.decoder_hidden_size
        + transformer_flops(1 + patches, config.decoder_hidden_size, config.decoder_intermediate_size,
                            config.decoder_num_hidden_layers)
        + 2 * (1 + patches) * config.decoder_hidden_size * patch_dim
    )
    return 3.0 * batch_size * forward


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(loss_fn: Callable[[torch.Tensor], torch.Tensor], parameters: list[nn.Parameter],
                    pixel_values: torch.Tensor | Callable[[], torch.Tensor], autocast_dtype: torch.dtype | None,
                    with_optimizer: bool = True) -> Step:
    """One forward + backward (+ AdamW) step; the same fused AdamW for every model compared. `pixel_values`: the batch
    of every step, or a function that returns the next one (a data loader's)."""
    optimizer = torch.optim.AdamW(parameters, lr=1.5e-4, weight_decay=0.05, fused=True) if with_optimizer else None
    next_batch = pixel_values if callable(pixel_values) else lambda: pixel_values
    device_type = parameters[0].device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = loss_fn(next_batch())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            for parameter in parameters:
                parameter.grad = None

    return step


def time_alternating(steps: dict[str, Step], iterations: int, warmup: int, steps_per_sample: int,
                     device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per step, `iterations` samples per variant. Variants take turns sample by
    sample, the order reversed every round, so load from elsewhere on the machine hits all of them alike. The CPU
    time (all threads) is what a step costs when other processes steal the cores: the robust measure on a shared
    machine."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in steps}
    names = list(steps)
    for round_index in range(iterations):
        for name in names if round_index % 2 == 0 else names[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps_per_sample):
                steps[name]()
            synchronize(device)
            times[name]["wall"].append((time.perf_counter() - wall) / steps_per_sample)
            times[name]["cpu"].append((time.process_time() - cpu) / steps_per_sample)
    return times


def step_memory_mib(step: Step, loss_fn: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor,
                    autocast_dtype: torch.dtype | None, parameters: list[nn.Parameter]) -> tuple[str, float]:
    """GPU: peak allocated during one step above what was allocated before it (activations, gradients, temporaries).
    CPU (no allocator statistics): bytes of the activations autograd saves for the backward, parameters excluded."""
    device = pixel_values.device
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return "peak step memory", (torch.cuda.max_memory_allocated(device) - before) / 2**20
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(pixel_values)
    loss.backward()
    for parameter in parameters:
        parameter.grad = None
    return "saved activations", sum(saved.values()) / 2**20


def kernel_time_shares(events: Any) -> dict[str, float]:
    """Share of the GPU kernel time per kind of kernel (KERNEL_KINDS), from a profile's `key_averages()`."""
    shares = dict.fromkeys([kind for kind, _ in KERNEL_KINDS] + ["other"], 0.0)
    for event in events:
        # GPU-side ranges of user annotations (`Optimizer.step#AdamW.step`) span kernels already counted
        if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            kind = next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, event.key, re.I)), "other")
            shares[kind] += event.self_device_time_total
    total = sum(shares.values()) or 1.0
    return {kind: time / total for kind, time in shares.items()}


def profile_step(step: Step, device: torch.device, steps: int = 3) -> tuple[str, dict[str, float]]:
    """Where a step's time goes, over `steps` steps: a table of the ops (CPU) or kernels (GPU) by self time and, on a
    GPU, the share of kernel time per kind of kernel."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    events = profiler.key_averages()
    shares = kernel_time_shares(events) if device.type == "cuda" else {}
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    summary = "".join(f"{kind}: {share:.1%}\n" for kind, share in shares.items())
    return summary + events.table(sort_by=sort_by, row_limit=30), shares


def summarise(times: dict[str, dict[str, list[float]]], batch_size: int, flops: dict[str, float],
              peak: float | None) -> Results:
    variants = {}
    for name, samples in times.items():
        median = statistics.median(samples["wall"])
        variants[name] = {
            "median_step_s": median,
            "images_per_s": batch_size / median,
            "median_cpu_s": statistics.median(samples["cpu"]),
            "samples_s": samples["wall"],
            "tflops_per_s": flops[name] / median / 1e12,
            "mfu": flops[name] / median / peak if peak else None,
        }
    return variants


def ratio(times: dict[str, dict[str, list[float]]], slow: str, fast: str) -> dict[str, float]:
    """Speedup of `fast` over `slow`: ratio of wall-clock medians, median of the per-round ratios (robust to drift)
    and ratio of CPU-time medians (robust to other processes)."""
    paired = [s / f for s, f in zip(times[slow]["wall"], times[fast]["wall"])]
    return {"of_medians": statistics.median(times[slow]["wall"]) / statistics.median(times[fast]["wall"]),
            "paired_median": statistics.median(paired),
            "cpu_time": statistics.median(times[slow]["cpu"]) / statistics.median(times[fast]["cpu"])}
