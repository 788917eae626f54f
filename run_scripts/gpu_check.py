"""One prepared command that proves every GPU path and measures whether the data keeps the GPU fed (issue 13).

    python run_scripts/gpu_check.py --output_dir $OUT                   # one H100/H200: under 8 minutes
    python run_scripts/gpu_check.py --device cpu --tiny                 # the dry run of every path that needs no GPU

Sections, the most important first. Each is guarded (a failure is recorded with its traceback and the next one
runs), the results are rewritten after each, and a time budget skips what would no longer fit:
1. environment: the card, versions, cores;
2. data: ImageNet-like JPEG parquet shards (`modeling_mae.synthetic_data`);
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
to `$OUT` when that is set. Runs, data and logs go to `--work_dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "run_scripts")]  # the library and the sibling scripts, without installing

import psutil  # an Accelerate dependency
import torch

from modeling_mae.errors import UsageError, exit_process, run_main
from modeling_mae.studies.stages import release_memory

THIS_SCRIPT = pathlib.Path(__file__).resolve()
ACCELERATE_CONFIGS = REPO / "configuration" / "accelerate"
GPU_ENGINES = ("single_gpu", "fsdp", "deepspeed_zero3", "deepspeed_zero2")  # the first is the reference
CPU_ENGINES = ("cpu", "fsdp", "deepspeed_zero3", "deepspeed_zero2")
RESULTS_JSON, RESULTS_MD = "gpu_check.json", "gpu_check.md"
# bf16 keeps 8 significant bits: a value rounds by at most 2^-8 of itself (the unit roundoff). Two losses closer than
# that are one number in bf16.
BF16_UNIT_ROUNDOFF = 2.0**-8
AGREEMENT_FACTOR = 3.0  # engines may differ from each other by up to 3x what bf16 does to the reference engine
# fp32 runs of two engines agree to fp32's rounding (2^-24) amplified by training: 2^-16 allows 256x, and is still
# two orders below the bf16 tolerance, where any difference in the algorithm (data, masks, schedule, update) shows.
FP32_TOLERANCE = 2.0**-16
PROBE_SEED = 1234  # the masking noise of the fixed probe batch
LOG_TAIL_CHARS = 4000
Results = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """What the check trains and measures: the real sizes on a GPU, tiny ones for the dry run."""

    train_images: int
    train_copies: int  # rows per training image: long passes of the workers over the shards, as over ImageNet
    validation_images: int
    image_size: tuple[int, int]  # (width, height) of the JPEGs
    shards: int  # a multiple of every worker count: each DataLoader worker then reads whole shards
    engine_model: str  # preset of the engine runs
    engine_batch: int
    engine_steps: int  # the checkpoint is saved half way
    engine_learning_rate: float
    engine_workers: int
    launch_timeout_s: float  # a wave of parallel `accelerate launch`es: start-up, a few steps, checkpoint, export
    throughput_model: str  # preset of the throughput and MFU measurements
    throughput_batch: int
    min_timed_steps: int
    mfu_samples: int  # benchmark.py's method: samples of 3 steps
    loader_workers: tuple[int, ...]  # the most informative first
    decode_readers: int  # workers that only read bytes for --decode_on


GPU_SIZES = Sizes(2048, 4, 64, (500, 375), 16, "small", 32, 8, 1e-3, 2, 240, "large", 256, 24, 5, (16, 8, 4, 2), 2)
# bf16 is slow on a CPU, and 7 launches at once share its few cores
TINY_SIZES = Sizes(32, 1, 16, (160, 120), 2, "tiny-32px", 8, 4, 1e-3, 1, 1200, "tiny-32px", 8, 2, 2, (2,), 1)


# ------------------------------------------------------------------------------------------------- results, sections


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_json(path: pathlib.Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


class SectionSkipped(Exception):
    """A section that cannot run here (no GPU, a package missing, no time left): recorded with its reason."""


class LaunchError(RuntimeError):
    """A child process failed; the message ends with the tail of its log."""


@dataclass
class Check:
    """The state of one check: arguments, where things go, the deadline, and the results so far."""

    args: argparse.Namespace
    sizes: Sizes
    results: Results
    deadline: float
    warmup: subprocess.Popen | None = None  # compiles the throughput model while the engines run

    @property
    def work_dir(self) -> pathlib.Path:
        return pathlib.Path(self.args.work_dir)

    @property
    def data_dir(self) -> pathlib.Path:
        return self.work_dir / "data"

    @property
    def initial_weights(self) -> pathlib.Path:
        return self.work_dir / "initial_weights"

    @property
    def gpu(self) -> bool:
        return self.args.device == "cuda"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run_section(self, name: str, run: Callable[[Results], None], start_if_remaining_s: float = 0.0,
                    needs_cuda: bool = False) -> None:
        """Run one section into `results["sections"][name]`: ok, skipped (with the reason) or failed (with the
        traceback, and what it had measured before failing). The reports are rewritten either way."""
        started = time.monotonic()
        entry: Results = {"status": "running", "started": now_utc(), "result": {}}
        self.results["sections"][name] = entry
        print(f"[gpu_check] {name} ... ({self.remaining():.0f} s left)", flush=True)
        try:
            if needs_cuda and not torch.cuda.is_available():
                raise SectionSkipped("CUDA is not available here (run with --device cpu --tiny for the CPU dry run)")
            if self.remaining() < start_if_remaining_s:
                raise SectionSkipped(f"out of time: {self.remaining():.0f} s left, it needs {start_if_remaining_s:.0f}")
            run(entry["result"])
            entry["status"] = "ok"
        except SectionSkipped as reason:
            entry.update(status="skipped", reason=str(reason))
        except Exception as error:  # noqa: BLE001 - one failed section must not lose the others
            entry.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        entry["seconds"] = round(time.monotonic() - started, 1)
        note = (entry.get("reason") or entry.get("error") or "").split("\n")[0]
        print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']} s {note}", flush=True)
        self.write()

    def write(self) -> str:
        """The JSON and the markdown, to --output_dir and $OUT. A bug in the summary or the tables must not lose
        the measurements: it is recorded, and the JSON is written anyway."""
        self.results["meta"]["seconds"] = round(time.monotonic() - self.results["meta"]["monotonic_start"], 1)
        try:
            self.results["summary"] = summarise(self.results, self.sizes)
            report = markdown(self.results)
        except Exception:  # noqa: BLE001 - see the docstring
            self.results["report_error"] = traceback.format_exc()
            report = f"The report failed; the measurements are in {RESULTS_JSON}:\n\n{self.results['report_error']}"
        output_dirs = [pathlib.Path(self.args.output_dir)] + ([pathlib.Path(os.environ["OUT"])]
                                                              if os.environ.get("OUT") else [])
        for output_dir in dict.fromkeys(output_dirs):
            write_json(output_dir / RESULTS_JSON, self.results)
            (output_dir / RESULTS_MD).write_text(report)
        return report


# ------------------------------------------------------------------------------------------------- environment, data


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True, timeout=30, check=False).stdout.strip() or None


def environment_section(check: Check) -> Callable[[Results], None]:
    def run(result: Results) -> None:
        result.update(
            gpu=nvidia_smi(), cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda,
            python=platform.python_version(), cpu_count=os.cpu_count(), usable_cores=len(os.sched_getaffinity(0)),
            memory_gb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            loadavg=[round(value, 2) for value in os.getloadavg()],
            packages={name: package_version(name) for name in (
                "torch", "torchvision", "transformers", "accelerate", "datasets", "deepspeed", "pyarrow", "fsspec",
                "huggingface-hub", "pydantic", "numpy", "pillow", "timm", "torchao")},
        )
    return run


def data_section(check: Check) -> Callable[[Results], None]:
    """ImageNet-like shards in the work dir (reused when a previous run of the same sizes left them there), and the
    initial weights every engine run starts from."""
    from modeling_mae.data.synthetic import write_imagenet_like

    def run(result: Results) -> None:
        spec = {"train": check.sizes.train_images, "copies": check.sizes.train_copies,
                "validation": check.sizes.validation_images, "shards": check.sizes.shards,
                "size": list(check.sizes.image_size)}
        marker = check.data_dir / "gpu_check_data.json"
        previous = read_json(marker)
        if previous and previous["spec"] == spec:
            result.update(previous["summary"], reused=True)
        else:
            shutil.rmtree(check.data_dir, ignore_errors=True)
            started = time.monotonic()
            summary = write_imagenet_like(check.data_dir, spec["train"], spec["validation"], spec["shards"],
                                          size=check.sizes.image_size, processes=os.cpu_count(),
                                          train_copies=spec["copies"])
            summary["seconds"] = round(time.monotonic() - started, 1)
            write_json(marker, {"spec": spec, "summary": summary})
            result.update(summary, reused=False)
        save_initial_weights(check.sizes.engine_model, check.initial_weights)
    return run


def save_initial_weights(preset: str, directory: pathlib.Path) -> None:
    """One random initialisation (seed 0) saved for every engine run to load. Under ZeRO-3 transformers builds the
    model inside deepspeed.zero.Init (Accelerate registers the ZeRO-3 config with it even with zero3_init_flag
    false), which draws other initial weights from the same seed: loading saved ones makes the engines comparable."""
    from modeling_mae import MAEConfig, MAEForPreTraining

    torch.manual_seed(0)
    MAEForPreTraining._from_config(MAEConfig.from_preset(preset)).save_pretrained(directory)


# ------------------------------------------------------------------------------------------- engines (parent side)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_environment(check: Check) -> dict[str, str]:
    """Offline, our code first on the path, a private HF_HOME (remote code is copied there on load)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(check.work_dir / "hf_home"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if not check.gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU processes (gloo)
    return env


def start_child(check: Check, command: list[str], stream: Any) -> subprocess.Popen:
    """A child process leading its own process group, so that it can be ended with everything it started
    (`accelerate launch` starts the script as a grandchild); the group stays in this session, which ends it if this
    process is killed."""
    return subprocess.Popen(command, cwd=REPO, env=child_environment(check), stdout=stream, stderr=subprocess.STDOUT,
                            process_group=0)


def finish_child(process: subprocess.Popen, timeout_s: float) -> int | None:
    """The child's exit status, or None if it had to be ended after `timeout_s`: with its process group and every
    descendant (torch's elastic launcher, behind `accelerate launch` for FSDP and DeepSpeed, starts its workers in
    a session of their own)."""
    try:
        return process.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        return None
    finally:
        if process.poll() is None:  # timed out, or this process is being stopped
            descendants = psutil.Process(process.pid).children(recursive=True)
            os.killpg(process.pid, signal.SIGKILL)
            for descendant in descendants:
                with contextlib.suppress(psutil.NoSuchProcess):
                    descendant.kill()
            process.wait()


def run_child(check: Check, command: list[str], log: pathlib.Path, timeout_s: float) -> None:
    """Run a child process with its output in `log`; raise LaunchError with the log's tail if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    timeout_s = min(timeout_s, check.remaining())
    with log.open("w") as stream:
        returncode = finish_child(start_child(check, command, stream), timeout_s)
    if returncode is None:
        raise LaunchError(f"timed out after {timeout_s:.0f} s: {log}\n{log_tail(log)}")
    if returncode != 0:
        raise LaunchError(f"exit status {returncode}: {log}\n{log_tail(log)}")


def log_tail(log: pathlib.Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:]


def skip_reason(check: Check, engine: str) -> str | None:
    if engine == "fsdp" and not check.gpu:
        return "FSDP through Accelerate runs on GPUs only (its sharding is tested on CPU in tests/test_distributed.py)"
    if engine.startswith("deepspeed") and package_version("deepspeed") is None:
        return "deepspeed is not installed (bring the wheels: run_scripts/gpu_wheels.sh, docs/benchmarks.md)"
    return None


def run_mae_flags(check: Check, output_dir: pathlib.Path, *extra: str) -> list[str]:
    """A short pretraining from the shards: the same seed, data and masks for every engine."""
    sizes = check.sizes
    return ["--dataset_name", str(check.data_dir), "--model_name_or_path", str(check.initial_weights),
            "--norm_pix_loss", "true", "--attn_implementation", "sdpa", "--output_dir", str(output_dir),
            "--per_device_train_batch_size", str(sizes.engine_batch),
            "--per_device_eval_batch_size", str(sizes.engine_batch), "--max_eval_samples", str(sizes.engine_batch),
            "--max_train_steps", str(sizes.engine_steps), "--warmup_steps", "2",
            "--learning_rate", str(sizes.engine_learning_rate), "--logging_steps", "1", "--shuffle_buffer_size", "64",
            "--dataloader_num_workers", str(sizes.engine_workers), "--seed", "0", *extra]


@dataclass(frozen=True)
class Launch:
    """One `accelerate launch` of this script's engine worker (run_mae.py plus the probes) on one process."""

    name: str  # its run folder and log
    section: str  # the results section it reports to, under result["runs"][key]
    key: str
    engine: str
    mixed_precision: str = "bf16"
    extra: tuple[str, ...] = ()  # run_mae.py flags
    worker_flags: tuple[str, ...] = ()

    def command(self, check: Check, record: pathlib.Path) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ACCELERATE_CONFIGS / f"{self.engine}.yaml"), "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", self.mixed_precision, "--main_process_port", str(free_port()), str(THIS_SCRIPT),
                "--role", "engine", "--record", str(record), *self.worker_flags, "--",
                *run_mae_flags(check, run_dir(check, self.name) / "out", *self.extra)]


