"""The files of a checkpoint folder: checked before a resume loads any of them, and why a save of them failed.

A checkpoint folder may come from elsewhere (a shared drive, a colleague, a download), and unpickling a file can run
any code it names. So before a resume loads anything, every file that some loader would unpickle is loaded once here
the safe way, and the resume stops at the first one that fails, naming it:

- pickles (`*.bin`, `*.pt`, `*.pth`, `*.pkl`: Accelerate's optimizer, grad-scaler and RNG states, DeepSpeed's shards)
  go through PyTorch's weights-only unpickler, which builds tensors and plain data only, plus the few classes their
  writers need (`allowed_globals`: numpy arrays in the RNG states, DeepSpeed's loss scaler and stage enum);
- the `.metadata` files of torch.distributed.checkpoint (FSDP's sharded state), which DCP reads with plain
  `pickle.load`, go through an unpickler that builds DCP's own metadata classes and nothing else;
- `model.safetensors` has its header checked (safetensors holds no code, but a truncated file must be named);
- each `random_states_{rank}.pkl` must hold the RNG states Accelerate restores from it (`check_rng_states`):
  Accelerate logs a failure at info level and goes on with fresh ones, which would make a resume silently inexact.

The load itself then runs under `weights_only_loading`, which makes every `torch.load` weights-only, the
`weights_only=False` of DeepSpeed's checkpoint engine included.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import importlib
import logging
import os
import pathlib
import pickle
import random
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from accelerate.utils import is_cuda_available
from accelerate.utils.other import TORCH_SAFE_GLOBALS as ACCELERATE_RNG_GLOBALS
from safetensors import safe_open

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
DCP_METADATA_NAME = ".metadata"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # read by torch.load at every call
REGISTERED_OBJECT_PATTERN = "custom_checkpoint_*.pkl"  # Accelerate unpickles these with weights_only=False
RNG_STATES_PATTERN = "random_states_*.pkl"  # Accelerate's, one per process
# What `accelerator.load_state` sets from each on every machine (a CUDA machine also sets "torch_cuda_manual_seed"),
# each checked by giving it to a private generator of the same kind.
RNG_STATE_CHECKS: dict[str, Callable[[Any], Any]] = {
    "random_state": lambda state: random.Random().setstate(state),
    "numpy_random_seed": lambda state: np.random.RandomState().set_state(state),
    "torch_manual_seed": lambda state: torch.Generator().set_state(state),
}
CUDA_RNG_STATE = "torch_cuda_manual_seed"
# The classes DeepSpeed (0.19) pickles into its ZeRO optimizer shards besides tensors and plain data.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"  # dataclasses and enums only
DCP_METADATA_GLOBALS = frozenset(
    {
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "torch.Size",
        "torch.serialization._get_layout",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "collections.OrderedDict",
    }
)
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
FULL_DISK_FREE_BYTES = 1 << 20  # below this, a write that failed for an unstated reason ran out of space


class UnusableFile(Exception):
    """A checkpoint file that a resume must not (or cannot) load; `str()` names it and says why."""

    def __init__(self, path: pathlib.Path, problem: str) -> None:
        super().__init__(f"{path} {problem}")
        self.path = path


# ------------------------------------------------------------------------------------------------ loading, the safe way


def allowed_globals(deepspeed: bool) -> list[Any]:
    """What a weights-only load of our checkpoints must be able to build besides PyTorch's own types."""
    allowed = list(ACCELERATE_RNG_GLOBALS)
    if deepspeed:
        allowed += [_resolve(name) for name in DEEPSPEED_GLOBALS]
    return allowed


def _resolve(dotted_name: str) -> Any:
    module, name = dotted_name.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@contextlib.contextmanager
def weights_only_loading(allowed: Sequence[Any]) -> Iterator[None]:
    """Every `torch.load` in the block is weights-only whatever its caller asks, and may build the `allowed` classes."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def _why(error: BaseException) -> str:
    """What went wrong, in a few words: what a weights-only load refused, or the error's first line."""
    if isinstance(error, pickle.UnpicklingError):
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({refused.group(1)})" if refused else ""
        return f"it holds an object other than tensors and plain data{what}, and a pickle can run code"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def check_pickle(path: pathlib.Path, allowed: Sequence[Any]) -> Any:
    """Load `path` weights-only, its tensors memory-mapped rather than read; returns what it holds."""
    try:
        with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says what matters
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # refused, truncated or not a torch file: the resume stops on it
        raise UnusableFile(path, f"cannot be loaded safely: {_why(error)}") from error


