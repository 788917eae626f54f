"""The GPU check (`run_scripts/gpu_check.py`) on what a CPU can run: the ImageNet-like data, the engine worker's
probes, checkpoint, resume and export, the checks and the report, and the training options it measures. The GPU
sections skip without CUDA, with the reason in the report; `--device cpu --tiny` is the full dry run
(docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import pathlib
import shutil
import sys
from dataclasses import asdict
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import tiny_config
from PIL import Image

from modeling_mae.arguments import (
    OptimizationArguments,
    PretrainModelArguments,
    RunArguments,
    parse_arguments,
)
from modeling_mae.data.loader import build_dataloader
from modeling_mae.data.sources import DataArguments
from modeling_mae.data.synthetic import (
    imagenet_features,
    natural_jpeg,
    write_imagenet_like,
)
from modeling_mae.data.transforms import pretrain_transform
from modeling_mae.loops.pretraining_setup import build_model
from modeling_mae.loops.pretraining_state import Arguments
from modeling_mae.studies.gpu_check.config import GPU_SIZES
from modeling_mae.studies.gpu_check.probes import export_probe
from modeling_mae.studies.gpu_check.state import Check
from modeling_mae.studies.gpu_check.summary import (
    agreement_tolerance,
    engine_checks,
    relative_difference,
    run_checks,
    throughput_summary,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, REPO / "run_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = sys.modules.get("gpu_check") or _load("gpu_check")
run_mae = sys.modules.get("run_mae") or _load("run_mae")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """ImageNet-like shards of small images (the content is what matters here, not the size): 16 + 8."""
    directory = tmp_path_factory.mktemp("imagenet_like")
    write_imagenet_like(directory, num_train=16, num_validation=8, num_shards=2, size=(64, 48), processes=2)
    return directory


# ------------------------------------------------------------------------------------------------------------ the data


def test_natural_jpegs_are_imagenet_sized_photos() -> None:
    """500x375 at quality 90: about ImageNet's 110 kB mean, RGB, and the same bytes for the same (seed, index)."""
    images = [natural_jpeg(0, index) for index in range(3)]
    for data in images:
        assert 90_000 < len(data) < 135_000
        decoded = Image.open(io.BytesIO(data))
        assert (decoded.format, decoded.mode, decoded.size) == ("JPEG", "RGB", (500, 375))
    assert natural_jpeg(0, 1) == images[1] and len(set(images)) == 3


def test_shards_have_imagenet_columns_and_stream_through_the_loader(shards: pathlib.Path) -> None:
    files = sorted(path.name for path in (shards / "data").iterdir())
    assert files == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet",
                     "validation-00000-of-00001.parquet"]
    table = pq.read_table(shards / "data" / files[0])
    assert str(table.schema.field("image").type) == "struct<bytes: binary, path: string>"
    assert table.num_rows == 8 and table.schema.field("label").type == "int64"
    loader = build_dataloader(DataArguments(dataset_name=str(shards)), "train", pretrain_transform(16), 4, train=True)
    assert loader.num_samples == 16 and len(loader.class_names) == 1000  # the ClassLabel read from the metadata
    batches = list(loader)
    assert len(batches) == 4 and batches[0]["pixel_values"].shape == (4, 3, 16, 16)
    assert all(0 <= label < 1000 for batch in batches for label in batch["labels"].tolist())
    from datasets import load_dataset_builder

    stream = load_dataset_builder(str(shards)).as_streaming_dataset(split="validation")
    assert stream.features == imagenet_features()


# ------------------------------------------------------------------------------------- engine worker and the checks


def worker_flags(shards: pathlib.Path, output_dir: pathlib.Path, model_config: pathlib.Path, *extra: str) -> list[str]:
    return ["--dataset_name", str(shards), "--model_config", str(model_config), "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_train_steps", "4",
            "--warmup_steps", "1", "--learning_rate", "1e-2", "--logging_steps", "1", "--shuffle_buffer_size", "8",
            "--seed", "0", *extra]


def run_worker(record: pathlib.Path, flags: list[str], rounding_noise: bool = False) -> dict[str, Any]:
    try:
        gpu_check.engine_worker(record, flags, rounding_noise)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return json.loads(record.read_text())


