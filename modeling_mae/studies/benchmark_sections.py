"""The benchmark's sections (`run_scripts/benchmark.py`), each one measurement of one model size or JPEG size:

- `bench_train`: a training step of our MAE against transformers' ViTMAE (and our MAE compiled), same shapes, dtype,
  attention backend and optimizer;
- `bench_asymmetric`: the encoder on the visible patches only against on all patches with mask tokens;
- `bench_attention`: the SDPA kernels alone at the models' attention shapes (`sdpa_priority` orders them for a run);
- `bench_data`: decode + augmentation on one core, plain PIL + torchvision against the fast paths.

Each takes the script's parsed arguments and returns its results, ready for JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import statistics
import time
from collections.abc import Callable

import torch
from PIL import Image
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..configuration_mae import MAEConfig
from ..data.synthetic import natural_jpegs
from ..modeling_mae import MAEForPreTraining
from .benchmark import (
    Results,
    build_models,
    encode_all_patches,
    make_train_step,
    mask_token_loss,
    peak_flops,
    pretraining_flops,
    profile_step,
    ratio,
    step_memory_mib,
    summarise,
    time_alternating,
)

# GPU batch per preset when --batch_size is not given: ViT-H's activations at 256 leave an 80 GB card too little
# room for both models (each with AdamW state).
GPU_BATCH_SIZE = {"huge": 128}
GPU_DEFAULT_BATCH_SIZE = 256
# The mask-token baseline keeps 4x the encoder activations: ViT-H at 128 would not fit an 80 GB card.
GPU_ASYMMETRIC_BATCH_SIZE = {"huge": 64}
# The SDPA kernels timed by the attention section.
ATTENTION_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH)


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

    from ..data.fast_decode import FastPretrainTransform

    plain = v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    paths = {"plain PIL + torchvision": lambda data: plain(Image.open(io.BytesIO(data)).convert("RGB"))}
    try:
        from ..data.transforms import decode_image, pretrain_transform

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