def check_rng_states(path: pathlib.Path, states: Any) -> None:
    """`states` (loaded from `path`) holds every RNG state that Accelerate restores here, each one usable."""
    if not isinstance(states, dict):
        raise UnusableFile(path, f"holds no random-number-generator states (a {type(states).__name__})")
    for key, check in RNG_STATE_CHECKS.items():
        if key not in states:
            raise UnusableFile(path, f"holds no {key} among its random-number-generator states")
        try:
            check(states[key])
        except Exception as error:  # of the wrong type or shape: Accelerate would fail on it as well
            raise UnusableFile(path, f"holds an unusable {key} ({_why(error)})") from error
    if is_cuda_available() and CUDA_RNG_STATE not in states:
        logger.warning(
            "%s holds no CUDA random-number-generator state (saved without a GPU?): the GPU's random numbers start "
            "afresh, so the resumed run is not an exact continuation",
            path,
        )


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Builds the metadata of torch.distributed.checkpoint and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if not _is_dcp_metadata_global(module, name):
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return super().find_class(module, name)


def _is_dcp_metadata_global(module: str, name: str) -> bool:
    if f"{module}.{name}" in DCP_METADATA_GLOBALS:
        return True
    if module == "torch":  # dtypes, layouts, memory formats: values, not callables
        return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    return module == DCP_METADATA_MODULE and isinstance(getattr(importlib.import_module(module), name, None), type)


def check_dcp_metadata(path: pathlib.Path) -> None:
    try:
        with path.open("rb") as file:
            _DcpMetadataUnpickler(file).load()
    except Exception as error:  # refused or damaged: the resume stops on it
        raise UnusableFile(path, f"cannot be loaded safely: {_why(error)}") from error


def check_safetensors(path: pathlib.Path) -> None:
    """The file exists and its header describes data that is all there (safe_open checks both)."""
    if not path.is_file():
        raise UnusableFile(path, "is missing")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # any header or length problem means a damaged file
        raise UnusableFile(path, f"is damaged ({_why(error)})") from error


def check_checkpoint_files(checkpoint: pathlib.Path, allowed: Sequence[Any], model_weights: str | None) -> None:
    """Raise `UnusableFile` for the first file of `checkpoint` that a resume could not load safely.

    `model_weights`: the safetensors file that must hold the model (None when DeepSpeed or FSDP shard it).
    """
    if model_weights is not None:
        check_safetensors(checkpoint / model_weights)
    for registered in sorted(checkpoint.glob(REGISTERED_OBJECT_PATTERN)):
        raise UnusableFile(
            registered,
            "is an object that Accelerate unpickles with weights_only=False: our checkpoints never hold one (the "
            "learning-rate schedule is in trainer_state.json)",
        )
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            loaded = check_pickle(path, allowed)
            if fnmatch.fnmatch(path.name, RNG_STATES_PATTERN):
                check_rng_states(path, loaded)
        elif path.is_file() and path.name == DCP_METADATA_NAME:
            check_dcp_metadata(path)


# -------------------------------------------------------------------------------------------------------- a full disk


def disk_is_full(error: BaseException, path: pathlib.Path) -> bool:
    """Whether a failed write ran out of space.

    The error says so (an OSError's errno, or the text of the error safetensors wraps it in), or says nothing useful
    (torch.save's C++ writer: "unexpected pos", "iostream error") while the filesystem is full now.
    """
    chained: BaseException | None = error
    while chained is not None:
        if isinstance(chained, OSError) and chained.errno in NO_SPACE_ERRNOS:
            return True
        if any(text in str(chained) for text in NO_SPACE_TEXTS):
            return True
        chained = chained.__cause__ or chained.__context__
    return shutil.disk_usage(path).free < FULL_DISK_FREE_BYTES


def filesystem_of(path: pathlib.Path) -> str:
    """`device (mounted at /mount/point)` of the filesystem holding `path` (the mount point alone without /proc)."""
    mount = path.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    try:
        mounts = pathlib.Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return str(mount)
    devices = [fields[0] for fields in (line.split() for line in mounts) if len(fields) > 1 and fields[1] == str(mount)]
    return f"{devices[-1]} (mounted at {mount})" if devices else str(mount)
