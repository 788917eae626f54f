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
a profile of each timed training step. The measurements are `modeling_mae.studies.benchmark_sections`'s, with the
kit of `modeling_mae.studies.benchmark` (models, FLOPs, timing) and the reports of `benchmark_report`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_mae.studies.benchmark import Results, peak_flops
from modeling_mae.studies.benchmark_report import markdown, write_reports
from modeling_mae.studies.benchmark_sections import (
    bench_asymmetric,
    bench_attention,
    bench_data,
    bench_train,
    sdpa_priority,
)


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
