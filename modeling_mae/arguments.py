"""Command-line arguments of the training scripts: HF-style snake_case flags grouped in dataclasses.

Defaults live in the dataclasses; `--config FILE.yaml` (a flat mapping of the same flag names) overrides them, and
flags given on the command line override the file. The pretraining and fine-tuning scripts share
`ModelArguments`, `OptimizationArguments`, `RunArguments` and `parse_arguments`; each adds its own fields by
subclassing (see `PretrainModelArguments`).

The module imports no torch, so that `--help` answers at once: `configuration_mae` (transformers' PretrainedConfig
imports torch) is imported by the functions that check or load a model config, once the command line is parsed.

Every numeric flag is checked when the command line is parsed: each argument dataclass lists the values its flags
accept in a `FLAG_RANGES` class variable (subclasses inherit it), and a flag that names a local path
(`LOCAL_PATH_FLAGS`) must exist; a model name that is no local path must be a model on the Hub (one request, or the
Hub cache when the Hub is offline or cannot be reached). A wrong value is a `UsageError`: one line naming the flag,
the value and what is allowed, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import huggingface_hub
import yaml
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HFValidationError
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool
from transformers.utils import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .errors import UsageError, describe

if TYPE_CHECKING:
    from .configuration_mae import MAEConfig

CONFIG_FLAG = "--config"
DEFAULT_MODEL_CONFIG = "tiny-32px"  # the model every script builds when given none: sized for the sample
RUN_CONFIG_FILE = "run_config.yaml"  # the resolved configuration, saved with each run
SECRET_FIELDS = ("hub_token",)
IMAGE_STATS_CHOICES = ("config", "imagenet", "auto")
TRAINING_BYTES_PER_PARAMETER = 4 * 4  # float32 weight, its gradient and AdamW's two moments
# The weights files that `from_pretrained` reads.
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts: an interval, closed unless `low_open` / `high_open`; never NaN or inf."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"


FINITE = Range()
AT_LEAST_ONE = Range(low=1)
NON_NEGATIVE = Range(low=0)
POSITIVE = Range(low=0, low_open=True)
FRACTION = Range(low=0, high=1, high_open=True)  # [0, 1): mask ratio, drop path, label smoothing
PROBABILITY = Range(low=0, high=1)
SEED = Range(low=0, high=2**32 - 1)  # numpy's seed range (accelerate's set_seed seeds numpy too)


@dataclass
class ModelArguments:
    """Which model to build and from what, and the statistics its pixels are normalised with."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {"image_stats_images": AT_LEAST_ONE, "image_mean": FINITE,
                                                "image_std": POSITIVE}

    model_config: str | None = field(
        default=None,
        metadata={
            "help": "A preset name (tiny-32px, tiny, small, base, large, huge), or a config.json file or a folder "
            "holding one. Default: the config of --model_name_or_path, else the script's default preset."
        },
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from these weights (local folder or Hub id) instead of a random init."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": 'Config fields to override, "key=value,key=value" (e.g. "drop_path_rate=0.1").'}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": 'Attention kernel: "sdpa" or "eager" (default: the library\'s choice).'}
    )
    image_stats: str | None = field(
        default=None,
        metadata={"help": 'The per-channel mean and std pixels are normalised with, written into the model config and '
                          'its exported image processor: "config" (the model config\'s: ImageNet\'s for RGB), '
                          '"imagenet", "auto" (computed from up to --image_stats_images train images), or a JSON '
                          'file of run_scripts/image_stats.py. Default: auto for a new model of other than 3 '
                          'channels, else config.'},
    )
    image_stats_images: int = field(default=10_000, metadata={"help": "Train images --image_stats auto reads."})
    image_mean: list[float] | None = field(
        default=None, metadata={"help": "Per-channel mean, on the data's scale (8-bit / 255, 16-bit / 65535)."}
    )
    image_std: list[float] | None = field(default=None, metadata={"help": "Per-channel std, with --image_mean."})

    def __post_init__(self) -> None:
        problem = image_statistics_problem(self.image_stats, self.image_mean, self.image_std)
        if problem is not None:
            raise UsageError(problem)
        path = pathlib.Path(self.model_name_or_path or "").expanduser()
        if self.model_name_or_path and path.is_file():  # e.g. its config.json: from_pretrained fails on a file
            raise UsageError(
                f"--model_name_or_path {self.model_name_or_path}: a file, not a model folder: pass the folder that "
                f"holds it ({path.absolute().parent}), or a config alone as --model_config (random init)"
            )


