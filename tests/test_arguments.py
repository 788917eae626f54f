"""Every flag is checked when the command line is parsed: numbers against their range, local paths for existence; a
mistake is one line naming the flag, the value and what is allowed, with exit status 2 and no traceback."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import pathlib
import re
import subprocess
import sys
import types
import typing

import huggingface_hub
import psutil
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import tiny_config, use_hub
from transformers import ViTConfig, ViTModel

from modeling_mae import MAEConfig, MAEForPreTraining, arguments
from modeling_mae.arguments import (
    OptimizationArguments,
    PretrainModelArguments,
    Range,
    RunArguments,
    load_model_config,
    parse_arguments,
)
from modeling_mae.configuration_mae import load_config
from modeling_mae.data.loader import build_dataloader
from modeling_mae.data.sources import DataArguments
from modeling_mae.errors import EXIT_USAGE, UsageError, run_main
from modeling_mae.evaluation.arguments import (
    AugmentationArguments,
    FinetuneModelArguments,
    FinetuneOptimizationArguments,
    FinetuneRunArguments,
    KnnArguments,
    LinearProbeArguments,
    VisualizeArguments,
)
from modeling_mae.modeling_mae import MAELayer
from run_scripts.evidence import EvidenceArguments
from run_scripts.run_finetune import main as finetune_main
from run_scripts.run_knn import main as knn_main
from run_scripts.run_linear_probe import main as linear_probe_main
from run_scripts.run_mae import main as pretrain_main
from run_scripts.scaling_study import StudyArguments

REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = (PretrainModelArguments, DataArguments, OptimizationArguments, RunArguments)
# Every argument dataclass a script parses (run_knn and run_linear_probe also parse ModelArguments + DataArguments).
ALL_ARGUMENTS = (*PRETRAIN, KnnArguments, LinearProbeArguments, FinetuneModelArguments, AugmentationArguments,
                 FinetuneOptimizationArguments, FinetuneRunArguments, VisualizeArguments, EvidenceArguments,
                 StudyArguments)
REQUIRED = {VisualizeArguments: ["--model_name_or_path", __file__],  # a file that exists (visualize takes a .pth)
            StudyArguments: ["--budget", "smoke"]}


def numeric_fields(cls: type) -> list[str]:
    """Fields of type int or float, optional or in a list (bool is no number here)."""
    hints = typing.get_type_hints(cls)
    names = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        args = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) or typing.get_origin(hint) else {hint}
        args |= {inner for arg in list(args) for inner in typing.get_args(arg)}  # list[float]
        if args & {int, float}:
            names.append(field.name)
    return names


PAIRED = {"image_mean": ["--image_std", "1"], "image_std": ["--image_mean", "0"]}  # flags that go with another


def outside(allowed: Range) -> float:
    """A value just outside the range (NaN for a range of every finite number)."""
    if allowed.low is None and allowed.high is None:
        return math.nan
    if allowed.low is not None:
        return allowed.low if allowed.low_open else allowed.low - 1
    return allowed.high if allowed.high_open else allowed.high + 1


@pytest.mark.parametrize("cls", ALL_ARGUMENTS, ids=lambda cls: cls.__name__)
def test_every_numeric_flag_has_a_range(cls: type) -> None:
    assert set(numeric_fields(cls)) == set(getattr(cls, "FLAG_RANGES", {})), "add the new flag to FLAG_RANGES"


@pytest.mark.parametrize(("cls", "name"), [(cls, name) for cls in ALL_ARGUMENTS for name in numeric_fields(cls)],
                         ids=lambda value: getattr(value, "__name__", value))
def test_a_value_outside_a_flags_range_is_a_one_line_usage_error(cls: type, name: str) -> None:
    allowed = cls.FLAG_RANGES[name]
    with pytest.raises(UsageError) as raised:
        parse_arguments((cls,), [*REQUIRED.get(cls, []), *PAIRED.get(name, []), f"--{name}", f"{outside(allowed):g}"])
    assert str(raised.value).startswith(f"--{name}=") and str(raised.value).endswith(f" is not allowed: it must be "
                                                                                      f"{allowed}")
    parse_arguments((cls,), REQUIRED.get(cls, []))  # the defaults are allowed


@pytest.mark.parametrize(("flag", "value", "rule"), [
    ("--per_device_train_batch_size", "0", ">= 1"),
    ("--learning_rate", "-0.0001", ">= 0"),
    ("--base_learning_rate", "nan", ">= 0"),
    ("--mask_ratio", "1.0", "in [0, 1)"),
    ("--num_train_epochs", "0", "> 0"),
    ("--warmup_steps", "-1", ">= 0"),
    ("--logging_steps", "0", ">= 1"),
    ("--dataloader_num_workers", "-2", ">= 0"),
    ("--max_bad_image_fraction", "1.5", "in [0, 1]"),
])
def test_the_pretraining_flags_users_get_wrong(flag: str, value: str, rule: str) -> None:
    with pytest.raises(UsageError, match=rf"^{flag}=[-+\w.]+ is not allowed: it must be {re.escape(rule)}$"):
        parse_arguments(PRETRAIN, [flag, value])


def test_a_yaml_config_is_checked_like_the_command_line(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("gradient_accumulation_steps: 0\n")
    with pytest.raises(UsageError, match=r"^--gradient_accumulation_steps=0 is not allowed: it must be >= 1$"):
        parse_arguments(PRETRAIN, ["--config", str(config)])
    with pytest.raises(UsageError, match=rf"^--config: file does not exist: {tmp_path / 'nope.yaml'}$"):
        parse_arguments(PRETRAIN, ["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("value", ["0", "-3", "ten", "epochs"])
def test_checkpointing_steps_is_checked_at_parse_time(value: str) -> None:
    with pytest.raises(UsageError, match=rf"^--checkpointing_steps='{value}' is not allowed: it must be an integer"):
        parse_arguments(PRETRAIN, ["--checkpointing_steps", value])
    assert parse_arguments(PRETRAIN, ["--checkpointing_steps", "epoch"])[3].checkpoint_every_epoch()


# --- Local paths ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "kind"), [
    ("--model_name_or_path", "outputs/mae-pretrain", "folder"),  # its parent, outputs/, exists here
    ("--model_name_or_path", "./mae-pretrain", "folder"),
    ("--model_name_or_path", "runs/a/mae-pretrain", "folder"),  # more than one "/"
    ("--model_name_or_path", "mae_pretrain_vit_base.pth", "file"),
    ("--model_config", "/nonexistent/config.json", "file"),
    ("--model_config", "configs/vit.yaml", "file"),
    ("--dataset_name", "../imagenet", "folder"),
])
def test_a_missing_local_path_is_named_instead_of_looked_up_on_the_hub(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, flag: str, value: str, kind: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    absolute = pathlib.Path(value).absolute()
    with pytest.raises(UsageError) as raised:
        parse_arguments((VisualizeArguments if "pth" in value else PretrainModelArguments, DataArguments),
                        [flag, value] if "pth" not in value else ["--model_name_or_path", value])
    assert str(raised.value) == f"{flag} {value}: {kind} does not exist: {absolute}"


def test_hub_ids_and_presets_pass_the_path_check(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, hub_server
) -> None:
    monkeypatch.chdir(tmp_path)  # no folder named facebook/ or ILSVRC/ here
    hub_server.models = {"facebook/vit-mae-base"}
    model, data, *_ = parse_arguments(PRETRAIN, ["--model_name_or_path", "facebook/vit-mae-base", "--model_config",
                                                 "base", "--dataset_name", "ILSVRC/imagenet-1k"])
    assert (model.model_name_or_path, data.dataset_name) == ("facebook/vit-mae-base", "ILSVRC/imagenet-1k")
    with pytest.raises(UsageError, match=r"^--model_config bsae: no such preset \(tiny-32px, tiny, small, base"):
        parse_arguments(PRETRAIN, ["--model_config", "bsae"])


def cache_model(monkeypatch: pytest.MonkeyPatch, hub_cache: pathlib.Path, repo_id: str) -> None:
    """A Hub cache (HF_HUB_CACHE) holding `repo_id`'s config.json, as a download leaves it."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_offline_a_model_name_must_be_a_folder_or_in_the_hub_cache(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`outputs/mae-pretrain` run from a folder without outputs/: it looks like a Hub id, and offline none can load."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UsageError) as raised:
        parse_arguments(PRETRAIN, ["--model_name_or_path", "outputs/mae-pretrain"])
    assert str(raised.value) == (f"--model_name_or_path outputs/mae-pretrain: no such local folder ({tmp_path}/outputs/"
                                 "mae-pretrain), and the Hub is offline (HF_HUB_OFFLINE=1) with no cached model of "
                                 "that name")
    cache_model(monkeypatch, tmp_path / "hub", "outputs/mae-pretrain")
    assert parse_arguments(PRETRAIN, ["--model_name_or_path", "outputs/mae-pretrain"])[0].model_name_or_path