@pytest.fixture(scope="module")
def trained(shards, model_config, tmp_path_factory) -> tuple[pathlib.Path, dict[str, Any]]:
    """One engine run as the check launches it, in this process (fp32, no launcher): 4 steps, checkpoint at 2."""
    directory = tmp_path_factory.mktemp("engine")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(directory / "hf_home"))  # the export is loaded as remote code, cached there
        record = run_worker(directory / "full.json",
                            worker_flags(shards, directory / "full", model_config, "--checkpointing_steps", "2"))
    return directory, record


def test_engine_worker_checkpoint_resume_export_and_noise_on_cpu(trained, shards, model_config, tmp_path,
                                                                 hf_home) -> None:
    """The probes see the training move the loss, the export reloads to the engine's loss, the run resumed from its
    checkpoint ends where the uninterrupted one did, and the rounding-noise control ends near it but not on it."""
    directory, full = trained
    resumed = run_worker(tmp_path / "resumed.json", worker_flags(
        shards, tmp_path / "resumed", model_config, "--resume_from_checkpoint", str(directory / "full" / "step_2")))
    noisy = run_worker(tmp_path / "noisy.json", worker_flags(shards, tmp_path / "noisy", model_config), True)
    assert (full["start_step"], full["end_step"], resumed["start_step"], resumed["end_step"]) == (0, 4, 2, 4)
    assert full["checkpoints"] == ["step_2", "step_4"]
    assert (full["compute_dtype"], full["autocast"], full["distributed_type"]) == ("torch.float32", False,
                                                                                  "DistributedType.NO")
    assert full["probe_export"] == full["probe_end"] and resumed["probe_export"] == resumed["probe_end"]
    assert resumed["probe_end"] == pytest.approx(full["probe_end"], rel=1e-6)
    assert abs(full["probe_end"] - full["probe_start"]) > 0.05 * full["probe_start"]  # it trained
    assert noisy["probe_start"] == full["probe_start"]  # the noise comes after each step
    assert 0 < abs(noisy["probe_end"] - full["probe_end"]) < 0.01 * full["probe_end"]
    checks = engine_checks({"full": full, "resumed": resumed}, 2, 4, 2.0**-8, {"full": full})
    assert checks["checkpoints_ok"] and checks["resume_ok"] and checks["full"]["export_reload_ok"]


def test_export_probe_sees_a_wrong_weight(trained, tmp_path, hf_home) -> None:
    """The reload check has teeth: the export with one tensor zeroed gives another loss than the intact export."""
    from safetensors.torch import load_file, save_file

    directory, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(directory / "full", broken, ignore=shutil.ignore_patterns("step_*"))
    weights = load_file(broken / "model.safetensors")
    weights["decoder.pred.weight"].zero_()
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(4, 3, 16, 16, generator=generator)
    noise = torch.rand(4, tiny_config().num_patches, generator=generator)
    losses = [export_probe(folder, pixel_values, noise, torch.float32, False)
              for folder in (directory / "full", broken)]
    assert relative_difference(losses[1], losses[0]) > 2.0**-8


def test_agreement_tolerance_and_verdicts() -> None:
    """Known answers: the tolerance is 3x the rounding-noise effect, floored at 2^-8; conclusive only below half
    the training signal; same start, agreement and reload each judged against their own threshold."""
    reference = {"probe_start": 2.0, "probe_end": 1.0, "probe_export": 1.0}
    noisy = {"probe_start": 2.0, "probe_end": 1.004}
    agreement = agreement_tolerance(reference, noisy)
    assert agreement["rounding_effect"] == pytest.approx(0.004)
    assert agreement["tolerance"] == pytest.approx(0.012) and agreement["signal"] == pytest.approx(0.5)
    assert agreement["conclusive"] and not agreement["provisional"]
    tiny_effect = agreement_tolerance(reference, {"probe_end": 1.0001})
    assert tiny_effect["tolerance"] == 2.0**-8
    assert agreement_tolerance({"probe_start": 1.01, "probe_end": 1.0}, noisy)["conclusive"] is False
    assert agreement_tolerance(reference, None) == {
        "rounding_effect": None, "tolerance": 2.0**-8, "fp32_tolerance": 2.0**-16, "signal": 0.5, "conclusive": True,
        "provisional": True}
    engine = {"probe_start": 2.001, "probe_end": 1.011, "probe_export": 1.0111}
    checks = run_checks(engine, 0.012, reference)
    assert checks["same_start"] and checks["agrees"] and checks["export_reload_ok"]
    assert not run_checks({**engine, "probe_end": 1.013}, 0.012, reference)["agrees"]
    assert not run_checks({**engine, "probe_start": 2.01}, 0.012, reference)["same_start"]
    assert not run_checks({**engine, "probe_export": 1.02}, 0.012, reference)["export_reload_ok"]