def run_dir(check: Check, name: str) -> pathlib.Path:
    return check.work_dir / "runs" / name


def run_launches(check: Check, launches: list[Launch]) -> None:
    """Start every launch at once and wait for all: one GPU holds them together (small models), and their numbers do
    not depend on what else runs. Each outcome goes to its section: the record, or the error with its log's tail.
    Raises LaunchError naming the launches that failed."""
    started = []
    for launch in launches:
        shutil.rmtree(run_dir(check, launch.name), ignore_errors=True)
        record = run_dir(check, launch.name) / "gpu_check_record.json"
        log = check.work_dir / "logs" / f"{launch.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as stream:
            started.append((launch, record, log, start_child(check, launch.command(check, record), stream)))
    deadline = time.monotonic() + min(check.sizes.launch_timeout_s, check.remaining())
    failed = [launch.name for launch, record, log, process in started
              if not report_launch(check, launch, record, log, finish_child(process, deadline - time.monotonic()))]
    if failed:
        raise LaunchError(f"failed: {', '.join(failed)} (logs in {check.work_dir / 'logs'})")


def report_launch(check: Check, launch: Launch, record: pathlib.Path, log: pathlib.Path,
                  returncode: int | None) -> bool:
    """Put a finished launch's record (or its error) into its section; returns whether it succeeded."""
    entry = check.results["sections"].setdefault(launch.section, {"status": "ok", "result": {}})
    if returncode == 0 and record.is_file():
        entry["result"].setdefault("runs", {})[launch.key] = {"mixed_precision": launch.mixed_precision,
                                                              "flags": list(launch.extra), **read_json(record)}
        return True
    outcome = "timed out" if returncode is None else f"exit status {returncode}"
    entry["status"] = "failed"
    entry["error"] = "; ".join(filter(None, [entry.get("error"), f"{launch.key}: {outcome}, {log}"]))
    entry.setdefault("log_tails", {})[launch.key] = log_tail(log)
    return False


