"""Speed of the MAE implementation, measured side by side in one run (issue 6).

Sections (each one guarded: a failure is recorded and the others still run; the JSON is rewritten after each):
- train: a training step (forward + backward + AdamW) of `MAEForPreTraining` against transformers'
  `ViTMAEForPreTraining` with the same shapes, dtype, attention backend and optimizer, steps alternating between
  the models; median images/s, the ratio, the memory of a step and, on a GPU, the model FLOPs utilisation.
- asymmetric: the same encoder fed the visible patches only (MAE) against fed all patches with mask tokens in
  place of the removed ones (the SimMIM/BEiT-style baseline of the paper's Table 2), whole step and encoder alone.
- attention: the SDPA kernels (cuDNN, flash, memory-efficient, math) alone at the models' attention shapes.
- data: decode + RandomResizedCrop + flip + normalise on one core, plain PIL + torchvision against the fast paths.

    python run_scripts/benchmark.py --device cpu --sizes tiny,small              # a few minutes on 2 cores
    python run_scripts/benchmark.py --device cuda --sizes base,large,huge --output_dir $OUT

Writes `benchmark.json` and `benchmark.md` to `--output_dir` (default `outputs/benchmark`); with `--profile`, also
a profile of each timed training step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

# Spinning OpenMP threads wait for siblings that another process has descheduled: on a shared CPU that turns a
# 0.2 s step into seconds, at random. Sleeping waits cost little on an idle machine. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_mae import MAEConfig, MAEForPreTraining
from modeling_mae.modeling_mae import gather_tokens, loss_patch_index, random_masking
from modeling_mae.data.synthetic import natural_jpegs

# Dense bf16 peak of the card (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
# GPU batch per preset when --batch_size is not given: ViT-H's activations at 256 leave an 80 GB card too little
# room for both models (each with AdamW state).
GPU_BATCH_SIZE = {"huge": 128}
GPU_DEFAULT_BATCH_SIZE = 256
# The mask-token baseline keeps 4x the encoder activations: ViT-H at 128 would not fit an 80 GB card.
GPU_ASYMMETRIC_BATCH_SIZE = {"huge": 64}
# Kinds of GPU kernels in a profile, by a pattern of the kernel's name; first match wins, the rest is "other".
# Attention comes first: cuDNN's attention kernels carry "wgmma" in their names too.
KERNEL_KINDS = (("attention", r"flash|fmha|attention|sdpa"), ("matmul", r"gemm|gemv|xmma|nvjet|cutlass|wgmma"),
                ("optimizer", r"adam"), ("compiled element-wise", r"^triton"))
# The SDPA kernels timed by the attention section.
ATTENTION_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH)
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


# ---------------------------------------------------------------------------------------------------- sections


def batch_size_for(size: str, args: argparse.Namespace) -> int:
    if args.batch_size:
        return args.batch_size
    return GPU_BATCH_SIZE.get(size, GPU_DEFAULT_BATCH_SIZE) if args.device.startswith("cuda") else 16


def bench_train(size: str, attn: str, args: argparse.Namespace, device: torch.device) -> Results:
    config, ours, reference = build_models(size, attn, device)
    batch_size = batch_size_for(size, args)
    pixel_values = torch.randn(batch_size, config.num_channels, *config.image_size, device=device)
    loss_fns: dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]] = {
        "transformers": (reference, lambda x: reference(x).loss),
        "ours": (ours, lambda x: ours(x, logits_to_keep="masked").loss),  # as run_mae.py trains
    }
    if args.compile and size in args.compile_sizes:
        compiled = torch.compile(ours, mode=args.compile_mode)
        loss_fns["ours+compile"] = (ours, lambda x: compiled(x, logits_to_keep="masked").loss)
    steps = {name: make_train_step(fn, list(model.parameters()), pixel_values, args.autocast_dtype)
             for name, (model, fn) in loss_fns.items()}
    times = time_alternating(steps, args.iterations, args.warmup, args.steps_per_sample, device)
    flops = pretraining_flops(config, batch_size)
    variants = summarise(times, batch_size, {name: flops for name in steps}, peak_flops(device))
    for name, (model, fn) in loss_fns.items():
        kind, mib = step_memory_mib(steps[name], fn, pixel_values, args.autocast_dtype, list(model.parameters()))
        variants[name]["memory_mib"], variants[name]["memory_kind"] = mib, kind
        if args.profile:
            table, variants[name]["kernel_time_shares"] = profile_step(steps[name], device)
            (pathlib.Path(args.output_dir) / f"profile_{size}_{attn}_{name}.txt").write_text(table)
    return {"size": size, "attn": attn, "batch_size": batch_size, "dtype": args.dtype_name,
            "compile_mode": args.compile_mode or "default", "train_step_flops": flops, "variants": variants,
            "speedup": {name: ratio(times, "transformers", name) for name in steps if name != "transformers"}}


def bench_asymmetric(size: str, args: argparse.Namespace, device: torch.device) -> Results:
    config = MAEConfig.from_preset(size)
    with device:
        model = MAEForPreTraining._from_config(config, attn_implementation=args.attn[0]).train()
        mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))  # the baseline's only extra weight
    batch_size = args.asymmetric_batch_size or (
        GPU_ASYMMETRIC_BATCH_SIZE.get(size) if args.device.startswith("cuda") and not args.batch_size else None
    ) or batch_size_for(size, args)
    pixel_values = torch.randn(batch_size, config.num_channels, *config.image_size, device=device)
    parameters = list(model.parameters())
    ratio_of_mask = config.mask_ratio
    full_steps = {
        "visible_only": make_train_step(lambda x: model(x).loss, parameters, pixel_values, args.autocast_dtype),
        "mask_tokens": make_train_step(lambda x: mask_token_loss(model, mask_token, x), parameters + [mask_token],
                                       pixel_values, args.autocast_dtype),
    }
    encoder_params = list(model.mae.parameters())
    encoder_steps = {  # forward + backward of the encoder alone: where the asymmetry acts
        "visible_only": make_train_step(
            lambda x: model.mae(x, mask_ratio=ratio_of_mask).last_hidden_state.float().square().mean(),
            encoder_params, pixel_values, args.autocast_dtype, with_optimizer=False),
        "mask_tokens": make_train_step(
            lambda x: encode_all_patches(model, mask_token, x)[0].float().square().mean(),
            encoder_params + [mask_token], pixel_values, args.autocast_dtype, with_optimizer=False),
    }
    iterations = max(3, args.iterations // 2)
    step_times = time_alternating(full_steps, iterations, args.warmup, args.steps_per_sample, device)
    encoder_times = time_alternating(encoder_steps, iterations, args.warmup, args.steps_per_sample, device)
    flops = {"visible_only": pretraining_flops(config, batch_size),
             "mask_tokens": pretraining_flops(config, batch_size, visible_only=False)}
    return {
        "size": size, "attn": args.attn[0], "batch_size": batch_size, "dtype": args.dtype_name,
        "step": summarise(step_times, batch_size, flops, peak_flops(device)),
        "encoder_images_per_s": {name: batch_size / statistics.median(t["wall"]) for name, t in encoder_times.items()},
        "speedup_step": ratio(step_times, "mask_tokens", "visible_only"),
        "speedup_encoder": ratio(encoder_times, "mask_tokens", "visible_only"),
        "flops_ratio_step": flops["mask_tokens"] / flops["visible_only"],
    }


def attention_shapes(config: MAEConfig, batch_size: int) -> dict[str, tuple[int, int, int, int]]:
    """(batch, heads, tokens, head dim) of the encoder's attention (1 + visible patches) and the decoder's (1 + L)."""
    visible = int(config.num_patches * (1 - config.mask_ratio))
    return {
        "encoder": (batch_size, config.num_attention_heads, 1 + visible,
                    config.hidden_size // config.num_attention_heads),
        "decoder": (batch_size, config.decoder_num_attention_heads, 1 + config.num_patches,
                    config.decoder_hidden_size // config.decoder_num_attention_heads),
    }


def time_attention(shape: tuple[int, int, int, int], backend: SDPBackend, dtype: torch.dtype, iterations: int,
                   device: torch.device) -> float | None:
    """Median seconds of one forward + backward of scaled_dot_product_attention on `backend`; None if unsupported."""
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)

    def step() -> None:
        with sdpa_kernel(backend):
            torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)

    try:
        step()
    except RuntimeError:  # "No available kernel": the backend does not take this shape, dtype or device
        return None
    return statistics.median(time_alternating({"attention": step}, iterations, 2, 5, device)["attention"]["wall"])


def bench_attention(size: str, args: argparse.Namespace, device: torch.device) -> Results:
    """The attention kernels alone at the model's shapes: which SDPA backend is fastest for MAE's short sequences."""
    config = MAEConfig.from_preset(size)
    dtype = args.autocast_dtype or torch.float32
    results: Results = {"size": size, "dtype": str(dtype), "backends": {}}
    for part, shape in attention_shapes(config, batch_size_for(size, args)).items():
        flops = 3 * 4 * shape[0] * shape[1] * shape[2] ** 2 * shape[3]  # QK^T and AV, backward = 2 x forward
        seconds = {backend.name: time_attention(shape, backend, dtype, args.iterations, device)
                   for backend in ATTENTION_BACKENDS}
        results["backends"][part] = {"shape": shape, "ms": {b: t * 1e3 for b, t in seconds.items() if t},
                                     "tflops_per_s": {b: flops / t / 1e12 for b, t in seconds.items() if t}}
    return results


def sdpa_priority(names: list[str] | None) -> contextlib.AbstractContextManager:
    """SDPA backends tried in this order (e.g. `flash_attention,efficient_attention`); torch's own order if None."""
    if not names:
        return contextlib.nullcontext()
    known = {backend.name.lower(): backend for backend in ATTENTION_BACKENDS}
    if unknown := set(names) - set(known):
        raise ValueError(f"unknown SDPA backends {sorted(unknown)}: choose from {sorted(known)}")
    return sdpa_kernel([known[name] for name in names], set_priority=True)


