"""Where the images come from: `DataArguments` (the data flags), the source they name (a Hub id, a local folder of
parquet, webdataset ``.tar``, image or ``.npy`` files, or the embedded Fashion-MNIST sample), its splits and its
columns. The image column is an ``Image`` feature, else a column of a usual name, else a column holding arrays
(``Array2D``/``Array3D``, nested lists of numbers: multi-band images). `ImageStatsArguments` are the flags of
``run_scripts/image_stats.py``.

Bad local shards are found here before any training (`shards.find_bad_shards`): fatal, or left out and counted with
``--skip_bad_shards``. Every script imports `DataArguments` before it parses its command line: `datasets`, `shards`
and the model config (seconds of imports, torch among them) are imported by the functions that read data, so that
`--help` answers at once.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..arguments import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    PROBABILITY,
    SEED,
    Range,
    hub_unavailable,
    not_local_nor_on_hub,
)
from ..errors import UsageError, describe

if TYPE_CHECKING:
    from datasets import DatasetBuilder, IterableDataset

logger = logging.getLogger(__name__)


IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes", "picture", "npy")


LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "class", "target", "fine_label", "category")


VALIDATION_SPLIT_CANDIDATES = ("validation", "valid", "val", "test")


KEY_COLUMN = "__key__"  # webdataset's sample key, the best name to log for a bad file


DECODE_IN_WORKERS = "workers"  # the default --decode_on; any other value is a torch device
_DATA_SUFFIXES = (".parquet", ".tar", ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".npy")
_ARRAY_DEPTHS = (2, 3)  # (H, W), and (H, W, C) or (C, H, W)


@dataclass
class DataArguments:
    """Where the images come from and how they are streamed; every field is a command-line flag."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "shuffle_buffer_size": AT_LEAST_ONE, "dataloader_num_workers": NON_NEGATIVE,
        "num_train_samples": AT_LEAST_ONE, "max_train_samples": AT_LEAST_ONE, "max_eval_samples": AT_LEAST_ONE,
        "max_bad_image_fraction": PROBABILITY, "holdout_fraction": Range(low=0, high=1, low_open=True, high_open=True),
        "holdout_seed": SEED,
    }

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (e.g. ILSVRC/imagenet-1k, timm/imagenet-1k-wds) or a local folder of "
                          "parquet shards, webdataset .tar shards, class/xxx.jpg images or class/xxx.npy arrays. "
                          "Default: the embedded Fashion-MNIST sample."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on. Default: 'validation', else 'test', else no evaluation."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column. Default: the Image feature, else image/img/jpg/png/webp/..."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Label column. Default: the ClassLabel feature, else label/labels/cls/... "
                                        "(may be absent for pretraining)."}
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer size (training stream)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per process."})
    num_train_samples: int | None = field(
        default=None, metadata={"help": "Training samples per epoch when the dataset's split info does not say."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a fixed subset of N samples (the first ones of the shards)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a fixed subset of N samples (the first ones of the shards)."}
    )
    holdout_fraction: float | None = field(
        default=None, metadata={"help": "Hold out this fraction of every class of the train split (seeded by "
                                        "--holdout_seed) and evaluate on it instead of the validation split: "
                                        "hyperparameters chosen without looking at the reported split "
                                        "(modeling_mae/data/holdout.py)."},
    )
    holdout_seed: int = field(default=0, metadata={"help": "Seeds which records --holdout_fraction holds out."})
    fast_decode: bool = field(
        default=True, metadata={"help": "Decode large JPEGs at reduced size (PIL draft) when the crop allows it; for "
                                        "pretraining, decode and augment in one step, the scale chosen per sampled "
                                        "crop."}
    )
    max_bad_image_fraction: float = field(
        default=0.5, metadata={"help": "Stop with an error when more than this fraction of the images read are "
                                       "unreadable (checked after a minimum number of images)."}
    )
    decode_on: str = field(
        default=DECODE_IN_WORKERS,
        metadata={"help": "Where images are decoded and augmented. 'workers': with PIL in the DataLoader workers. A "
                          "torch device ('cuda', 'cuda:1', 'cpu'): the workers only read the encoded bytes, the main "
                          "process decodes each batch there (JPEGs with nvjpeg on a GPU, other formats with PIL) and "
                          "augments it there, and batches come out on that device. Pretraining transform only: other "
                          "loaders (evaluation) keep decoding in the workers."},
    )
    skip_bad_shards: bool = field(
        default=False, metadata={"help": "Go on without shards that cannot be read (truncated or corrupt parquet or "
                                         ".tar files): logged and counted as skipped_shards. Default: stop with an "
                                         "error naming them (local shards are checked before training starts)."},
    )


STATISTICS_SPLITS = ("train", "validation")


@dataclass
class ImageStatsArguments:
    """What run_scripts/image_stats.py computes the statistics of, and where it writes them."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {"num_channels": AT_LEAST_ONE, "max_images": AT_LEAST_ONE}

    num_channels: int = field(default=3, metadata={"help": "The model's channel count: 1 reads grayscale and 16-bit "
                                                           "images as one channel, 3 reads RGB, any count reads "
                                                           "arrays (.npy, Array3D)."})
    max_images: int = field(default=10_000, metadata={"help": "Images read (the first ones of the split): a bounded "
                                                              "sample."})
    split: str = field(default="train", metadata={"help": "The split whose images are read.",
                                                  "choices": list(STATISTICS_SPLITS)})
    output: str | None = field(default=None, metadata={"help": "Also write the statistics to this JSON file, to "
                                                               "pass as --image_stats FILE."})


def sample_dataset_path() -> pathlib.Path:
    """The Fashion-MNIST sample shipped inside the package (parquet shards, train + test splits)."""
    return pathlib.Path(__file__).resolve().parent / "sample_data" / "fashion_mnist"


def _check_local_folder(folder: pathlib.Path) -> None:
    if not folder.is_dir():
        raise UsageError(f"Dataset folder {str(folder)!r} is a file, not a folder.")
    if not any(path.suffix.lower() in _DATA_SUFFIXES for path in folder.rglob("*") if path.is_file()):
        raise UsageError(
            f"Dataset folder {str(folder)!r} is empty: expected parquet shards, webdataset .tar shards or an image "
            "folder tree (class_name/xxx.jpg or class_name/xxx.npy)."
        )


def load_source(args: DataArguments) -> DatasetBuilder:
    """The `datasets` builder of the source: its files, split info and features, without reading any data.

    Local parquet and tar shards are checked first (`modeling_mae.shards.find_bad_shards`): bad ones stop here with
    one line naming them all, or, with ``args.skip_bad_shards``, are left out of the builder's files.
    """
    return load_checked_source(args)[0]


def load_checked_source(args: DataArguments) -> tuple[DatasetBuilder, dict[str, dict[str, str]]]:
    """`load_source`, and the bad shards it left out (`{split: {path: problem}}`)."""
    from ..configuration_mae import missing_local_path_message

    name = args.dataset_name or str(sample_dataset_path())
    missing = missing_local_path_message(name)
    if missing is not None:
        raise UsageError(f"Dataset {name}: {missing}")
    if pathlib.Path(name).expanduser().exists():
        folder = pathlib.Path(name).expanduser()
        _check_local_folder(folder)
        builder = _load_local_builder(folder)
    else:
        builder = _load_hub_builder(name, args.dataset_config_name)
    return builder, _leave_out_bad_shards(builder, args.skip_bad_shards)


def _load_local_builder(folder: pathlib.Path) -> DatasetBuilder:
    """`datasets`' builder of a local folder; a folder of ``.npy`` files only (which `datasets` does not read) streams
    as an image folder of arrays (`array_folder`)."""
    from datasets import load_dataset_builder
    from datasets.exceptions import DataFilesNotFoundError

    try:
        return load_dataset_builder(str(folder))
    except DataFilesNotFoundError:
        if not any(folder.rglob("*.npy")):
            raise
    from .array_folder import array_folder_builder

    return array_folder_builder(folder)


def _load_hub_builder(name: str, config_name: str | None) -> DatasetBuilder:
    """The builder of a Hub dataset; a name the Hub does not know, or cannot be asked about, is a `UsageError`."""
    from datasets import config as datasets_config
    from datasets import load_dataset_builder
    from datasets.exceptions import DatasetNotFoundError

    try:
        return load_dataset_builder(name, config_name)
    except DatasetNotFoundError as error:
        hub = (f"the Hub ({datasets_config.HF_ENDPOINT}) has no dataset of that name, or none you can access: for a "
               "gated dataset such as ILSVRC/imagenet-1k, accept its terms on the Hub and log in (`hf auth login`)")
        raise UsageError(f"--dataset_name {name}: {not_local_nor_on_hub(name, hub)}") from error
    except ConnectionError as error:  # offline, or no network: `datasets` found no cached copy either
        hub = hub_unavailable("dataset", None if datasets_config.HF_HUB_OFFLINE else error)
        raise UsageError(f"--dataset_name {name}: {not_local_nor_on_hub(name, hub)}") from error


def _leave_out_bad_shards(builder: DatasetBuilder, skip_bad_shards: bool) -> dict[str, dict[str, str]]:
    """Check the local shards of every split; raise listing the bad ones, or drop them from the builder's files."""
    from .shards import find_bad_shards

    data_files = builder.config.data_files or {}
    bad = {split: find_bad_shards(files) for split, files in data_files.items()}
    problems = [f"{path} ({problem})" for shards in bad.values() for path, problem in shards.items()]
    if problems and not skip_bad_shards:
        raise UsageError(
            f"{len(problems)} unreadable shard(s), truncated or corrupt (a partial copy?): {'; '.join(problems)}. "
            "Replace them, or pass --skip_bad_shards to train without them."
        )
    for split, shards in bad.items():
        if shards:
            files = data_files[split]
            # DataFilesList keeps its origin metadata (used by `datasets` to name the data) along with the files.
            data_files[split] = type(files)([file for file in files if file not in shards], files.origin_metadata)
    return {split: shards for split, shards in bad.items() if shards}


@functools.cache  # once per process, however many loaders read the split
def warn_left_out(path: str, problem: str) -> None:
    logger.warning("Going on without unreadable shard %s (%s): --skip_bad_shards", path, problem)


def available_splits(builder: DatasetBuilder) -> list[str]:
    if builder.config.data_files:
        return [str(split) for split in builder.config.data_files]
    return list(builder.info.splits or {})


def pick_split(split: str, args: DataArguments, splits: Sequence[str]) -> str | None:
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
    if split == "train" or args.holdout_fraction is not None:  # a holdout is carved out of the train split
        requested = args.train_split
    else:
        requested = args.validation_split
    if requested is None:
        return next((name for name in VALIDATION_SPLIT_CANDIDATES if name in splits), None)
    if requested not in splits:
        raise UsageError(f"Split {requested!r} not found; available splits: {', '.join(splits)}.")
    return requested


def split_flag(split: str) -> str:
    """The flag that names the dataset's split behind "train" or "validation"."""
    return "--train_split" if split == "train" else "--validation_split"


def resolve_split_name(args: DataArguments, split: str) -> str | None:
    """The dataset's split behind "train" or "validation"; None when no evaluation split exists (evaluation skipped)."""
    return pick_split(split, args, available_splits(load_source(args)))


def detect_column(
    features: dict[str, Any], requested: str | None, wanted_type: type, candidates: Sequence[str], what: str,
    fallback: Callable[[Any], bool] | None = None,
) -> str | None:
    """The `requested` column (checked), else the first of `wanted_type`, else the first of `candidates` by name, else
    the first whose feature `fallback` accepts; None when there is none."""
    if requested is not None:
        if requested not in features:
            raise UsageError(f"{what} column {requested!r} not found; available columns: {', '.join(features)}.")
        return requested
    typed = [name for name, feature in features.items() if isinstance(feature, wanted_type)]
    named = [name for name in candidates if name in features]
    others = [name for name, feature in features.items() if fallback is not None and fallback(feature)]
    return (typed + named + others + [None])[0]


def array_dtype(feature: Any) -> str | None:
    """The element dtype of a column that holds images as arrays: an ``Array2D``/``Array3D``, or numbers nested 2 or
    3 lists deep (a parquet list column, a webdataset ``.npy`` member); None for any other feature."""
    from datasets import Array2D, Array3D, LargeList, List, Value

    if isinstance(feature, (Array2D, Array3D)):
        return feature.dtype
    depth = 0
    while isinstance(feature, (List, LargeList)):
        feature, depth = feature.feature, depth + 1
    if depth in _ARRAY_DEPTHS and isinstance(feature, Value) and _is_numeric(feature.dtype):
        return feature.dtype
    return None


def holds_arrays(feature: Any) -> bool:
    return array_dtype(feature) is not None


def _is_numeric(dtype: str) -> bool:
    import numpy as np

    try:
        return np.dtype(dtype).kind in "biuf"
    except TypeError:  # string, binary, timestamp[s], ...: no numpy dtype
        return False


def open_stream(builder: DatasetBuilder, split_name: str) -> IterableDataset:
    try:
        return builder.as_streaming_dataset(split=split_name)
    except (OSError, ValueError, tarfile.TarError) as error:  # `datasets` reads the columns off the first shard
        first = next(iter((builder.config.data_files or {}).get(split_name, [])), "?")
        raise UsageError(f"Cannot open the {split_name!r} split (first shard: {first}): {describe(error)}") from error


def column_types(stream: IterableDataset) -> dict[str, Any]:
    if stream.features is not None:
        return dict(stream.features)
    # Some Hub datasets do not declare features: read the column names off the first record. Their images cannot be
    # cast to Image(decode=False), so there a bad file is only skipped if `datasets` does not decode it first.
    return {name: None for name in next(iter(stream.take(1)))}


def _count_local_examples(files: Sequence[str]) -> int | None:
    """Samples in local data files, from the parquet footers / tar headers / file count, without decoding anything."""
    from .shards import SHARD_SUFFIXES, scan_shard

    paths = [pathlib.Path(file) for file in files]
    if not paths or not all(path.is_file() for path in paths):
        return None  # remote files: rely on the split info or --num_train_samples
    if all(path.suffix in SHARD_SUFFIXES for path in paths):
        return sum(scan_shard(path).records or 0 for path in paths)  # the start-up check's scans, cached
    return len(paths)


def split_size(builder: DatasetBuilder, split_name: str) -> int | None:
    split_info = (builder.info.splits or {}).get(split_name)
    if split_info is not None and split_info.num_examples:
        return split_info.num_examples
    data_files = builder.config.data_files or {}
    return _count_local_examples(data_files[split_name]) if split_name in data_files else None


def epoch_samples(known: int | None, override: int | None, cap: int | None) -> int | None:
    """Samples per epoch: the user's --num_train_samples, else the known split size; capped by --max_*_samples."""
    samples = override if override is not None else known
    if cap is None:
        return samples
    return cap if samples is None else min(samples, cap)