@dataclass
class PretrainModelArguments(ModelArguments):
    """`ModelArguments` plus the two pretraining knobs the paper ablates (None keeps the model config's value)."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {**ModelArguments.FLAG_RANGES, "mask_ratio": FRACTION}

    mask_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of patches removed (paper: 0.75). Default: the model config's."}
    )
    norm_pix_loss: bool | None = field(
        default=None,
        metadata={"help": "Regress per-patch normalised pixels (paper's better target). Default: the model config's."},
    )


@dataclass
class OptimizationArguments:
    """The recipe: batch, AdamW, learning-rate schedule, length, numerics."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "per_device_train_batch_size": AT_LEAST_ONE, "per_device_eval_batch_size": AT_LEAST_ONE,
        "gradient_accumulation_steps": AT_LEAST_ONE, "base_learning_rate": NON_NEGATIVE,
        "learning_rate": NON_NEGATIVE, "min_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
        "adam_beta1": FRACTION, "adam_beta2": FRACTION, "adam_epsilon": POSITIVE, "num_train_epochs": POSITIVE,
        "max_train_steps": NON_NEGATIVE,  # 0: export the starting weights (e.g. a converted checkpoint) untrained
        "warmup_epochs": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "max_grad_norm": POSITIVE,
        "max_consecutive_nonfinite": AT_LEAST_ONE,
    }

    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per process per micro-batch."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Images per process per validation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    base_learning_rate: float = field(
        default=1.5e-3,
        metadata={
            "help": "Learning rate per 256 images: lr = base_learning_rate * effective_batch / 256 (paper: 1.5e-4)."
        },
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "Absolute peak learning rate; overrides the base_learning_rate scaling."}
    )
    min_lr: float = field(default=0.0, metadata={"help": "Floor of the cosine decay."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on biases and 1-D weights)."})
    adam_beta1: float = 0.9
    adam_beta2: float = field(default=0.95, metadata={"help": "The paper's 0.95 (not PyTorch's 0.999)."})
    adam_epsilon: float = 1e-8
    num_train_epochs: float = field(default=2, metadata={"help": "Epochs, when --max_train_steps is not set."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides num_train_epochs."})
    warmup_epochs: float = field(default=0.25, metadata={"help": "Linear warmup length in epochs (paper: 40)."})
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Linear warmup in optimizer steps; overrides warmup_epochs."}
    )
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "Clip gradients to this norm (the paper does not clip)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory."}
    )
    torch_compile: bool = field(default=False, metadata={"help": "Compile the model with torch.compile."})
    torch_compile_mode: str = field(
        default="default",
        metadata={
            "help": "torch.compile mode with --torch_compile: default, reduce-overhead (CUDA graphs: fewer kernel "
            "launches), max-autotune (also autotuned GEMMs; long compile), max-autotune-no-cudagraphs."
        },
    )
    max_consecutive_nonfinite: int = field(
        default=20,
        metadata={"help": "Stop when this many micro-batches in a row have a non-finite loss (naming a checkpoint to "
                          "resume from)."},
    )

    def __post_init__(self) -> None:
        if self.torch_compile_mode not in TORCH_COMPILE_MODES:
            raise UsageError(
                f"--torch_compile_mode={self.torch_compile_mode!r} is not allowed: it must be one of "
                f"{', '.join(TORCH_COMPILE_MODES)}"
            )
        if self.torch_compile_mode != "default" and not self.torch_compile:
            raise UsageError(f"--torch_compile_mode={self.torch_compile_mode!r} is not allowed without --torch_compile")


DISPLAY_BANDS = 3  # a picture's red, green and blue


