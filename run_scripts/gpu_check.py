"""One prepared command that proves every GPU path and measures whether the data keeps the GPU fed (issue 13).

    python run_scripts/gpu_check.py --output_dir $OUT                   # one H100/H200: under 8 minutes
    python run_scripts/gpu_check.py --device cpu --tiny                 # the dry run of every path that needs no GPU

Sections, the most important first. Each is guarded (a failure is recorded with its traceback and the next one
runs), the results are rewritten after each, and a time budget skips what would no longer fit:
1. environment: the card, versions, cores;
2. data: ImageNet-like JPEG parquet shards (`modeling_mae.data.synthetic`);
3. engines: through `accelerate launch` with each shipped config (single_gpu, fsdp, deepspeed_zero3, deepspeed_zero2),
   bf16: a short pretraining that saves a checkpoint, a resume from it to the final step, the export; the export
   reloaded with `AutoModelForPreTraining` gives the engine's own loss on a fixed batch and noise; the four engines'
   losses after N steps agree within the bf16 tolerance, which one run of the reference engine with bf16-sized
   errors added to every step measures (meanwhile the throughput model compiles in the background);
4. throughput: ViT-L/16, bf16, compiled: (a) synthetic tensors on the GPU, (b) the streaming loader with N worker
   processes, (c) `--decode_on cuda`; nvjpeg decode + augmentation alone; MFU (`benchmark.py`'s method);
5. script options: `run_mae.py --torch_compile` and `--decode_on cuda` against the eager, worker-decoding run;
6. compile modes: MFU under CUDA graphs (`reduce-overhead`), then `--torch_compile_mode reduce-overhead` in training.

Writes `gpu_check.json` (everything) and `gpu_check.md` (the tables of docs/benchmarks.md) to `--output_dir`, and
to `$OUT` when that is set. Runs, data and logs go to `--work_dir`. The check's children are this script with a
`--role`; the sections and the children's work are in `modeling_mae/studies/gpu_check_*.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "run_scripts")]  # the library and the sibling scripts, without installing

from modeling_mae.errors import UsageError, exit_process, run_main
from modeling_mae.studies.gpu_check.children import child_section, wait_for_warmup
from modeling_mae.studies.gpu_check.config import (
    ACCELERATE_CONFIGS,
    CPU_ENGINES,
    GPU_ENGINES,
    GPU_SIZES,
    TINY_SIZES,
    Results,
    now_utc,
)
from modeling_mae.studies.gpu_check.engines import (
    engines_resume_section,
    engines_train_section,
    option_section,
)
from modeling_mae.studies.gpu_check.probes import run_between_probes
from modeling_mae.studies.gpu_check.setup import data_section, environment_section
from modeling_mae.studies.gpu_check.state import Check
from modeling_mae.studies.gpu_check.summary import AGREEMENT_FACTOR, BF16_UNIT_ROUNDOFF
from modeling_mae.studies.gpu_check.throughput import (
    compile_modes_child,
    throughput_child,
    warmup_child,
)


def comma_list(cast: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    return lambda text: tuple(cast(item) for item in text.split(",") if item)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/gpu_check", help="gpu_check.json and gpu_check.md (and $OUT)")
    parser.add_argument("--work_dir", default="/tmp/gpu_check", help="data, runs and logs")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the dry run of every path, a few minutes")
    parser.add_argument("--time_budget_s", type=float, default=470.0, help="sections that would not fit are skipped")
    parser.add_argument("--sections", type=comma_list(str), default=None,
                        help="the sections whose names start so, e.g. engines,throughput (default: all)")
    parser.add_argument("--engines", type=comma_list(str), default=None,
                        help=f"accelerate configs, the reference first (default: {','.join(GPU_ENGINES)})")
    parser.add_argument("--loader_workers", type=comma_list(int), default=None,
                        help="worker counts of the loader measurements (default: 16,8,4,2; tiny: 2)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the throughput model (default: on with cuda)")
    parser.add_argument("--compile_modes", type=comma_list(str), default=("reduce-overhead",),
                        help="torch.compile modes whose MFU the last section measures")
    parser.add_argument("--role", choices=("check", "engine", "warmup", "throughput", "compile_modes"), default="check",
                        help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    parser.add_argument("--rounding_noise", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = sizes = TINY_SIZES if args.tiny else GPU_SIZES
    args.engines = args.engines or (GPU_ENGINES if args.device == "cuda" else CPU_ENGINES)
    args.loader_workers = args.loader_workers or sizes.loader_workers
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    unknown = [engine for engine in args.engines if not (ACCELERATE_CONFIGS / f"{engine}.yaml").is_file()]
    if unknown:
        raise UsageError(f"--engines {','.join(unknown)}: no such config in {ACCELERATE_CONFIGS}")
    return args


def sections(check: Check) -> list[tuple[str, Callable[[Results], None], float, bool]]:
    """(name, run, start only if this many seconds are left, needs CUDA), the most important first. The engine runs
    go in two waves of parallel launches (~1 minute each); throughput needs ~2 minutes once the model is compiled."""
    gpu = check.gpu
    listed: list[tuple[str, Callable[[Results], None], float, bool]] = [
        ("environment", environment_section(check), 0, False),
        ("data", data_section(check), 0, False),
        ("engines train", engines_train_section(check), 60, gpu),
        ("engines resume", engines_resume_section(check), 60, gpu),
        ("throughput", child_section(check, "throughput", "throughput"), 60, gpu),
        ("option torch_compile", option_section(check, "torch_compile", "--torch_compile"), 60, gpu),
        ("option decode_on", option_section(check, "decode_on", "--decode_on", check.args.device), 40, gpu),
        ("compile modes", child_section(check, "compile_modes", "compile_modes"), 100, gpu),
        ("option compile_reduce_overhead", option_section(
            check, "compile_reduce_overhead", "--torch_compile", "--torch_compile_mode", "reduce-overhead"), 80, gpu),
    ]
    return [entry for entry in listed if check.wants(entry[0])]


def engine_worker(record_path: pathlib.Path, run_argv: list[str], rounding_noise: bool = False) -> None:
    """The engine role: run_mae.py's main between the probes (`studies.gpu_check.probes.run_between_probes`)."""
    import run_mae  # the sibling script: only this role trains

    run_between_probes(run_mae.main, record_path, run_argv, rounding_noise)