@pytest.mark.parametrize("bf16_end, fp32_end, expected", [
    (1.011, 1.0, "agrees"), (1.02, 1.0, "bf16 arithmetic"), (1.02, 1.0001, "differs"), (1.011, None, "agrees"),
    (1.02, None, None)])
def test_engine_verdict_reads_the_fp32_runs(bf16_end, fp32_end, expected) -> None:
    """Outside the bf16 tolerance, the fp32 runs decide: equal (within 2^-16) means bf16 arithmetic, else a bug."""
    reference = {"full": {"probe_start": 2.0, "probe_end": 1.0, "probe_export": 1.0},
                 "fp32": {"probe_start": 2.0, "probe_end": 1.0, "probe_export": 1.0}}
    runs = {"full": {**reference["full"], "probe_end": bf16_end, "probe_export": bf16_end,
                     "checkpoints": ["step_2", "step_4"]}}
    if fp32_end is not None:
        runs["fp32"] = {**reference["fp32"], "probe_end": fp32_end, "probe_export": fp32_end}
    assert engine_checks(runs, 2, 4, 0.012, reference)["verdict"] == expected


def test_throughput_summary_counts_cores_per_gpu() -> None:
    """2 workers give 500 img/s alone: 250 per core; 90% of a 1000 img/s model needs ceil(900 / 250) + 1 = 5 cores."""
    def path(workers: int, alone: float, training: float) -> dict[str, Any]:
        return {"workers": workers, "loader_alone": {"images_per_s": alone}, "training": {"images_per_s": training}}

    record = {"synthetic": {"images_per_s": 1000.0}, "workers_4": path(4, 950.0, 920.0),
              "workers_2": path(2, 500.0, 480.0), "decode_on_cuda": path(2, 3000.0, 700.0)}
    summary = throughput_summary(record)
    assert summary["of_model"] == {"workers_4": 0.92, "workers_2": 0.48, "decode_on_cuda": 0.7}
    assert summary["worker_images_per_s_per_core"] == 250.0 and summary["cores_for_90_percent"] == 5
    assert summary["fewest_workers_reaching_90_percent"] == 4


# ------------------------------------------------------------------------------------- the command, report, options