def engines_train_section(check: Check) -> Callable[[Results], None]:
    """Every engine trains twice at once, in bf16 (checkpoint half way) and in fp32, next to the reference engine's
    rounding-noise control. The fp32 runs tell a bf16 difference (arithmetic) from a real one (the algorithm)."""
    half = check.sizes.engine_steps // 2

    def run(result: Results) -> None:
        launches = [Launch("noise", "engine rounding-noise control", "run", reference_engine(check),
                           worker_flags=("--rounding_noise",))]
        for engine in check.args.engines:
            if reason := skip_reason(check, engine):
                check.results["sections"][f"engine {engine}"] = {"status": "skipped", "reason": reason, "result": {}}
                continue
            check.results["sections"][f"engine {engine}"] = {"status": "ok", "result": {"engine": engine}}
            launches += [Launch(f"{engine}_full", f"engine {engine}", "full", engine,
                                extra=("--checkpointing_steps", str(half))),
                         Launch(f"{engine}_fp32", f"engine {engine}", "fp32", engine, mixed_precision="no")]
        result["launches"] = [launch.name for launch in launches]
        run_launches(check, launches)
    return run


def engines_resume_section(check: Check) -> Callable[[Results], None]:
    """Each engine whose bf16 run saved its checkpoint resumes from it in a fresh folder and trains to the final
    step; meanwhile the throughput model compiles in the background."""
    half = check.sizes.engine_steps // 2

    def run(result: Results) -> None:
        start_warmup(check)
        launches = [Launch(f"{engine}_resumed", f"engine {engine}", "resumed", engine, extra=(
            "--checkpointing_steps", str(half), "--resume_from_checkpoint",
            str(run_dir(check, f"{engine}_full") / "out" / f"step_{half}")))
            for engine in check.args.engines
            if "full" in check.results["sections"].get(f"engine {engine}", {}).get("result", {}).get("runs", {})]
        if not launches:
            raise SectionSkipped("no engine saved a checkpoint")
        result["launches"] = [launch.name for launch in launches]
        run_launches(check, launches)
    return run


def option_section(check: Check, name: str, *extra: str) -> Callable[[Results], None]:
    """One bf16 run of the reference engine with a run_mae.py option (--torch_compile, --decode_on)."""
    def run(result: Results) -> None:
        run_launches(check, [Launch(name, f"option {name}", "run", reference_engine(check), extra=extra)])
    return run


def reference_engine(check: Check) -> str:
    return check.args.engines[0]


# ------------------------------------------------------------------------------------------- engines (child side)


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