def display_channels_field() -> Any:
    """`--display_channels`, of the pretraining run's figures and of visualize.py."""
    return field(
        default=None,
        metadata={"help": "The 3 bands (0-based) shown as red, green and blue in the reconstruction figures of images "
                          "of more than 3 channels, e.g. 3,2,1. Default: the first three (1 channel: grayscale)."},
    )


def parse_display_channels(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """`--display_channels 3,2,1` (or a YAML list) -> `(3, 2, 1)`; None: the default bands. Their range is checked
    against the model's channel count by `evaluation.visualization.display_bands`."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        bands = tuple(int(str(item)) for item in items)  # str: a YAML 1.5 is refused, not truncated
    except ValueError:
        bands = ()
    if len(bands) != DISPLAY_BANDS:
        shown = value if isinstance(value, str) else ",".join(map(str, value))
        raise UsageError(f"--display_channels={shown!r} is not allowed: it must be {DISPLAY_BANDS} comma-separated "
                         "band indices (red, green, blue), e.g. 3,2,1")
    return bands


@dataclass
class RunArguments:
    """Where the run writes, how it checkpoints, logs and publishes."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "seed": SEED, "checkpoints_total_limit": AT_LEAST_ONE, "logging_steps": AT_LEAST_ONE,
        "log_images_steps": AT_LEAST_ONE, "eval_steps": AT_LEAST_ONE, "hub_upload_retries": NON_NEGATIVE,
        "hub_retry_wait_s": NON_NEGATIVE,
    }

    output_dir: str = field(default="outputs/mae-pretrain", metadata={"help": "Model, checkpoints, logs and results."})
    seed: int = 0
    checkpointing_steps: str | None = field(
        default=None, metadata={"help": 'Save the full training state every N optimizer steps, or "epoch".'}
    )
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": 'A checkpoint folder, or "latest" (the newest complete one in output_dir, if any).'},
    )
    with_tracking: bool = field(default=False, metadata={"help": "Log metrics and images to the --report_to trackers."})
    report_to: str = field(
        default="tensorboard", metadata={"help": 'Tracker(s) for accelerate: "tensorboard", "wandb", "all", ...'}
    )
    tracker_project_name: str = "mae-pretrain"
    logging_steps: int = field(default=10, metadata={"help": "Log loss/lr/throughput every N optimizer steps."})
    log_images_steps: int | None = field(
        default=None,
        metadata={"help": "Save and log a reconstruction figure every N optimizer steps (always at the end)."},
    )
    display_channels: str | None = display_channels_field()
    eval_steps: int | None = field(
        default=None,
        metadata={"help": "Validation loss every N optimizer steps (default: every epoch), when a split exists."},
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the exported model (at checkpoints and at the end)."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": 'Repository "user/name" (default: output_dir\'s name).'}
    )
    hub_token: str | None = None
    hub_private_repo: bool = False
    hub_upload_retries: int = field(
        default=4, metadata={"help": "Retries of a failed upload (a failed checkpoint push never stops training)."}
    )
    hub_retry_wait_s: float = field(
        default=30.0, metadata={"help": "Seconds before the first retry of an upload; doubled before each next one."}
    )
    save_on_signal: bool | None = field(
        default=None,
        metadata={"help": "On SIGTERM or SIGUSR1 (a preemption, SLURM's --signal), finish the optimizer step, save a "
                          "checkpoint on every process and exit with status 128 + the signal. Default: on under SLURM "
                          "(SLURM_JOB_ID set), else off."},
    )
    allow_objective_change: bool = field(
        default=False,
        metadata={"help": "Resume a checkpoint trained with another --mask_ratio, --norm_pix_loss or drop path rate "
                          "(refused otherwise); the change is logged in the run's history."},
    )

    def __post_init__(self) -> None:
        self.checkpoint_interval()  # a wrong --checkpointing_steps fails now, not at the first optimizer step
        parse_display_channels(self.display_channels)  # the count now; the range once the model's channels are known

    def saves_on_signal(self) -> bool:
        """--save_on_signal, on by default in a SLURM job (whose preemption and time limit come as signals)."""
        return self.save_on_signal if self.save_on_signal is not None else "SLURM_JOB_ID" in os.environ

    def checkpoint_every_epoch(self) -> bool:
        return self.checkpointing_steps == "epoch"

    def checkpoint_interval(self) -> int | None:
        """Optimizer steps between checkpoints, or None (never, or once per epoch)."""
        if self.checkpointing_steps is None or self.checkpoint_every_epoch():
            return None
        if not str(self.checkpointing_steps).isdigit() or int(self.checkpointing_steps) < 1:
            raise UsageError(
                f"--checkpointing_steps={self.checkpointing_steps!r} is not allowed: it must be an integer >= 1 or "
                '"epoch"'
            )
        return int(self.checkpointing_steps)