def run_check(args: argparse.Namespace) -> Results:
    sizes = args.sizes
    results: Results = {"meta": {"command": " ".join(["python", "run_scripts/gpu_check.py", *sys.argv[1:]]),
                                 "started": now_utc(), "monotonic_start": time.monotonic(), "device": args.device,
                                 "tiny": args.tiny, "sizes": asdict(sizes), "engines": list(args.engines),
                                 "compile_modes": list(args.compile_modes), "tolerances": {
                                     "bf16_unit_roundoff": BF16_UNIT_ROUNDOFF, "agreement_factor": AGREEMENT_FACTOR}},
                        "sections": {}}
    check = Check(args, sizes, results, time.monotonic() + args.time_budget_s)
    try:
        for name, run, start_if_remaining_s, needs_cuda in sections(check):
            check.run_section(name, run, start_if_remaining_s, needs_cuda)
    finally:
        wait_for_warmup(check, {}, reserve_s=math.inf)  # ends it, if the throughput section did not run
    print(check.write(), flush=True)
    return results


def main(argv: list[str] | None = None) -> Results | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, run_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parse_args(own)
    sizes = args.sizes
    if args.role == "engine":
        engine_worker(pathlib.Path(args.record), run_argv, args.rounding_noise)
    elif args.role == "warmup":
        warmup_child(args, sizes)
    elif args.role == "throughput":
        throughput_child(args, sizes)
    elif args.role == "compile_modes":
        compile_modes_child(args, sizes)
    else:
        return run_check(args)
    return None


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        exit_process(run_main(main))