def test_online_a_model_name_must_be_a_folder_or_a_model_on_the_hub(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, hub_server
) -> None:
    """The same mistake with the Hub online, as a new user has it: the Hub answers 404 for that name (one request,
    instead of transformers' 60-line traceback), or cannot be reached (79 lines after half a minute of retries);
    a model already in the Hub cache still loads then."""
    monkeypatch.chdir(tmp_path)
    missing = f"--model_name_or_path outputs/mae-pretrain: no such local folder ({tmp_path}/outputs/mae-pretrain), and"
    for flag in ("--model_name_or_path", "--model_config"):
        with pytest.raises(UsageError) as raised:
            parse_arguments(PRETRAIN, [flag, "outputs/mae-pretrain"])
        assert str(raised.value) == (f"{missing.replace('--model_name_or_path', flag)} the Hub "
                                     f"({huggingface_hub.constants.ENDPOINT}) has no model of that name (a private "
                                     "one needs `hf auth login`)")

    use_hub(monkeypatch, "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(UsageError) as raised:
        parse_arguments(PRETRAIN, ["--model_name_or_path", "outputs/mae-pretrain"])
    assert str(raised.value) == (f"{missing} the Hub (http://127.0.0.1:9) could not be reached (ConnectError: [Errno "
                                 "111] Connection refused), with no cached model of that name")
    cache_model(monkeypatch, tmp_path / "hub", "outputs/mae-pretrain")
    assert parse_arguments(PRETRAIN, ["--model_name_or_path", "outputs/mae-pretrain"])[0].model_name_or_path


def test_a_dataset_name_that_is_neither_a_folder_nor_on_the_hub_is_one_line(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, hub_server
) -> None:
    """`--dataset_name data/imagenet` run from a folder without data/: the Hub has no such dataset, or is offline
    (a 33-line ConnectionError traceback before)."""
    monkeypatch.chdir(tmp_path)
    missing = f"--dataset_name data/imagenet: no such local folder ({tmp_path}/data/imagenet), and"
    with pytest.raises(UsageError) as raised:
        build_dataloader(DataArguments(dataset_name="data/imagenet"), "train", lambda image: image, 2, train=True)
    assert str(raised.value) == (f"{missing} the Hub ({huggingface_hub.constants.ENDPOINT}) has no dataset of that "
                                 "name, or none you can access: for a gated dataset such as ILSVRC/imagenet-1k, "
                                 "accept its terms on the Hub and log in (`hf auth login`)")
    monkeypatch.undo()  # offline, as the tests run
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as raised:
        build_dataloader(DataArguments(dataset_name="data/imagenet"), "train", lambda image: image, 2, train=True)
    assert str(raised.value) == f"{missing} the Hub is offline (HF_HUB_OFFLINE=1) with no cached dataset of that name"


def test_a_config_file_is_no_model_folder(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model_name_or_path run/config.json` (transformers would unpickle it: a 34-line torch.load traceback)."""
    tiny_config().save_pretrained(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as raised:
        parse_arguments(PRETRAIN, ["--model_name_or_path", "run/config.json"])
    assert str(raised.value) == (f"--model_name_or_path run/config.json: a file, not a model folder: pass the folder "
                                 f"that holds it ({tmp_path}/run), or a config alone as --model_config (random init)")


def script_error(main: typing.Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """What a script prints to stderr when it exits with status 2 (`run_main`, as `python script.py` runs it)."""
    try:
        assert run_main(main, argv) == EXIT_USAGE
    finally:  # the scripts build an Accelerator: the next one must start clean
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "problem"), [
    ("no_such_field=3", r"unknown config field\(s\) \['no_such_field'\]; known fields: \[.*\]"),
    ("patch_size=0", r"patch_size \(0, 0\) must divide image_size \(16, 16\)"),
    ("num_attention_heads=3", "num_attention_heads=3 must divide hidden_size=32"),
    ("hidden_size", "config override 'hidden_size' is not of the form key=value"),
    ("mask_ratio=abc", "'<=' not supported between instances of 'float' and 'str'"),
    ("layer_norm_eps=-1", "layer_norm_eps must be a positive number, got -1"),  # was NaN, then "lower the lr"
    ("hidden_act=swish2", "hidden_act 'swish2' is no activation of transformers; one of gelu, gelu_10, .*, xielu"),
])
@pytest.mark.parametrize("main", [pretrain_main, finetune_main, knn_main, linear_probe_main],
                         ids=["run_mae", "run_finetune", "run_knn", "run_linear_probe"])
def test_a_config_override_mistake_is_one_line(
    main, overrides: str, problem: str, model_config: pathlib.Path, tmp_path: pathlib.Path, capsys
) -> None:
    """MAEConfig validates itself when built and raises ValueError (it travels as Hub remote code, without our
    errors); each script turns that into one line naming the config and the overrides, before reading any data."""
    argv = ["--model_config", str(model_config), "--config_overrides", overrides, "--output_dir", str(tmp_path)]
    assert re.fullmatch(
        rf"error: the model config \({re.escape(str(model_config))} with --config_overrides {overrides}\) cannot "
        rf"build a model: {problem}\n",
        script_error(main, argv, capsys),
    )


SCRIPTS = pytest.mark.parametrize("main", [pretrain_main, finetune_main, knn_main, linear_probe_main],
                                  ids=["run_mae", "run_finetune", "run_knn", "run_linear_probe"])


@SCRIPTS
def test_a_model_of_other_channels_than_the_data_is_refused_in_one_line_naming_both(
    main, model_config: pathlib.Path, data_dir: pathlib.Path, tmp_path: pathlib.Path, capsys
) -> None:
    """RGB images for a 2-channel model: refused before any training (it failed at its first batch before)."""
    argv = ["--model_config", str(model_config), "--config_overrides", "num_channels=2", "--dataset_name",
            str(data_dir), "--output_dir", str(tmp_path)]
    error = script_error(main, argv, capsys)
    assert re.fullmatch(r"error: The train split's images have 3 channels, and the model's config num_channels=2 "
                        r"\(first records: .*\): convert the images, or use a config with num_channels=3\.\n", error)


def test_a_model_too_big_for_the_machine_is_refused_with_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine whose memory holds tiny-32px's training state, 16 bytes a parameter (float32 weights, gradients,
    AdamW's two moments), but not with a 7th block. The counts are those of built models. Before, the sizes users get
    wrong were allocation tracebacks (image_size 10^6, hidden_size 4*10^6) or a machine out of memory (10^6 blocks)."""
    config = MAEConfig.from_preset("tiny-32px")
    block = MAELayer(config, config.hidden_size, config.num_attention_heads, config.intermediate_size)
    six_blocks = sum(parameter.numel() for parameter in MAEForPreTraining(config).parameters())
    seven_blocks = six_blocks + sum(parameter.numel() for parameter in block.parameters())
    memory = 16 * (six_blocks + seven_blocks) // 2
    monkeypatch.setattr(arguments, "machine_memory_bytes", lambda: memory)
    assert load_model_config("tiny-32px").num_hidden_layers == 6
    with pytest.raises(UsageError) as raised:
        load_model_config("tiny-32px", "num_hidden_layers=7")
    assert str(raised.value) == (
        f"the model config (tiny-32px with --config_overrides num_hidden_layers=7) cannot build a model: its "
        f"{seven_blocks:,} parameters need {16 * seven_blocks / 2**20:.1f} MiB for their float32 weights, gradients "
        f"and AdamW states, more than the {memory / 2**20:.1f} MiB of memory here (RAM and GPUs, on every machine of "
        "the run)"
    )


def test_the_memory_of_a_run_is_that_of_its_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    """RAM and GPUs of this machine, times the machines of the run (2 under torchrun with 4 processes, 2 a machine)."""
    gpus = sum(torch.cuda.get_device_properties(index).total_memory for index in range(torch.cuda.device_count()))
    one_machine = psutil.virtual_memory().total + gpus
    assert arguments.machine_memory_bytes() == one_machine
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert arguments.machine_memory_bytes() == 2 * one_machine


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A plain transformers ViT, as `ViTModel(config).save_pretrained` writes it (with its pooler)."""
    folder = tmp_path_factory.mktemp("vit")
    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("main", "flags"), [
    (pretrain_main, []), (pretrain_main, ["--model_config", "tiny-32px"]), (finetune_main, []), (knn_main, []),
], ids=["run_mae", "run_mae_with_a_model_config", "run_finetune", "run_knn"])
def test_a_transformers_vit_is_refused_with_the_command_that_converts_it(
    main, flags: list[str], vit_folder: pathlib.Path, tmp_path: pathlib.Path, capsys
) -> None:
    """Its weights loaded into nothing: the run trained from random weights, exited 0, and its config.json and model
    card said it started from that folder."""
    output = tmp_path / "run"
    argv = ["--model_name_or_path", str(vit_folder), *flags, "--output_dir", str(output)]
    assert script_error(main, argv, capsys) == (
        f"error: {vit_folder} holds a 'vit' model, not an MAE one (model_type 'mae'): convert it first with `python "
        f"run_scripts/convert_checkpoint.py --source {vit_folder} --output_dir FOLDER` (transformers ViT and ViTMAE, "
        "timm and the official MAE checkpoints), then pass FOLDER\n"
    )
    assert not {"config.json", "README.md", "all_results.json"} & {path.name for path in output.glob("*")}


@SCRIPTS
def test_a_model_folder_without_weights_is_refused_when_parsed(main, tmp_path: pathlib.Path, capsys) -> None:
    """A config alone (transformers: an OSError traceback, "no file named model.safetensors")."""
    folder = tmp_path / "config-only"
    tiny_config().save_pretrained(folder)
    assert script_error(main, ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path)], capsys) == (
        f"error: --model_name_or_path {folder}: the folder holds a config.json but no weights (model.safetensors or "
        "pytorch_model.bin, or a sharded index of either): pass the folder a run exported its model to (its "
        "--output_dir; a step_N checkpoint only resumes), or this config alone as --model_config (random init)\n"
    )