def load_model_config(source: str, config_overrides: str | None = None, **flags: Any) -> MAEConfig:
    """The config of `source` (a preset, config.json, folder or Hub id) with `--config_overrides` applied, then the
    dedicated flags' `flags` (which win over it).

    A config that cannot build a model (an unknown field, `patch_size=0`, a width its heads do not divide, a
    `layer_norm_eps` <= 0: MAEConfig validates every field when it is built) is a `UsageError`. The model library
    raises `ValueError`: its configuration_mae.py travels alone as Hub remote code, without this package's errors. So
    are the config of another model type (with the command that converts it), a model whose training state cannot fit
    this machine's memory.
    """
    from .configuration_mae import ForeignConfigError, load_config, parse_overrides

    given = f" with --config_overrides {config_overrides}" if config_overrides else ""
    described = f"the model config ({source}{given})"
    try:
        config = load_config(source, {**parse_overrides(config_overrides), **flags})
    except ForeignConfigError as error:
        raise UsageError(f"{error}: {convert_first(source)}") from error
    except (ValueError, TypeError) as error:  # TypeError: a value of another type (`mask_ratio=abc`, `image_size=null`)
        raise UsageError(f"{described} cannot build a model: {error}") from error
    problem = too_big_problem(config)
    if problem is not None:
        raise UsageError(f"{described} {problem}")
    return config


def image_statistics_problem(
    image_stats: str | None, image_mean: Sequence[float] | None, image_std: Sequence[float] | None
) -> str | None:
    """What is wrong with the statistics flags, in one line (the channel count is checked with the config)."""
    if image_stats is not None and not (image_stats in IMAGE_STATS_CHOICES or image_stats.endswith(".json")):
        return (f"--image_stats={image_stats!r} is not allowed: it must be one of {', '.join(IMAGE_STATS_CHOICES)} "
                "or a .json file written by run_scripts/image_stats.py")
    if (image_mean is None) != (image_std is None):
        return "--image_mean and --image_std go together: pass both, one value per channel"
    if image_mean is None or image_std is None:
        return None
    if image_stats is not None:
        return f"--image_mean/--image_std and --image_stats {image_stats} both set the statistics: pass one of them"
    if len(image_mean) != len(image_std):
        return f"--image_mean has {len(image_mean)} values and --image_std {len(image_std)}: one per channel each"
    return None


def convert_first(source: str) -> str:
    """What to do with a model of another implementation: the command that converts it."""
    return (f"convert it first with `python run_scripts/convert_checkpoint.py --source {source} --output_dir FOLDER` "
            "(transformers ViT and ViTMAE, timm and the official MAE checkpoints), then pass FOLDER")


def too_big_problem(config: MAEConfig) -> str | None:
    """A model whose float32 weights, gradients and AdamW states (counted from the config's sizes) exceed this
    machine's memory: building it would end in an allocation traceback, or swap until the machine runs out."""
    parameters = config.num_parameters()
    needed, available = parameters * TRAINING_BYTES_PER_PARAMETER, machine_memory_bytes()
    if needed <= available:
        return None
    return (f"cannot build a model: its {parameters:,} parameters need {format_bytes(needed)} for their float32 "
            f"weights, gradients and AdamW states, more than the {format_bytes(available)} of memory here (RAM and "
            "GPUs, on every machine of the run)")