def engine_worker(record_path: pathlib.Path, run_argv: list[str], rounding_noise: bool = False) -> None:
    """run_mae.py's main with a probe before and after the training loop, then the export reloaded and probed.
    `rounding_noise`: the tolerance's control run (add_rounding_noise_to_each_step)."""
    import run_mae

    from modeling_mae.training.checkpoints import list_checkpoints

    record: Results = {}
    seen: dict[str, Any] = {}
    original_train = run_mae.train

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

    run_mae.train = train_between_probes
    try:
        record["results"] = run_mae.main(run_argv)
    finally:
        run_mae.train = original_train
    trainer = seen["trainer"]
    if trainer.accelerator.is_main_process:
        record["checkpoints"] = [path.name for path in list_checkpoints(trainer.output_dir)]
        record["probe_export"] = export_probe(trainer.output_dir, *seen["batch"], *engine_precision(trainer))
        write_json(record_path, record)


# ------------------------------------------------------------------------------------ throughput (child side, on GPU)


@dataclass
class Bench:
    """The model every throughput measurement trains: a train step that takes its batches from a function."""

    model: torch.nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    batch_size: int
    image_size: tuple[int, int]
    flops: float
    peak: float | None

    def step(self, batches: torch.Tensor | Callable[[], torch.Tensor]) -> Callable[[], None]:
        from benchmark import make_train_step

        autocast = torch.bfloat16 if self.device.type == "cuda" else None
        return make_train_step(self.loss, list(self.model.parameters()), batches, autocast)


def build_bench(sizes: Sizes, device: torch.device, compile_mode: str | None) -> Bench:
    """Our MAE as run_mae.py trains it (masked-only loss, SDPA), compiled with `compile_mode` unless None."""
    from benchmark import peak_flops, pretraining_flops

    from modeling_mae import MAEConfig, MAEForPreTraining

    config = MAEConfig.from_preset(sizes.throughput_model)
    with device:
        model = MAEForPreTraining._from_config(config, attn_implementation="sdpa").train()
    compiled = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    return Bench(model, lambda pixels: compiled(pixels, logits_to_keep="masked").loss, device,
                 sizes.throughput_batch, config.image_size, pretraining_flops(config, sizes.throughput_batch),
                 peak_flops(device))


def timed_rate(step: Callable[[], Any], warmup: int, timed: int, images: int, device: torch.device) -> Results:
    """Images/s over `timed` calls after `warmup` ones, synchronising after each as the training loop does (it reads
    every loss with .item()); also how long the warm-up took (compilation, worker start-up)."""
    from benchmark import synchronize  # child side only: importing benchmark sets its thread environment
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    timed_from = time.perf_counter()
    for _ in range(timed):
        step()
        synchronize(device)
    seconds = time.perf_counter() - timed_from
    return {"images_per_s": images * timed / seconds, "timed_steps": timed, "warmup_s": timed_from - started}