def data_paths(image_size: int) -> dict[str, Callable[[bytes], torch.Tensor]]:
    """bytes -> normalised (3, H, W) crop: the plain path and the project's fast ones (imported lazily: the data
    module is not needed by the model sections)."""
    from torchvision.transforms import v2

    from modeling_mae.data.fast_decode import FastPretrainTransform

    plain = v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    paths = {"plain PIL + torchvision": lambda data: plain(Image.open(io.BytesIO(data)).convert("RGB"))}
    try:
        from modeling_mae.data.transforms import decode_image, pretrain_transform

        transform = pretrain_transform(image_size)
        min_side = transform.min_source_side
        paths["transforms.decode_image(min_side)"] = lambda data: transform(decode_image(data, min_side))
    except ImportError:  # the data module's API moved: measure the rest
        pass
    paths["fast_decode.FastPretrainTransform"] = FastPretrainTransform(image_size, seed=0)
    return paths


def bench_data(args: argparse.Namespace) -> list[Results]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per worker: a DataLoader worker owns one core
    try:
        results = []
        for spec in args.jpeg_sizes:
            width, height = (int(v) for v in spec.split("x"))
            images = natural_jpegs(args.data_images, width, height)
            paths = data_paths(224)
            times: dict[str, list[float]] = {name: [] for name in paths}
            for round_index in range(args.data_rounds + 1):
                for name in paths if round_index % 2 == 0 else list(paths)[::-1]:
                    start = time.perf_counter()
                    for data in images:
                        paths[name](data)
                    if round_index:  # round 0 warms caches
                        times[name].append((time.perf_counter() - start) / len(images))
            plain = statistics.median(times["plain PIL + torchvision"])
            results.append({
                "jpeg": spec, "mean_kb": sum(map(len, images)) / len(images) / 1e3,
                "images_per_s": {name: 1 / statistics.median(t) for name, t in times.items()},
                "speedup": {name: plain / statistics.median(t) for name, t in times.items()},
            })
        return results
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------- reports