def machine_memory_bytes() -> int:
    """RAM plus the memory of every GPU of this machine, times the machines of the run: the most that any strategy
    (DeepSpeed ZeRO-3 with offload) could hold a model in. Only a model that fits nowhere is refused: one that fits
    in RAM but not in a GPU may still train, sharded or offloaded."""
    import psutil  # an Accelerate dependency
    import torch

    gpus = sum(torch.cuda.get_device_properties(index).total_memory for index in range(torch.cuda.device_count()))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by `accelerate launch` / torchrun
    machines = max(1, world_size // int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))))
    return (psutil.virtual_memory().total + gpus) * machines


def format_bytes(count: float) -> str:
    """`17179869184` -> `16.0 GiB`; PiB at most (`2048.0 PiB`)."""
    *smaller, largest = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    for unit in smaller:
        if count < 1024:
            return f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count:,.1f} {largest}"


def load_yaml_config(path: str | pathlib.Path) -> dict[str, Any]:
    """A flat `{flag_name: value}` mapping; an empty file is an empty mapping."""
    if not pathlib.Path(path).expanduser().is_file():
        raise UsageError(f"--config: file does not exist: {pathlib.Path(path).expanduser().absolute()}")
    values = yaml.safe_load(pathlib.Path(path).expanduser().read_text()) or {}
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}")
    return values


def _config_path(argv: Sequence[str]) -> str | None:
    # Read --config before the full parse: its values must become defaults that the other flags then override.
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument(CONFIG_FLAG, default=None)
    return peek.parse_known_args(list(argv))[0].config


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The description as written (its example commands keep their lines); `(default: X)` after a flag's help only
    where the help does not already say what the default is, and none after a flag that takes no value (`--no_X`)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def build_parser(dataclass_types: Sequence[type], description: str | None = None) -> HfArgumentParser:
    """The parser of `dataclass_types` plus `--config`.

    Every boolean flag takes the bare form (`--flag`), `--flag true|false` and, when its default is true,
    `--no_flag`: HfArgumentParser gives the bare form to plain `bool` fields only, not to `bool | None` ones.
    """
    parser = HfArgumentParser(list(dataclass_types), description=description, formatter_class=HelpFormatter)
    for action in parser._actions:
        if action.type is string_to_bool:
            action.nargs, action.const = "?", True
        elif isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's `--no_flag`, with the flag's help
            action.help = f"Same as --{action.dest} false."
    parser.add_argument(CONFIG_FLAG, default=None, help="YAML file of flag values; command-line flags override it.")
    return parser