def test_without_cuda_gpu_sections_are_skipped_with_the_reason(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has a GPU
    monkeypatch.setenv("OUT", str(tmp_path / "out_env"))
    results = gpu_check.main(["--tiny", "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "out"),
                              "--sections", "engine,throughput"])
    sections = results["sections"]
    assert sections["data"]["status"] == "ok" and sections["data"]["result"]["train_images"] == 32
    skipped = [name for name, section in sections.items() if section["status"] == "skipped"]
    assert skipped == ["engines train", "engines resume", "throughput"]
    assert all("CUDA is not available" in sections[name]["reason"] for name in skipped)
    assert "[gpu_check] engines train: skipped in 0.0 s CUDA is not available here" in capsys.readouterr().out
    for directory in ("out", "out_env"):
        report = json.loads((tmp_path / directory / "gpu_check.json").read_text())
        assert report["sections"].keys() == sections.keys()
        assert "- throughput: skipped: CUDA is not available" in (tmp_path / directory / "gpu_check.md").read_text()


def report(tmp_path: pathlib.Path, sections: dict[str, Any]) -> str:
    """The markdown the check writes for these sections (GPU sizes: 8 steps, checkpoint at 4)."""
    args = gpu_check.parse_args(["--output_dir", str(tmp_path)])
    results = {"meta": {"engines": ["single_gpu", "fsdp"], "sizes": asdict(GPU_SIZES),
                        "started": "now", "command": "gpu_check", "monotonic_start": 0.0, "compile_modes": []},
               "sections": sections}
    Check(args, GPU_SIZES, results, math.inf).write()
    assert "report_error" not in json.loads((tmp_path / "gpu_check.json").read_text())
    return (tmp_path / "gpu_check.md").read_text()


ENGINE_RUN = {"probe_start": 2.0, "probe_end": 1.0, "probe_export": 1.0, "compute_dtype": "torch.bfloat16",
              "autocast": False, "images_per_s": 812.0, "checkpoints": ["step_4", "step_8"], "start_step": 0,
              "end_step": 8}
ENGINE_RUNS = {"full": ENGINE_RUN, "resumed": {**ENGINE_RUN, "start_step": 4, "checkpoints": ["step_8"]},
               "fp32": {**ENGINE_RUN, "probe_end": 0.99, "probe_export": 0.99, "checkpoints": []}}


def test_report_lists_engines_tolerance_and_failures(tmp_path) -> None:
    markdown = report(tmp_path, {
        "engine single_gpu": {"status": "ok", "result": {"runs": ENGINE_RUNS}},
        "engine rounding-noise control": {"status": "ok",
                                          "result": {"runs": {"run": {**ENGINE_RUN, "probe_end": 1.002}}}},
        "engine fsdp": {"status": "failed", "error": "full: exit status 1", "result": {}}})
    assert "bf16 tolerance 0.60%: max(3 x 0.200%" in markdown and "conclusive." in markdown
    assert ("| single_gpu | bfloat16 | yes (resumed 0.000% from uninterrupted) | 1.00000 / 1.00000 (ok) | 2.00000 "
            "(0.000%, ok) | 1.00000 (0.000%, ok) | 0.99000 (0.000%, ok) | agrees |") in markdown
    assert "| fsdp | failed: full: exit status 1 |" in markdown
    assert "- engine fsdp: failed: full: exit status 1" in markdown


def test_report_without_the_reference_engine_still_checks_the_others(tmp_path) -> None:
    markdown = report(tmp_path, {
        "engine single_gpu": {"status": "failed", "error": "full: timed out", "result": {}},
        "engine fsdp": {"status": "ok", "result": {"runs": ENGINE_RUNS}}})
    assert "| fsdp | bfloat16 | yes (resumed 0.000% from uninterrupted) | 1.00000 / 1.00000 (ok) | 2.00000 (-, -)" \
        in markdown
    assert "bf16 tolerance" not in markdown and "- engine single_gpu: failed: full: timed out" in markdown


def test_torch_compile_mode_reaches_torch_compile(monkeypatch) -> None:
    compiled: list[dict[str, Any]] = []
    monkeypatch.setattr(torch, "compile", lambda function, **options: compiled.append(options) or function)
    args = Arguments(*parse_arguments(
        (PretrainModelArguments, DataArguments, OptimizationArguments, RunArguments),
        ["--torch_compile", "--torch_compile_mode", "max-autotune-no-cudagraphs"]))
    build_model(args, tiny_config())
    assert compiled == [{"mode": "max-autotune-no-cudagraphs"}]


@pytest.mark.parametrize("flags, message", [
    (["--torch_compile", "--torch_compile_mode", "fastest"],
     ("--torch_compile_mode='fastest' is not allowed: it must be one of default, reduce-overhead, max-autotune, "
     "max-autotune-no-cudagraphs")),
    (["--torch_compile_mode", "reduce-overhead"],
     "--torch_compile_mode='reduce-overhead' is not allowed without --torch_compile"),
])
def test_a_wrong_compile_mode_is_one_line_and_exit_2(flags, message, capsys) -> None:
    from modeling_mae.errors import run_main

    assert run_main(run_mae.main, flags) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error


def test_throughput_child_on_cpu(shards, tmp_path, monkeypatch) -> None:
    """The throughput measurements in their child process's code, on the CPU with the tiny model: every path
    measured, the device path decoding with torchvision on the CPU."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(shards, target_is_directory=True)
    record = tmp_path / "throughput.json"
    gpu_check.main(["--role", "throughput", "--record", str(record), "--device", "cpu", "--tiny", "--work_dir",
                    str(work), "--loader_workers", "1", "--no-compile"])
    measured = json.loads(record.read_text())
    assert measured["errors"] == [] and measured["skipped"] == []
    assert {"synthetic", "decode", "decode_on_cpu", "workers_1"} <= measured.keys()
    assert measured["decode"]["pixels_vs_cpu_decoder"] == {"mean_abs": 0.0, "max_abs": 0.0}  # the same decoder
    assert all(measured[name]["training"]["images_per_s"] > 0 for name in ("decode_on_cpu", "workers_1"))
    assert throughput_summary(measured)["cores_for_90_percent"] >= 2