def synthetic_rates(bench: Bench, sizes: Sizes) -> Results:
    """(a) the model alone on tensors already on the device: in the training loop's way (a sync per step), and in
    benchmark.py's way (median of 3-step samples) for the MFU."""
    from benchmark import time_alternating

    pixels = torch.randn(bench.batch_size, 3, *bench.image_size, device=bench.device)
    step = bench.step(pixels)
    result = timed_rate(step, 2, sizes.min_timed_steps, bench.batch_size, bench.device)
    samples = time_alternating({"step": step}, sizes.mfu_samples, 1, 3, bench.device)["step"]["wall"]
    median = sorted(samples)[len(samples) // 2]
    result["benchmark_method"] = {"images_per_s": bench.batch_size / median, "step_ms": median * 1e3,
                                  "tflops_per_s": bench.flops / median / 1e12,
                                  "mfu": bench.flops / median / bench.peak if bench.peak else None}
    return result


def loader_rates(bench: Bench, sizes: Sizes, data_dir: pathlib.Path, workers: int, decode_on: str) -> Results:
    """The streaming loader alone, then training from it (b, c). Measured over whole waves of workers: every
    worker builds whole batches, so they arrive N at a time; timing from one wave to another cancels that."""
    from modeling_mae.data.sources import DataArguments
    from modeling_mae.data.loader import build_dataloader
    from modeling_mae.data.transforms import pretrain_transform
    from modeling_mae.training.accelerator import move_to_device

    arguments = DataArguments(dataset_name=str(data_dir), dataloader_num_workers=workers, shuffle_buffer_size=256,
                              num_train_samples=10**8, decode_on=decode_on)  # an epoch that never ends here
    loader = build_dataloader(arguments, "train", pretrain_transform(bench.image_size), bench.batch_size, train=True)
    batches = iter(loader)
    try:
        started = time.perf_counter()
        next(batches)
        wave = max(workers, 1)
        waves = max(2, math.ceil(sizes.min_timed_steps / wave))
        result: Results = {"workers": workers, "decode_on": decode_on,
                           "first_batch_s": time.perf_counter() - started}
        result["loader_alone"] = timed_rate(lambda: next(batches), wave - 1, waves * wave, bench.batch_size,
                                            bench.device)

        def next_pixels() -> torch.Tensor:
            return move_to_device(next(batches), bench.device)["pixel_values"]

        result["training"] = timed_rate(bench.step(next_pixels), wave, waves * wave, bench.batch_size, bench.device)
        return result
    finally:
        batches.close()
        gc.collect()  # shuts the workers down before the next measurement starts its own


def first_jpegs(data_dir: pathlib.Path, count: int) -> list[bytes]:
    import pyarrow.parquet as pq

    shard = min((data_dir / "data").glob("train-*.parquet"))
    return [row["bytes"] for row in pq.read_table(shard, columns=["image"]).column("image").to_pylist()[:count]]


def decode_rates(bench: Bench, data_dir: pathlib.Path) -> Results:
    """nvjpeg decode and the on-device augmentation alone (img/s), the CPU fast path on one core, and how far the
    device's pixels are from the CPU decoder's."""
    from modeling_mae.data.fast_decode import FastPretrainTransform
    from modeling_mae.data.transforms import augment_on_device, decode_image_tensor, decode_images_on_device

    encoded = first_jpegs(data_dir, bench.batch_size)
    images: list[torch.Tensor] = []

    def decode() -> None:
        images[:] = decode_images_on_device(encoded, bench.device)

    result = {"decode": timed_rate(decode, 1, 5, len(encoded), bench.device)}
    result["augment"] = timed_rate(lambda: augment_on_device(images, bench.image_size), 1, 5, len(encoded),
                                   bench.device)
    result["decode_and_augment"] = timed_rate(lambda: (decode(), augment_on_device(images, bench.image_size)), 1, 5,
                                              len(encoded), bench.device)
    difference = torch.cat([(image.cpu().int() - decode_image_tensor(data).int()).abs().flatten()
                            for image, data in zip(images[:16], encoded)]).float()
    result["pixels_vs_cpu_decoder"] = {"mean_abs": difference.mean().item(), "max_abs": difference.max().item()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's share
    try:
        transform = FastPretrainTransform(bench.image_size, seed=0)
        result["cpu_fast_path_one_core"] = timed_rate(lambda: [transform(data) for data in encoded[:64]], 1, 2,
                                                      len(encoded[:64]), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    return result


def measure(record: Results, name: str, run: Callable[[], Any], record_path: pathlib.Path, deadline: float) -> None:
    """One guarded measurement of a child: recorded, or its error; the record is rewritten after each."""
    if time.time() > deadline:
        record["skipped"].append(f"{name}: out of time")
    else:
        try:
            record[name] = run()
        except Exception as error:  # noqa: BLE001 - a failed measurement must not lose the others
            record["errors"].append({"measurement": name, "error": f"{type(error).__name__}: {error}",
                                     "traceback": traceback.format_exc()})
    write_json(record_path, record)


def device_description(device: torch.device) -> Results:
    if device.type != "cuda":
        return {"name": f"CPU {platform.processor() or platform.machine()}", "threads": torch.get_num_threads()}
    properties = torch.cuda.get_device_properties(device)
    return {"name": properties.name, "memory_gb": round(properties.total_memory / 1e9, 1),
            "multiprocessors": properties.multi_processor_count, "capability": f"{properties.major}.{properties.minor}"}


def throughput_child(args: argparse.Namespace, sizes: Sizes) -> None:
    """(a), decode alone, (c), then (b) for each worker count; MFU from (a)."""
    device, record_path = torch.device(args.device), pathlib.Path(args.record)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bench = build_bench(sizes, device, "default" if args.compile else None)
    record: Results = {"device": device_description(device), "model": sizes.throughput_model,
                       "batch_size": bench.batch_size, "compiled": args.compile, "step_flops": bench.flops,
                       "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
                       "peak_flops": bench.peak, "errors": [], "skipped": []}
    data_dir = pathlib.Path(args.work_dir) / "data"
    measure(record, "synthetic", lambda: synthetic_rates(bench, sizes), record_path, args.deadline)
    measure(record, "decode", lambda: decode_rates(bench, data_dir), record_path, args.deadline)
    decode_on = args.device
    measure(record, f"decode_on_{decode_on}",
            lambda: loader_rates(bench, sizes, data_dir, sizes.decode_readers, decode_on), record_path, args.deadline)
    for workers in args.loader_workers:
        def run(workers: int = workers) -> Results:
            return loader_rates(bench, sizes, data_dir, workers, "workers")

        measure(record, f"workers_{workers}", run, record_path, args.deadline)


def warmup_child(args: argparse.Namespace, sizes: Sizes) -> None:
    """Compile the throughput model with two training steps (what throughput_child compiles first), and exit."""
    from benchmark import synchronize

    bench = build_bench(sizes, torch.device(args.device), "default")
    step = bench.step(torch.randn(bench.batch_size, 3, *bench.image_size, device=bench.device))
    step()
    step()
    synchronize(bench.device)


def compile_modes_child(args: argparse.Namespace, sizes: Sizes) -> None:
    """MFU of the compiled step under each of `--compile_modes` (benchmark.py's method), one fresh model each."""
    device, record_path = torch.device(args.device), pathlib.Path(args.record)
    record: Results = {"device": device_description(device), "model": sizes.throughput_model, "errors": [],
                       "skipped": []}
    for mode in args.compile_modes:
        def run(mode: str = mode) -> Results:
            torch._dynamo.reset()
            bench = build_bench(sizes, device, mode)
            return synthetic_rates(bench, sizes)

        measure(record, mode, run, record_path, args.deadline)
        release_memory()


def start_warmup(check: Check) -> None:
    """Start compiling the throughput model in the background: torch.compile caches what it compiles (on disk), so
    the throughput section then finds it compiled instead of spending a minute of the budget on it."""
    if check.args.compile and "throughput" in [name for name, *_ in sections(check)]:
        log = check.work_dir / "logs" / "compile_warmup.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as stream:
            check.warmup = start_child(check, [sys.executable, str(THIS_SCRIPT), "--role", "warmup",
                                               *forwarded_flags(check.args)], stream)


def wait_for_warmup(check: Check, result: Results, reserve_s: float = 60.0) -> None:
    """Let the background compilation finish (leaving `reserve_s` to measure), or end it."""
    if check.warmup is not None:
        started = time.monotonic()
        result["warmup"] = {"exit_status": finish_child(check.warmup, check.remaining() - reserve_s),
                            "waited_s": round(time.monotonic() - started, 1)}
        check.warmup = None


def child_section(check: Check, role: str, record_name: str) -> Callable[[Results], None]:
    """Run a measuring child with the rest of the time budget; its record (partial if it was stopped) is the result."""
    def run(result: Results) -> None:
        wait_for_warmup(check, result)
        record = check.work_dir / "records" / f"{record_name}.json"
        record.unlink(missing_ok=True)
        command = [sys.executable, str(THIS_SCRIPT), "--role", role, "--record", str(record),
                   "--deadline", str(time.time() + check.remaining() - 20), *forwarded_flags(check.args)]
        try:
            run_child(check, command, check.work_dir / "logs" / f"{record_name}.log", check.remaining())
        finally:
            result.update(read_json(record) or {})
    return run


def forwarded_flags(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--work_dir", args.work_dir, "--loader_workers",
            ",".join(map(str, args.loader_workers)), "--compile_modes", ",".join(args.compile_modes),
            "--compile" if args.compile else "--no-compile"] + (["--tiny"] if args.tiny else [])


# ------------------------------------------------------------------------------------------- comparisons (pure)


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def agreement_tolerance(reference: Results, noisy: Results | None) -> Results:
    """The bf16 tolerance of the engines' losses after N steps.

    The engines run the same algorithm and differ only in where they round to bf16: bf16 copies of the weights and
    bf16 activations under DeepSpeed, fp32 weights cast inside autocast elsewhere, LayerNorm and reductions in one
    precision or the other. Rounding errors are at most 2^-8 of each value, but training amplifies them (Adam moves
    every weight by about the learning rate whatever the size of its gradient, so rounding can flip the direction of
    the smallest ones). How far this run's loss moves under such errors is measured, not guessed: the reference engine
    once more with bf16-sized errors in every gradient and weight at every step (`rounding_effect`, see
    add_rounding_noise_to_each_step). Two engines each within about that of the reference agree; AGREEMENT_FACTOR = 3
    leaves a margin for one random draw. The floor is one bf16 rounding of the loss itself (2^-8): closer than that,
    two losses are the same bf16 number. Random noise does not copy every systematic rounding of a run computed in
    bf16 throughout (DeepSpeed), so an engine outside the tolerance is judged by its fp32 run (`fp32_tolerance`). The
    comparison is conclusive only if the tolerance is well below how far training moved the loss (`signal`), else an
    engine that did not train at all would pass."""
    signal = relative_difference(reference["probe_end"], reference["probe_start"])
    effect = relative_difference(noisy["probe_end"], reference["probe_end"]) if noisy else None
    tolerance = max(AGREEMENT_FACTOR * (effect or 0.0), BF16_UNIT_ROUNDOFF)
    return {"rounding_effect": effect, "tolerance": tolerance, "fp32_tolerance": FP32_TOLERANCE, "signal": signal,
            "conclusive": 2 * tolerance < signal, "provisional": noisy is None}


def run_checks(run: Results, tolerance: float, reference: Results | None, same_start: bool = True) -> Results:
    """A run's own checks: the export reloads to the engine's loss (the same weights in the same precision: equal up
    to one bf16 rounding); it started from the reference's weights (the loss before training equal up to one bf16
    rounding, the only difference being the precision it is computed in); its loss after training agrees."""
    checks: Results = {"export_reload_rel": relative_difference(run["probe_export"], run["probe_end"])}
    checks["export_reload_ok"] = checks["export_reload_rel"] <= BF16_UNIT_ROUNDOFF
    if reference is not None and same_start:
        checks["initial_rel"] = relative_difference(run["probe_start"], reference["probe_start"])
        checks["same_start"] = checks["initial_rel"] <= BF16_UNIT_ROUNDOFF
    if reference is not None:
        checks["vs_reference_rel"] = relative_difference(run["probe_end"], reference["probe_end"])
        checks["agrees"] = checks["vs_reference_rel"] <= tolerance
    return checks


def engine_checks(runs: Results, half: int, steps: int, tolerance: float, reference: Results) -> Results:
    """Checkpoint, resume and export under one engine, and its agreement with the reference engine (`reference`:
    the reference engine's runs). `verdict`: "agrees" in bf16; "bf16 arithmetic" when only bf16 differs beyond the
    tolerance and the fp32 runs agree; "differs" when the fp32 runs differ too: a bug, ours or the engine's."""
    checks: Results = {}
    if "full" in runs:
        checks["full"] = run_checks(runs["full"], tolerance, reference.get("full"))
        checks["checkpoints_ok"] = runs["full"]["checkpoints"] == [f"step_{half}", f"step_{steps}"]
    if "fp32" in runs:
        checks["fp32"] = run_checks(runs["fp32"], FP32_TOLERANCE, reference.get("fp32"))
    if "resumed" in runs:
        resumed = runs["resumed"]
        checks["resumed"] = run_checks(resumed, tolerance, runs.get("full"), same_start=False)  # starts half way
        checks["resume_ok"] = (resumed["start_step"], resumed["end_step"]) == (half, steps) and checks["resumed"].get(
            "agrees", False)
    bf16, fp32 = checks.get("full", {}).get("agrees"), checks.get("fp32", {}).get("agrees")
    checks["verdict"] = ("agrees" if bf16 else "bf16 arithmetic" if bf16 is False and fp32 else
                         "differs" if bf16 is False and fp32 is False else None)
    return checks


def section_result(results: Results, name: str) -> Results:
    """What a section recorded, also when it failed part way (a failed resume leaves the run before it)."""
    return results["sections"].get(name, {}).get("result", {})


def section_run(results: Results, name: str, key: str = "run") -> Results | None:
    return section_result(results, name).get("runs", {}).get(key)


def summarise(results: Results, sizes: Sizes) -> Results:
    """Every check and derived number, recomputed from the raw records whenever the results are written. Without
    the reference engine's run, the engines are still checked on their own (export, resume) at the floor tolerance."""
    reference_name = results["meta"]["engines"][0]
    reference = section_result(results, f"engine {reference_name}").get("runs", {})
    agreement = (agreement_tolerance(reference["full"], section_run(results, "engine rounding-noise control"))
                 if "full" in reference else None)
    tolerance = agreement["tolerance"] if agreement else BF16_UNIT_ROUNDOFF
    half, steps = sizes.engine_steps // 2, sizes.engine_steps
    return {
        "reference_engine": reference_name,
        "agreement": agreement,
        "engines": {name: engine_checks(section_result(results, f"engine {name}").get("runs", {}), half, steps,
                                        tolerance, reference)
                    for name in results["meta"]["engines"] if f"engine {name}" in results["sections"]},
        "options": option_checks(results, reference["full"], tolerance) if "full" in reference else {},
        "throughput": throughput_summary(section_result(results, "throughput")),
    }


def option_checks(results: Results, eager: Results, tolerance: float) -> Results:
    """--torch_compile (and its CUDA-graph mode) must agree with the eager run within the bf16 tolerance; the device
    decoder sees other pixels and crops, so its run must only train as much (loss drop within 25% of the eager's)."""
    checks: Results = {}
    for name in ("torch_compile", "compile_reduce_overhead"):
        if run := section_run(results, f"option {name}"):
            checks[name] = run_checks(run, tolerance, eager)
    if run := section_run(results, "option decode_on"):
        drops = [run_["probe_start"] - run_["probe_end"] for run_ in (run, eager)]
        checks["decode_on"] = {**run_checks(run, tolerance, None), "loss_drop": drops[0], "eager_loss_drop": drops[1],
                               "skipped_images": run["results"]["skipped_images"],
                               "trains_alike": abs(drops[0] - drops[1]) <= 0.25 * abs(drops[1])}
    return checks


def throughput_summary(record: Results) -> Results:
    """Each path's img/s against (a), and the CPU cores per GPU each path needs for 90% of (a)."""
    synthetic = record.get("synthetic")
    if not synthetic:
        return {}
    model_rate = synthetic["images_per_s"]
    paths = {name: value for name, value in record.items() if name.startswith(("workers_", "decode_on_"))}
    summary: Results = {"model_images_per_s": model_rate,
                        "of_model": {name: value["training"]["images_per_s"] / model_rate
                                     for name, value in paths.items()}}
    worker_paths = sorted((value["workers"], value) for name, value in paths.items() if name.startswith("workers_"))
    if worker_paths:
        workers, least_contended = worker_paths[0]
        per_core = least_contended["loader_alone"]["images_per_s"] / workers
        summary["worker_images_per_s_per_core"] = per_core
        summary["cores_for_90_percent"] = math.ceil(0.9 * model_rate / per_core) + 1  # + the training process
        reaching = [w for w, value in worker_paths if value["training"]["images_per_s"] >= 0.9 * model_rate]
        summary["fewest_workers_reaching_90_percent"] = reaching[0] if reaching else None
    return summary


# ------------------------------------------------------------------------------------------------------- markdown


def percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def engine_rows(results: Results) -> list[str]:
    summary = results["summary"]
    rows = []
    for name in results["meta"]["engines"]:
        section = results["sections"].get(f"engine {name}")
        if section is None:
            continue
        runs, checks = section["result"].get("runs", {}), summary.get("engines", {}).get(name, {})
        if "full" in runs:
            rows.append(engine_row(name, runs, checks))
        else:
            rows.append(f"| {name} | {section['status']}: {section.get('reason') or section.get('error', '')} "
                        "| | | | | | |")
    return rows


def verdict(ok: bool | None, good: str = "ok", bad: str = "**differs**") -> str:
    return "-" if ok is None else good if ok else bad


def loss_cell(run: Results | None, checks: Results, key: str = "probe_end", rel: str = "vs_reference_rel",
              ok: str = "agrees") -> str:
    """A probe loss with its relative difference to the reference and the verdict, e.g. `1.18388 (0.035%, ok)`."""
    if run is None:
        return "-"
    return f"{run[key]:.5f} ({percent(checks.get(rel), 3)}, {verdict(checks.get(ok))})"


def engine_row(name: str, runs: Results, checks: Results) -> str:
    """One engine: precision, checkpoint + resume, export reload, the loss before and after training in bf16 and in
    fp32 against the reference engine's, and the verdict."""
    full, own, resumed = runs["full"], checks["full"], checks.get("resumed")
    state = verdict(checks.get("checkpoints_ok") and checks.get("resume_ok"), "yes", "**no**") + (
        f" (resumed {percent(resumed.get('vs_reference_rel'), 3)} from uninterrupted)" if resumed else " (no resume)")
    weights = full["compute_dtype"].replace("torch.", "") + (" + autocast" if full["autocast"] else "")
    return (f"| {name} | {weights} | {state} | {full['probe_end']:.5f} / {full['probe_export']:.5f} "
            f"({verdict(own['export_reload_ok'])}) | {loss_cell(full, own, 'probe_start', 'initial_rel', 'same_start')}"
            f" | {loss_cell(full, own)} | {loss_cell(runs.get('fp32'), checks.get('fp32', {}))} | "
            f"{checks.get('verdict') or '-'} |")


def engines_markdown(results: Results) -> list[str]:
    summary, sizes = results["summary"], results["meta"]["sizes"]
    reference, steps = summary["reference_engine"], sizes["engine_steps"]
    lines = [(f"### Engines: {sizes['engine_model']} MAE, {steps} steps of {sizes['engine_batch']} from the shards, "
              "one process each"), "",
             (f"| engine | weights | checkpoint, resume, export | export reloaded: loss engine / export | loss at step"
              f" 0 (vs {reference}) | loss after {steps} steps, bf16 (vs {reference}) | the same in fp32 (vs "
              f"{reference}) | verdict |"),
             "|---|---|---|---|---|---|---|---|", *engine_rows(results), ""]
    agreement = summary.get("agreement")
    if agreement:
        lines += [f"bf16 tolerance {percent(agreement['tolerance'], 2)}: max({AGREEMENT_FACTOR:g} x "
                  f"{percent(agreement['rounding_effect'], 3)}, how far bf16-sized errors in every gradient and "
                  "weight at every step move the reference engine's loss; 2^-8 = 0.39%)"
                  + (" (no control run: the floor only)" if agreement["provisional"] else "")
                  + f"; fp32 tolerance 2^-16 = {percent(FP32_TOLERANCE, 4)}. Training moved the loss by "
                  f"{percent(agreement['signal'], 2)}: "
                  + ("conclusive." if agreement["conclusive"] else "**inconclusive** (tolerance too close)."), ""]
    return lines


def options_markdown(results: Results) -> list[str]:
    checks = results["summary"].get("options", {})
    if not checks:
        return []
    lines = ["### Script options against the eager run", "", "| run | loss after the steps | vs eager | check |",
             "|---|---|---|---|"]
    for name, check in checks.items():
        run = section_run(results, f"option {name}")
        if name == "decode_on":
            outcome = (f"loss drop {check['loss_drop']:.4f} vs {check['eager_loss_drop']:.4f}, "
                       f"{check['skipped_images']} skipped: {verdict(check['trains_alike'])}")
        else:
            outcome = verdict(check["agrees"], "agrees", "**disagrees**")
        lines.append(f"| {' '.join(run['flags'])} | {run['probe_end']:.5f} | "
                     f"{percent(check.get('vs_reference_rel'), 3)} | {outcome}; export "
                     f"{verdict(check['export_reload_ok'])} |")
    return lines + [""]


def throughput_markdown(results: Results) -> list[str]:
    record, summary = section_result(results, "throughput"), results["summary"].get("throughput", {})
    if not summary:
        return []
    model_rate = summary["model_images_per_s"]
    lines = [(f"### End-to-end training throughput: {record['model']} MAE, batch {record['batch_size']}, "
              f"{record['dtype']}, {'compiled' if record['compiled'] else 'eager'}"), "",
             "| input | training img/s | of (a) | loader alone img/s | first batch s |", "|---|---|---|---|---|",
             f"| (a) synthetic tensors on the device | {model_rate:.0f} | 100% | - | - |"]
    for name, share in summary["of_model"].items():
        value = record[name]
        label = (f"(c) decode_on {value['decode_on']}, reader workers: {value['workers']}" if name.startswith("decode")
                 else f"(b) {value['workers']} decoding workers")
        lines.append(f"| {label} | {value['training']['images_per_s']:.0f} | {share:.0%} | "
                     f"{value['loader_alone']['images_per_s']:.0f} | {value['first_batch_s']:.1f} |")
    if "cores_for_90_percent" in summary:
        lines += ["", (f"Decoding workers: {summary['worker_images_per_s_per_core']:.0f} img/s per core; 90% of (a) "
                      f"needs {summary['cores_for_90_percent']} cores per GPU (workers + the training process); "
                      "fewest measured workers reaching it: "
                      f"{summary['fewest_workers_reaching_90_percent'] or 'none of those measured'}.")]
    return lines + [""] + decode_markdown(record) + mfu_markdown(results)


def decode_markdown(record: Results) -> list[str]:
    decode = record.get("decode")
    if not decode:
        return []
    return ["| decode + augment alone, batch of the shards' JPEGs | img/s |", "|---|---|",
            f"| nvjpeg decode (`decode_images_on_device`) | {decode['decode']['images_per_s']:.0f} |",
            f"| on-device augmentation (`augment_on_device`) | {decode['augment']['images_per_s']:.0f} |",
            f"| both | {decode['decode_and_augment']['images_per_s']:.0f} |",
            (f"| CPU fast path (`FastPretrainTransform`), one core | "
            f"{decode['cpu_fast_path_one_core']['images_per_s']:.0f} |"), "",
            (f"Device pixels against the CPU decoder: mean |difference| "
             f"{decode['pixels_vs_cpu_decoder']['mean_abs']:.2f}, max {decode['pixels_vs_cpu_decoder']['max_abs']:.0f}"
             " grey levels."), ""]


def mfu_markdown(results: Results) -> list[str]:
    rows = []
    throughput, modes = section_result(results, "throughput"), section_result(results, "compile modes")
    measured = [("default", throughput.get("synthetic"))] + [(mode, modes.get(mode)) for mode in
                                                            results["meta"]["compile_modes"]]
    for mode, value in measured:
        if value:
            method = value["benchmark_method"]
            rows.append(f"| {mode} | {method['images_per_s']:.0f} | {method['step_ms']:.1f} | "
                        f"{method['tflops_per_s']:.0f} | {percent(method['mfu'])} |")
    if not rows:
        return []
    return ["| torch.compile mode | img/s | step ms | TFLOP/s | MFU |", "|---|---|---|---|---|", *rows, ""]


def markdown(results: Results) -> str:
    meta, environment = results["meta"], section_result(results, "environment")
    device = section_result(results, "throughput").get("device", {}).get("name") or environment.get("gpu") or "-"
    packages = environment.get("packages", {})
    lines = [f"## GPU check: {device}, {meta['started']}", "",
             (f"`{meta['command']}`: {meta['seconds']:.0f} s. torch {packages.get('torch')}, transformers "
             f"{packages.get('transformers')}, accelerate {packages.get('accelerate')}, datasets "
             f"{packages.get('datasets')}, deepspeed {packages.get('deepspeed')}; {environment.get('usable_cores')} "
             f"cores."), ""]
    data = section_result(results, "data")
    if data:
        lines += [(f"Data: {data['train_images']} + {data['validation_images']} JPEGs of {data['width']}x"
                  f"{data['height']} at quality {data['quality']}, mean {data['mean_kb']:.0f} kB "
                  f"({data['min_kb']:.0f}-{data['max_kb']:.0f}), {data['train_shards']} parquet shards of "
                  f"{data['train_rows']} training rows (each image "
                  f"{data['train_rows'] // data['train_images']}x)."), ""]
    lines += engines_markdown(results) + options_markdown(results) + throughput_markdown(results)
    problems = [f"- {name}: {section['status']}: {section.get('reason') or section.get('error')}"
                for name, section in results["sections"].items() if section["status"] in ("failed", "skipped")]
    problems += [f"- {name}: {error['measurement']}: {error['error']}" for name in ("throughput", "compile modes")
                 for error in results["sections"].get(name, {}).get("result", {}).get("errors", [])]
    if problems:
        lines += ["### Failed or skipped", "", *problems, ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- main


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
    wanted = check.args.sections  # by the start of their names; environment and data always: the others read them
    return [entry for entry in listed
            if wanted is None or entry[0] in ("environment", "data") or entry[0].startswith(tuple(wanted))]


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