def parse_arguments(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, description: str | None = None
) -> tuple[Any, ...]:
    """Instances of `dataclass_types` from defaults < `--config` YAML < command-line flags; `description` (the
    script's docstring) heads `--help`.

    Unknown flags and unknown YAML keys are errors (a typo must not silently fall back to a default), and so are values
    outside a flag's range and missing local paths (`check_arguments`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(dataclass_types, description)
    config_path = _config_path(argv)
    if config_path is not None:
        values = load_yaml_config(config_path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"{config_path}: unknown argument(s) {', '.join(unknown)}")
        parser.set_defaults(**values)
    namespace = parser.parse_args(argv)
    del namespace.config
    parsed = tuple(_from_namespace(cls, namespace) for cls in dataclass_types)
    for arguments in parsed:
        check_arguments(arguments)
    return parsed


def not_local_nor_on_hub(name: str, hub: str) -> str:
    """What is wrong with a name that is neither a local folder nor usable from the Hub: `hub` says why not."""
    return f"no such local folder ({pathlib.Path(name).expanduser().absolute()}), and {hub}"


def hub_unavailable(what: str, error: BaseException | None = None) -> str:
    """`the Hub is offline (HF_HUB_OFFLINE=1) ...` or `the Hub (URL) could not be reached (why) ...`, for a `what`."""
    if error is None:
        return f"the Hub is offline (HF_HUB_OFFLINE=1) with no cached {what} of that name"
    return (f"the Hub ({hf_constants.ENDPOINT}) could not be reached ({describe(error)}), with no cached {what} of "
            "that name")


def _hub_model_problem(name: str) -> str | None:
    """Why `name`, which is no local path, cannot be loaded as a Hub model: the Hub does not know it, or it cannot be
    reached (or is offline) and the model is not in the local cache. One request, not retried: transformers would
    retry for half a minute, then end in a 50-line "couldn't connect" or "not a valid model identifier" traceback."""
    from .configuration_mae import MAE_PRESETS

    if name in MAE_PRESETS or pathlib.Path(name).expanduser().exists():
        return None
    try:
        if huggingface_hub.is_offline_mode():
            return None if _cached(name) else not_local_nor_on_hub(name, hub_unavailable("model"))
        known = huggingface_hub.HfApi().repo_exists(name)  # True for a gated one, False for a private one
    except HFValidationError as error:  # a name the Hub would never accept
        return not_local_nor_on_hub(name, f"it is no Hub model id either ({describe(error)})")
    except Exception as error:  # noqa: BLE001 - no network, a timeout, a 5xx: what is in the cache still loads
        return None if _cached(name) else not_local_nor_on_hub(name, hub_unavailable("model", error))
    if known:
        return None
    return not_local_nor_on_hub(
        name, f"the Hub ({hf_constants.ENDPOINT}) has no model of that name (a private one needs `hf auth login`)"
    )


def _cached(name: str) -> bool:
    return isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str)


def _model_config_problem(name: str) -> str | None:
    from .configuration_mae import config_source_problem

    return config_source_problem(name) or _hub_model_problem(name)


def _model_problem(name: str) -> str | None:
    return _missing_path_problem(name) or model_folder_problem(name) or _hub_model_problem(name)


def model_folder_problem(name: str) -> str | None:
    """What a local model folder lacks to be loaded: its config.json, or its weights (a config alone: transformers'
    "no file named model.safetensors" OSError). None for anything else: a complete folder, a file, a Hub id."""
    folder = pathlib.Path(name).expanduser()
    if not folder.is_dir():
        return None
    exported = "pass the folder a run exported its model to (its --output_dir; a step_N checkpoint only resumes)"
    if not (folder / CONFIG_NAME).is_file():
        return f"the folder holds no {CONFIG_NAME}: {exported}"
    if not any((folder / weights).is_file() for weights in WEIGHT_FILES):
        return (f"the folder holds a {CONFIG_NAME} but no weights ({SAFE_WEIGHTS_NAME} or {WEIGHTS_NAME}, or a "
                f"sharded index of either): {exported}, or this config alone as --model_config (random init)")
    return None


def _missing_path_problem(name: str) -> str | None:
    from .configuration_mae import missing_local_path_message

    return missing_local_path_message(name)


# Flags that take a local path or a Hub id, and what is wrong with a value, found without asking the Hub.
LOCAL_PATH_FLAGS: dict[str, Callable[[str], str | None]] = {
    "model_config": _model_config_problem,  # also a preset name
    "model_name_or_path": _model_problem,
    "dataset_name": _missing_path_problem,
}


def check_arguments(arguments: Any) -> None:
    """Raise a `UsageError` for the first flag of `arguments` (a dataclass) whose value is outside its
    `FLAG_RANGES` range (each item, for a list), or that names a local path that does not exist."""
    for name, allowed in getattr(type(arguments), "FLAG_RANGES", {}).items():
        value = getattr(arguments, name)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not allowed.admits(item):
                raise UsageError(f"--{name}={item!r} is not allowed: it must be {allowed}")
    for name, problem_of in LOCAL_PATH_FLAGS.items():
        value = getattr(arguments, name, None)
        problem = problem_of(value) if isinstance(value, str) else None
        if problem is not None:
            raise UsageError(f"--{name} {value}: {problem}")


def _from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{name: getattr(namespace, name) for name in names})


def arguments_to_dict(*arguments: Any) -> dict[str, Any]:
    """All fields of the argument dataclasses in one flat mapping (the resolved configuration of a run)."""
    merged: dict[str, Any] = {}
    for instance in arguments:
        merged.update(dataclasses.asdict(instance))
    return merged


def without_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """The configuration as it may be written to disk or sent to trackers."""
    return {key: value for key, value in values.items() if key not in SECRET_FIELDS}


def save_resolved_config(values: dict[str, Any], path: str | pathlib.Path) -> None:
    """Write the resolved configuration as YAML, loadable again with `--config` (secrets are never written)."""
    public = without_secrets(values)
    pathlib.Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(public, default=str)), sort_keys=False))