class PicklePayload:
    """What a malicious `pytorch_model.bin` holds: a call that runs when the file is unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@SCRIPTS
def test_a_pickle_payload_is_never_run_and_named_in_one_line(main, tmp_path: pathlib.Path, capsys) -> None:
    """transformers loads `pytorch_model.bin` with torch's weights-only unpickler, which refuses the payload: an
    UnpicklingError traceback before; one line naming the file, what it holds and what to do now."""
    folder, marker = tmp_path / "model", tmp_path / "payload-ran"
    MAEForPreTraining(tiny_config()).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"mae.embeddings.cls_token": PicklePayload(marker)}, folder / "pytorch_model.bin")
    error = script_error(main, ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "run")], capsys)
    assert error == (
        f"error: {folder}/pytorch_model.bin holds pickled code ({os.system.__module__}.system), which is never run "
        "here: nothing was loaded. Only if you trust where it comes from, load it with torch.load(..., "
        "weights_only=False) and save the model again with save_pretrained (safetensors)\n"
    )
    assert not marker.exists()


def test_load_config_names_a_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match=r"model config '/nonexistent/config.json': file does not exist: "
                                                r"/nonexistent/config.json$"):
        load_config("/nonexistent/config.json")


# --- Through a real process ----------------------------------------------------------------------------------------


def test_a_mistake_exits_2_with_one_line_and_no_traceback(tmp_path: pathlib.Path) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    command = [sys.executable, str(REPO / "run_scripts" / "run_mae.py"), "--per_device_train_batch_size", "0"]
    completed = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr == "error: --per_device_train_batch_size=0 is not allowed: it must be >= 1\n"


def test_an_evaluation_script_names_a_missing_model_folder(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_main(knn_main, ["--model_name_or_path", "./outputs/mae-pretrain"]) == EXIT_USAGE
    assert capsys.readouterr().err == (f"error: --model_name_or_path ./outputs/mae-pretrain: folder does not exist: "
                                       f"{tmp_path}/outputs/mae-pretrain\n")


def boolean_fields(cls: type) -> list[str]:
    """Fields of type bool or `bool | None` (None: keep the model config's value)."""
    hints = typing.get_type_hints(cls)
    return [field.name for field in dataclasses.fields(cls) if hints[field.name] in (bool, bool | None)]


BOOLEAN_FLAGS = [(cls, name) for cls in ALL_ARGUMENTS for name in boolean_fields(cls)]


@pytest.mark.parametrize(("cls", "name"), BOOLEAN_FLAGS, ids=lambda value: getattr(value, "__name__", value))
def test_every_boolean_flag_takes_the_bare_form_a_value_and_its_negation(cls: type, name: str) -> None:
    def parsed(*flags: str) -> bool | None:
        return getattr(parse_arguments((cls,), [*REQUIRED.get(cls, []), *flags])[0], name)

    assert (parsed(f"--{name}"), parsed(f"--{name}", "true"), parsed(f"--{name}", "false")) == (True, True, False)
    if next(field.default for field in dataclasses.fields(cls) if field.name == name) is True:
        assert parsed(f"--no_{name}") is False


def test_an_optional_boolean_flag_is_none_unless_given() -> None:
    """`--norm_pix_loss` (bool | None) keeps the model config's value when absent, and takes the bare form too."""
    assert (PretrainModelArguments, "norm_pix_loss") in BOOLEAN_FLAGS
    model, data = parse_arguments((PretrainModelArguments, DataArguments), ["--norm_pix_loss", "--fast_decode"])
    assert (model.norm_pix_loss, data.fast_decode) == (True, True)  # the bare flag does not take the next one
    assert parse_arguments((PretrainModelArguments,), [])[0].norm_pix_loss is None


SCRIPTS = sorted(path.stem for path in (REPO / "run_scripts").glob("*.py"))


def help_entries(text: str) -> list[str]:
    """The help of each option in `--help`'s output, its lines joined."""
    entries: list[str] = []
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif entries:
            entries[-1] += " " + line.strip()
    return entries


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_scripts_help_starts_with_its_docstring_and_says_each_default_once(
    script: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module(f"run_scripts.{script}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\noptions:\n", 1)[0]
    assert module.__doc__.strip() in description  # what it does, and example commands, before the flags
    for entry in help_entries(text):
        assert len(re.findall("default:", entry, re.IGNORECASE)) <= 1, entry
        assert not entry.startswith("--no_") or "Same as --" in entry, entry  # the negation has its own text


LIGHT_IMPORTS = """
import sys
import modeling_mae.arguments, modeling_mae.data.sources, modeling_mae.errors, modeling_mae.evaluation.metrics
heavy = {"torch", "datasets", "pyarrow", "evaluate", "accelerate"} & set(sys.modules)
assert not heavy, f"a module of flags imported {heavy}: every script's --help would take seconds"
from modeling_mae import MAEConfig
from transformers import AutoConfig
assert type(AutoConfig.for_model(MAEConfig.model_type)) is MAEConfig, "a name of the package registers the Auto classes"
"""


def test_the_flags_import_without_torch_and_a_model_name_registers_the_auto_classes() -> None:
    subprocess.run([sys.executable, "-c", LIGHT_IMPORTS], check=True, cwd=REPO, timeout=120)


def test_ranges_read_like_maths() -> None:
    assert [str(rule) for rule in (Range(low=1), Range(low=0, low_open=True), Range(0, 1, high_open=True))] == [
        ">= 1", "> 0", "in [0, 1)"]
    assert not Range(low=0).admits(math.inf) and not Range(low=0).admits(True) and Range(0, 1).admits(1)