def speedup_text(speedup: dict[str, float], cpu: bool) -> str:
    """`1.12x` (ratio of wall-clock medians), then the paired median and, on a CPU, the CPU-time ratio."""
    extra = f"paired {speedup['paired_median']:.2f}x" + (f", CPU time {speedup['cpu_time']:.2f}x" if cpu else "")
    return f"**{speedup['of_medians']:.2f}x** ({extra})"


def markdown(results: Results) -> str:
    meta = results["meta"]
    cpu = meta["device_name"].startswith("CPU")
    lines = [f"# MAE benchmark: {meta['device_name']}", "",
             f"{meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}; {meta['dtype']}; "
             f"threads {meta['threads']}; SDPA backends: {meta['sdpa_backends']}; "
             f"load average at start {meta['loadavg']}.", ""]
    if results["train"]:
        lines += ["## Training step (forward + backward + fused AdamW), ours vs transformers' ViTMAE", "",
                  "| model | attention | batch | transformers img/s | ours img/s | speedup | "
                  "ours+compile img/s | speedup | step memory, transformers / ours (MiB) | "
                  "MFU transformers / ours / ours+compile |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["train"]:
            v, s = r["variants"], r["speedup"]
            compiled = v.get("ours+compile")
            mfu = " / ".join(f"{v[n]['mfu']:.1%}" if n in v and v[n]["mfu"] else "-"
                             for n in ("transformers", "ours", "ours+compile"))
            lines.append(
                f"| {r['size']} | {r['attn']} | {r['batch_size']} | {v['transformers']['images_per_s']:.1f} | "
                f"{v['ours']['images_per_s']:.1f} | {speedup_text(s['ours'], cpu)} | "
                + (f"{compiled['images_per_s']:.1f} | {speedup_text(s['ours+compile'], cpu)} | "
                   if compiled else "- | - | ")
                + f"{v['transformers']['memory_mib']:.0f} / {v['ours']['memory_mib']:.0f} "
                  f"({v['ours']['memory_kind']}) | {mfu} |")
        lines.append("")
    shares = [(r, name, v["kernel_time_shares"]) for r in results["train"] for name, v in r["variants"].items()
              if v.get("kernel_time_shares")]
    if shares:
        kinds = list(shares[0][2])
        lines += ["## Where the GPU time goes: share of kernel time per kind of kernel (`--profile`)", "",
                  "| model | attention | variant | " + " | ".join(kinds) + " |", "|---" * (3 + len(kinds)) + "|"]
        lines += [f"| {r['size']} | {r['attn']} | {name} | " + " | ".join(f"{share[k]:.1%}" for k in kinds) + " |"
                  for r, name, share in shares]
        lines.append("")
    if results["attention"]:
        lines += ["## Attention kernels alone: forward + backward at the model's shapes (ms; TFLOP/s)", "",
                  "| model | part | (batch, heads, tokens, head dim) | "
                  + " | ".join(b.name.lower() for b in ATTENTION_BACKENDS) + " |",
                  "|---" * (3 + len(ATTENTION_BACKENDS)) + "|"]
        for r in results["attention"]:
            for part, b in r["backends"].items():
                cells = [f"{b['ms'][n]:.2f}; {b['tflops_per_s'][n]:.3g}" if n in b["ms"] else "-"
                         for n in (backend.name for backend in ATTENTION_BACKENDS)]
                lines.append(f"| {r['size']} | {part} | {tuple(b['shape'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if results["asymmetric"]:
        lines += ["## Asymmetric design: encoder on visible patches only vs on all patches with mask tokens", "",
                  "| model | batch | step img/s, mask tokens / visible only | step speedup | FLOPs ratio | "
                  "encoder fwd+bwd speedup |", "|---|---|---|---|---|---|"]
        for r in results["asymmetric"]:
            step, s, e = r["step"], r["speedup_step"], r["speedup_encoder"]
            lines.append(
                f"| {r['size']} | {r['batch_size']} | {step['mask_tokens']['images_per_s']:.1f} / "
                f"{step['visible_only']['images_per_s']:.1f} | {speedup_text(s, cpu)} | "
                f"{r['flops_ratio_step']:.2f}x | {speedup_text(e, cpu)} |")
        lines.append("")
    if results["data"]:
        lines += ["## Data path: decode + RandomResizedCrop(224, scale 0.2-1) + flip + normalise, one core", "",
                  "| JPEG | path | images/s | speedup |", "|---|---|---|---|"]
        for r in results["data"]:
            for name, ips in r["images_per_s"].items():
                lines.append(
                    f"| {r['jpeg']} (~{r['mean_kb']:.0f} kB) | {name} | {ips:.0f} | {r['speedup'][name]:.2f}x |")
        lines.append("")
    if results["errors"]:
        lines += ["## Errors", ""] + [f"- {e['section']} {e.get('size', '')}: {e['error']}" for e in results["errors"]]
    return "\n".join(lines) + "\n"


def write_reports(results: Results, output_dir: pathlib.Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmark.json").write_text(json.dumps(results, indent=1))
    (output_dir / "benchmark.md").write_text(markdown(results))


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", help="presets, comma-separated (default: tiny,small on CPU, base,large,huge on GPU)")
    parser.add_argument("--sections", default="train,attention,asymmetric,data")
    parser.add_argument("--sdpa_backends", help="SDPA kernels in order of preference for the whole run, e.g. "
                        "flash_attention,efficient_attention,cudnn_attention,math (default: torch's order)")
    parser.add_argument("--attn", help="attention backends, comma-separated (default: eager,sdpa on CPU, sdpa on GPU)")
    parser.add_argument("--batch_size", type=int, help="default: 16 on CPU; on GPU 256, 128 for huge")
    parser.add_argument("--asymmetric_batch_size", type=int,
                        help="default: the training section's (64 for huge on GPU)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the model sections")
    parser.add_argument("--iterations", type=int, help="timed samples per variant (default: 6 CPU, 10 GPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant first (default: 1 CPU, 3 GPU)")
    parser.add_argument("--steps_per_sample", type=int, help="steps between two clock reads (default: 1 CPU, 3 GPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time our model under torch.compile (default: on GPU only)")
    parser.add_argument("--compile_sizes", default="large", help="sizes to compile (compilation takes a minute each)")
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--profile", action="store_true",
                        help="profile each timed training step: profile_<size>_<attn>_<model>.txt in --output_dir")
    parser.add_argument("--jpeg_sizes", default="500x375,1600x1200")
    parser.add_argument("--data_images", type=int, default=32)
    parser.add_argument("--data_rounds", type=int, default=4)
    parser.add_argument("--output_dir", default="outputs/benchmark")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.sizes = (args.sizes or ("base,large,huge" if gpu else "tiny,small")).split(",")
    args.sections = args.sections.split(",")
    args.sdpa_backends = args.sdpa_backends.split(",") if args.sdpa_backends else None
    args.attn = (args.attn or ("sdpa" if gpu else "eager,sdpa")).split(",")
    args.iterations = args.iterations or (10 if gpu else 6)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.steps_per_sample = args.steps_per_sample or (3 if gpu else 1)
    args.compile = gpu if args.compile is None else args.compile
    args.compile_sizes = args.compile_sizes.split(",")
    args.jpeg_sizes = args.jpeg_sizes.split(",")
    args.autocast_dtype = torch.bfloat16 if gpu else None  # bf16 autocast (fp32 master weights) as in training
    args.dtype_name = "bf16 autocast" if gpu else "fp32"
    return args


def run_section(results: Results, section: str, fn: Callable[[], Any], output_dir: pathlib.Path, **tags: Any) -> None:
    """Run one measurement; on failure, record the error and go on. Reports are rewritten either way."""
    started = time.perf_counter()
    print(f"[benchmark] {section} {tags} ...", flush=True)
    try:
        outcome = fn()
        results[section] += outcome if isinstance(outcome, list) else [outcome]
    except Exception as error:  # noqa: BLE001 - one failed size must not lose the others
        traceback.print_exc()
        results["errors"].append({"section": section, **tags, "error": f"{type(error).__name__}: {error}"})
    finally:
        torch._dynamo.reset()  # compiled code holds on to its model: let the memory go before the next size
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"[benchmark] {section} {tags} done in {time.perf_counter() - started:.0f}s", flush=True)
        write_reports(results, output_dir)


def main(argv: list[str] | None = None) -> Results:
    args = parse_args(argv)
    device = torch.device(args.device)
    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    results: Results = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU {platform.processor() or platform.machine()}, {args.threads} threads",
            "torch": torch.__version__, "transformers": transformers.__version__, "dtype": args.dtype_name,
            "threads": torch.get_num_threads(), "loadavg": [round(v, 2) for v in os.getloadavg()],
            "peak_bf16_flops": peak_flops(device), "sdpa_backends": ",".join(args.sdpa_backends or ["torch's order"]),
            "argv": sys.argv[1:] if argv is None else argv,
        },
        "train": [], "attention": [], "asymmetric": [], "data": [], "errors": [],
    }
    with sdpa_priority(args.sdpa_backends):
        for size in args.sizes:  # size by size, so that a run cut short keeps whole sizes, the first named first
            for attn in args.attn if "train" in args.sections else ():
                run_section(results, "train", lambda: bench_train(size, attn, args, device), output_dir,
                            size=size, attn=attn)
            if "attention" in args.sections:
                run_section(results, "attention", lambda: bench_attention(size, args, device), output_dir, size=size)
            if "asymmetric" in args.sections:
                run_section(results, "asymmetric", lambda: bench_asymmetric(size, args, device), output_dir,
                            size=size)
    if "data" in args.sections:
        run_section(results, "data", lambda: bench_data(args), output_dir)
    print(markdown(results), flush=True)
    return results


if __name__ == "__main__":
    main()
