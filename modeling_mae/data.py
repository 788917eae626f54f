"""Streamed image data for MAE pretraining, fine-tuning and evaluation, on `datasets`.

One code path for every source: a Hub id (``ILSVRC/imagenet-1k``, ``timm/imagenet-1k-wds``, ...), a local folder of
parquet shards, of webdataset ``.tar`` shards or an image folder tree, or, with no ``dataset_name``, the Fashion-MNIST
sample embedded in the package. The stream is shuffled with a buffer, split by process and by DataLoader worker,
resumable mid-epoch, and skips (and counts) images that cannot be decoded, images smaller than ``min_image_size`` and
records whose label is missing; whole shards that cannot be read are handled by `modeling_mae.shards`.

How the pieces fit (see docs/data.md):
- the image column is read with ``Image(decode=False)`` and decoded here, so a bad file is skipped, not fatal;
- every DataLoader worker builds whole batches from its own part of the stream and reports, with each batch, how many
  records it has consumed and which ones were bad: the main process keeps these positions (that is the resumable
  state) and the skip count, so nothing relies on worker-local globals;
- on resume each worker skips the records it had already consumed (cheap: they are not decoded) and the worker
  round-robin is rotated so that batches come out in exactly the uninterrupted order;
- with ``decode_on`` a device (e.g. "cuda"), the workers only read the encoded bytes and the main process decodes and
  augments each batch on that device; the bookkeeping above is the same, the device decode only adds bad keys to it;
- labels are read only for loaders that want them (``labels=True``; pretraining does not): a ``ClassLabel`` column
  gives its ids and names, integers are ids, and strings become ids by sorted unique name over the train split.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import pathlib
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import pyarrow.parquet as pq
import torch
from datasets import ClassLabel, DatasetBuilder, IterableDataset, Value, load_dataset_builder
from datasets import Image as ImageFeature
from datasets import config as datasets_config
from datasets.distributed import split_dataset_by_node
from datasets.exceptions import DatasetNotFoundError
from datasets.utils.file_utils import xopen
from PIL import Image

from .arguments import AT_LEAST_ONE, NON_NEGATIVE, PROBABILITY, Range, hub_unavailable, not_local_nor_on_hub
from .configuration_mae import missing_local_path_message
from .errors import UsageError
from .shards import SHARD_SUFFIXES, ShardGuard, describe, find_bad_shards, guard_shards, scan_shard
from .transforms import (
    ImageTransform,
    augment_on_device,
    decode_image,
    decode_image_tensor,
    decode_images_on_device,
    eval_transform,
    finetune_transform,
    mixup_cutmix,
    pretrain_transform,
    to_rgb,
)

__all__ = [
    "DataArguments",
    "ImageStreamLoader",
    "ImageTransform",
    "augment_on_device",
    "available_splits",
    "build_dataloader",
    "decode_image",
    "decode_image_tensor",
    "decode_images_on_device",
    "eval_transform",
    "finetune_transform",
    "load_source",
    "mixup_cutmix",
    "pretrain_transform",
    "resolve_split_name",
    "sample_dataset_path",
    "to_rgb",
]

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes", "picture")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "class", "target", "fine_label", "category")
VALIDATION_SPLIT_CANDIDATES = ("validation", "valid", "val", "test")
KEY_COLUMN = "__key__"  # webdataset's sample key, the best name to log for a bad file
RECORDS_PER_READ = 64  # records fetched from `datasets` at a time (undecoded bytes, so this is cheap)
MIN_IMAGES_BEFORE_BAD_FRACTION_CHECK = 32  # a few bad files at the start of a shard must not stop a run
DECODE_IN_WORKERS = "workers"  # the default --decode_on; any other value is a torch device
PASS_EPOCH_STRIDE = 1_000_003  # seeds the extra passes a worker makes to fill a fixed-length epoch, distinct per epoch
_DATA_SUFFIXES = (".parquet", ".tar", ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_STRING_DTYPES = ("string", "large_string")


@dataclass
class DataArguments:
    """Where the images come from and how they are streamed; every field is a command-line flag."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "shuffle_buffer_size": AT_LEAST_ONE, "dataloader_num_workers": NON_NEGATIVE,
        "num_train_samples": AT_LEAST_ONE, "max_train_samples": AT_LEAST_ONE, "max_eval_samples": AT_LEAST_ONE,
        "max_bad_image_fraction": PROBABILITY,
    }

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (e.g. ILSVRC/imagenet-1k, timm/imagenet-1k-wds) or a local folder of "
                          "parquet shards, webdataset .tar shards or class/xxx.jpg images. Default: the embedded "
                          "Fashion-MNIST sample."},
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


def sample_dataset_path() -> pathlib.Path:
    """The Fashion-MNIST sample shipped inside the package (parquet shards, train + test splits)."""
    return pathlib.Path(__file__).resolve().parent / "sample_data" / "fashion_mnist"


# --- Source resolution ---------------------------------------------------------------------------------------------


def _check_local_folder(folder: pathlib.Path) -> None:
    if not folder.is_dir():
        raise UsageError(f"Dataset folder {str(folder)!r} is a file, not a folder.")
    if not any(path.suffix.lower() in _DATA_SUFFIXES for path in folder.rglob("*") if path.is_file()):
        raise UsageError(
            f"Dataset folder {str(folder)!r} is empty: expected parquet shards, webdataset .tar shards or an image "
            "folder tree (class_name/xxx.jpg)."
        )


def load_source(args: DataArguments) -> DatasetBuilder:
    """The `datasets` builder of the source: its files, split info and features, without reading any data.

    Local parquet and tar shards are checked first (`modeling_mae.shards.find_bad_shards`): bad ones stop here with
    one line naming them all, or, with ``args.skip_bad_shards``, are left out of the builder's files.
    """
    return _load_checked_source(args)[0]


def _load_checked_source(args: DataArguments) -> tuple[DatasetBuilder, dict[str, dict[str, str]]]:
    """`load_source`, and the bad shards it left out (`{split: {path: problem}}`)."""
    name = args.dataset_name or str(sample_dataset_path())
    missing = missing_local_path_message(name)
    if missing is not None:
        raise UsageError(f"Dataset {name}: {missing}")
    if pathlib.Path(name).expanduser().exists():
        folder = pathlib.Path(name).expanduser()
        _check_local_folder(folder)
        builder = load_dataset_builder(str(folder))
    else:
        builder = _load_hub_builder(name, args.dataset_config_name)
    return builder, _leave_out_bad_shards(builder, args.skip_bad_shards)


def _load_hub_builder(name: str, config_name: str | None) -> DatasetBuilder:
    """The builder of a Hub dataset; a name the Hub does not know, or cannot be asked about, is a `UsageError`."""
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
def _warn_left_out(path: str, problem: str) -> None:
    logger.warning("Going on without unreadable shard %s (%s): --skip_bad_shards", path, problem)


def available_splits(builder: DatasetBuilder) -> list[str]:
    if builder.config.data_files:
        return [str(split) for split in builder.config.data_files]
    return list(builder.info.splits or {})


def _pick_split(split: str, args: DataArguments, splits: Sequence[str]) -> str | None:
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
    requested = args.train_split if split == "train" else args.validation_split
    if requested is None:
        return next((name for name in VALIDATION_SPLIT_CANDIDATES if name in splits), None)
    if requested not in splits:
        raise UsageError(f"Split {requested!r} not found; available splits: {', '.join(splits)}.")
    return requested


def resolve_split_name(args: DataArguments, split: str) -> str | None:
    """The dataset's split behind "train" or "validation"; None when no evaluation split exists (evaluation skipped)."""
    return _pick_split(split, args, available_splits(load_source(args)))


def _detect_column(
    features: dict[str, Any], requested: str | None, wanted_type: type, candidates: Sequence[str], what: str
) -> str | None:
    if requested is not None:
        if requested not in features:
            raise UsageError(f"{what} column {requested!r} not found; available columns: {', '.join(features)}.")
        return requested
    typed = [name for name, feature in features.items() if isinstance(feature, wanted_type)]
    named = [name for name in candidates if name in features]
    return (typed + named + [None])[0]


def _open_stream(builder: DatasetBuilder, split_name: str) -> IterableDataset:
    try:
        return builder.as_streaming_dataset(split=split_name)
    except (OSError, ValueError, tarfile.TarError) as error:  # `datasets` reads the columns off the first shard
        first = next(iter((builder.config.data_files or {}).get(split_name, [])), "?")
        raise UsageError(f"Cannot open the {split_name!r} split (first shard: {first}): {describe(error)}") from error


def _column_types(stream: IterableDataset) -> dict[str, Any]:
    if stream.features is not None:
        return dict(stream.features)
    # Some Hub datasets do not declare features: read the column names off the first record. Their images cannot be
    # cast to Image(decode=False), so there a bad file is only skipped if `datasets` does not decode it first.
    return {name: None for name in next(iter(stream.take(1)))}


def _count_local_examples(files: Sequence[str]) -> int | None:
    """Samples in local data files, from the parquet footers / tar headers / file count, without decoding anything."""
    paths = [pathlib.Path(file) for file in files]
    if not paths or not all(path.is_file() for path in paths):
        return None  # remote files: rely on the split info or --num_train_samples
    if all(path.suffix in SHARD_SUFFIXES for path in paths):
        return sum(scan_shard(path).records or 0 for path in paths)  # the start-up check's scans, cached
    return len(paths)


def _split_size(builder: DatasetBuilder, split_name: str) -> int | None:
    split_info = (builder.info.splits or {}).get(split_name)
    if split_info is not None and split_info.num_examples:
        return split_info.num_examples
    data_files = builder.config.data_files or {}
    return _count_local_examples(data_files[split_name]) if split_name in data_files else None


def _epoch_samples(known: int | None, override: int | None, cap: int | None) -> int | None:
    """Samples per epoch: the user's --num_train_samples, else the known split size; capped by --max_*_samples."""
    samples = override if override is not None else known
    if cap is None:
        return samples
    return cap if samples is None else min(samples, cap)


# --- Labels ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Labels:
    """How the label column's values become class ids."""

    column: str
    names: tuple[str, ...] | None = None  # ClassLabel's names, or the sorted string labels; None for integer labels
    ids: dict[str, int] | None = None  # string label -> class id (string labels only)
    count: int | None = None  # integer labels without names: the number of classes the user gave, if any

    def problem(self, value: Any) -> str | None:
        """Why a record with this label value cannot be used; None when `id_of` gives its class. An integer label at or
        above the `count` the user gave is their mistake, not the record's: a `UsageError`."""
        if value is None:
            return "no label"
        if self.count is not None and isinstance(value, int) and value >= self.count:
            raise UsageError(f"Label {value} is no class id of the {self.count} classes --num_labels gives (0 to "
                             f"{self.count - 1}): pass the data's number of classes as --num_labels.")
        if self.id_of(value) is not None:
            return None
        return f"label {value!r} is not a class of the train split" if self.ids else f"label {value!r} is no class id"

    def id_of(self, value: Any) -> int | None:
        """The class id of a label value; None for no valid class (ClassLabel's "no label" is -1)."""
        if self.ids is not None:
            return self.ids.get(value) if isinstance(value, str) else None
        try:
            index = int(value)
        except (TypeError, ValueError):
            return None
        return index if index >= 0 and (self.names is None or index < len(self.names)) else None


def _resolve_labels(
    builder: DatasetBuilder, args: DataArguments, split_name: str, stream: IterableDataset, features: dict[str, Any],
    num_classes: int | None,
) -> _Labels | None:
    """The label column and its encoding: a ClassLabel's ids, integers as they are (checked against `num_classes` when
    given), or strings mapped to ids by sorted unique name over the train split (the same on every process and for
    every split)."""
    column = _detect_column(features, args.label_column_name, ClassLabel, LABEL_COLUMN_CANDIDATES, "Label")
    if column is None:
        return None
    if isinstance(features[column], ClassLabel):
        return _checked_count(_Labels(column, tuple(features[column].names)), num_classes)
    if not _holds_strings(features[column], stream, column):
        return _Labels(column, count=num_classes)
    train_split = _pick_split("train", args, available_splits(builder))
    names = sorted(_label_names(builder, train_split, column))
    if split_name != train_split:
        unseen = sorted(_label_names(builder, split_name, column) - set(names))
        if unseen:
            shown = ", ".join(map(repr, unseen[:10])) + (f", ... ({len(unseen)} in all)" if len(unseen) > 10 else "")
            raise UsageError(
                f"The {split_name!r} split has label(s) that the {train_split!r} split has not: {shown}. Class ids are "
                f"the train split's {len(names)} label names, sorted, so these cannot be scored."
            )
    logger.info("Labels in column %r are strings: %d classes, numbered by sorted name over the %r split.",
                column, len(names), train_split)
    return _checked_count(_Labels(column, tuple(names), {name: index for index, name in enumerate(names)}), num_classes)


def _checked_count(labels: _Labels, num_classes: int | None) -> _Labels:
    """Named labels fix the number of classes themselves: a different --num_labels is a mistake, not an override."""
    if num_classes is not None and labels.names is not None and num_classes != len(labels.names):
        raise UsageError(f"--num_labels {num_classes}, but the labels of column {labels.column!r} name "
                         f"{len(labels.names)} classes: drop --num_labels (the names give the classes).")
    return labels


def _holds_strings(feature: Any, stream: IterableDataset, column: str) -> bool:
    if feature is None:  # the source declares no features: look at the first value
        return isinstance(next(iter(stream.select_columns([column]).take(1)))[column], str)
    return isinstance(feature, Value) and feature.dtype in _STRING_DTYPES


def _label_names(builder: DatasetBuilder, split_name: str, column: str) -> set[str]:
    """The distinct string labels of a split: from the label column alone of parquet shards, else from the stream."""
    files = (builder.config.data_files or {}).get(split_name)
    if files and all(str(file).endswith(".parquet") for file in files):
        return set().union(*(_parquet_label_names(_file_version(file), column) for file in files))
    stream = builder.as_streaming_dataset(split=split_name).select_columns([column])
    return {value for batch in stream.iter(batch_size=1024) for value in batch[column] if isinstance(value, str)}


def _file_version(file: str) -> tuple[str, int, int]:
    """A file and, when local, its size and modification time: a cache key that changes with the file."""
    path = pathlib.Path(file)
    if not path.is_file():
        return file, 0, 0
    stat = path.stat()
    return file, stat.st_size, stat.st_mtime_ns


@functools.cache
def _parquet_label_names(file: tuple[str, int, int], column: str) -> frozenset[str]:
    """The distinct string labels of one parquet shard, reading its label column only (cached: each loader of a run
    needs the train split's names)."""
    try:
        with xopen(file[0], "rb") as handle:  # local or remote (hf://...)
            values = pq.ParquetFile(handle).read(columns=[column]).column(column).unique().to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(f"Cannot read the labels of shard {file[0]} ({describe(error)})") from error
    return frozenset(value for value in values if isinstance(value, str))


# --- Decoding --------------------------------------------------------------------------------------------------------


def _record_source(value: Any) -> bytes | Image.Image:
    """The image column's value ({"bytes", "path"} from Image(decode=False), raw bytes, or an already decoded PIL image)
    as encoded bytes, or the PIL image; a path is read once, here."""
    if isinstance(value, dict):
        return value.get("bytes") or _read_file(value["path"])
    return value


def _as_bytes(source: bytes | Image.Image) -> bytes:
    """Encoded bytes, to be decoded elsewhere."""
    if isinstance(source, Image.Image):
        # A source without declared features comes already decoded by `datasets`: re-encode it, losslessly.
        buffer = io.BytesIO()
        to_rgb(source).save(buffer, format="PNG")
        return buffer.getvalue()
    return source


def _as_image(source: bytes | Image.Image, min_side: int | None) -> Image.Image:
    return to_rgb(source) if isinstance(source, Image.Image) else decode_image(source, min_side)


def _source_size(source: bytes | Image.Image) -> tuple[int, int]:
    """(width, height), from the file's header only."""
    if isinstance(source, Image.Image):
        return source.size
    with Image.open(io.BytesIO(source)) as image:
        return image.size


def _read_file(path: str) -> bytes:
    with xopen(path, "rb") as file:  # image folders stream paths, local or remote (hf://...)
        return file.read()


def _record_key(record: dict[str, Any], image_column: str, position: int) -> str:
    value = record[image_column]
    path = value.get("path") if isinstance(value, dict) else None
    return str(record.get(KEY_COLUMN) or path or f"record #{position}")


@dataclass(frozen=True)
class _Columns:
    image: str
    labels: _Labels | None  # None: the loader does not read labels, or the data has none


class UnusableDataError(UsageError, RuntimeError):
    """Most records of the data cannot be used; a RuntimeError too, as it was before it became a user's error."""


@dataclass
class _BadImageTally:
    """Images read and found unreadable in one epoch's stream, to stop a run whose data is mostly unreadable."""

    max_fraction: float
    read: int = 0
    bad: int = 0
    last_bad_keys: list[str] = field(default_factory=list)

    def count(self, bad_keys: Sequence[str], read: int = 1) -> None:
        self.read += read
        self.bad += len(bad_keys)
        self.last_bad_keys = (self.last_bad_keys + list(bad_keys))[-5:]
        if bad_keys and self.read >= MIN_IMAGES_BEFORE_BAD_FRACTION_CHECK and self.bad / self.read > self.max_fraction:
            raise UnusableDataError(
                f"{self.bad} of the {self.read} images read so far could not be decoded or used (more than "
                f"--max_bad_image_fraction {self.max_fraction}); the data set looks broken. "
                f"Last skipped records: {'; '.join(self.last_bad_keys)}"
            )


class _WorkerStream(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: reads its part of the stream and yields whole, decoded batches.

    The batch keys starting with "_" carry the bookkeeping to the main process: the (virtual) worker index, how many
    records this worker has consumed in the epoch, the keys (and reasons) of the records skipped, the shards given up
    and, as the last batch, a user's error ("_error": a bad shard, mostly bad data) to be raised there in one line. With
    no ``transform`` (decoding on a device), batches hold the still encoded images ("encoded") and their keys ("_keys")
    instead of "pixel_values". With ``from_bytes`` (the transform fused with decoding), it replaces decode + transform.
    """

    def __init__(
        self,
        source: IterableDataset,
        columns: _Columns,
        transform: Callable[[Image.Image], torch.Tensor] | None,
        batch_size: int,
        *,
        drop_last: bool,
        repeat: bool,
        process_index: int,
        num_processes: int,
        num_workers: int,
        min_decode_side: int | None,
        max_bad_image_fraction: float,
        seed: int = 0,
        from_bytes: Callable[[bytes, random.Random], torch.Tensor] | None = None,
        min_image_size: int = 1,
        shard_guard: ShardGuard | None = None,
    ) -> None:
        self.source = source
        self.min_image_size = min_image_size
        self.shard_guard = shard_guard  # the same object reads the shards (in this process or a worker's copy)
        self.seed = seed
        self.columns = columns
        self.transform = transform
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.repeat = repeat
        self.process_index = process_index
        self.num_processes = num_processes
        self.min_decode_side = min_decode_side
        self.from_bytes = from_bytes
        self.max_bad_image_fraction = max_bad_image_fraction
        # [epoch, worker rotation, start position of each worker]; in shared memory so that persistent workers see
        # the values the main process sets before every epoch.
        self.control = torch.zeros(2 + max(num_workers, 1), dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker_info = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker_info.num_workers, worker_info.id) if worker_info else (1, 0)
        epoch, rotation, *starts = self.control.tolist()
        worker = (worker_id + rotation) % num_workers
        records = itertools.islice(self._records(epoch, worker, num_workers), starts[worker], None)
        try:
            yield from self._batches(records, starts[worker], worker, epoch)
        except UsageError as error:  # raised again by the main process: one line, not a DataLoader worker traceback
            yield {"_error": error.with_traceback(None)}  # a traceback would tie the loader into a reference cycle

    def _records(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        # Workers of all processes are one flat pool: disjoint parts that together cover the stream.
        stream = split_dataset_by_node(
            self.source, rank=self.process_index * num_workers + worker, world_size=self.num_processes * num_workers
        )
        for pass_index in itertools.count():
            stream.set_epoch(epoch + pass_index * PASS_EPOCH_STRIDE)
            read_any = False
            for columns in stream.iter(batch_size=RECORDS_PER_READ):
                read_any = True
                yield from (dict(zip(columns, values)) for values in zip(*columns.values()))
            if not (self.repeat and read_any):
                return

    def _batches(
        self, records: Iterator[dict[str, Any]], position: int, worker: int, epoch: int
    ) -> Iterator[dict[str, Any]]:
        images: list[torch.Tensor | bytes] = []
        labels: list[int] = []
        keys: list[str] = []
        bad_keys: list[str] = []
        tally = _BadImageTally(self.max_bad_image_fraction)
        for record in records:
            position += 1
            key = _record_key(record, self.columns.image, position)
            label = record[self.columns.labels.column] if self.columns.labels else None
            label_problem = self.columns.labels.problem(label) if self.columns.labels else None
            image, problem = (None, label_problem) if label_problem else self._read(
                record, key, self._augmentation_seed(epoch, worker, position))
            tally.count([f"{key} ({problem})"] if problem else [])
            if problem:
                bad_keys.append(f"{key} ({problem})")
                continue
            images.append(image)
            keys.append(key)
            if self.columns.labels is not None:
                labels.append(self.columns.labels.id_of(label))
            if len(images) == self.batch_size:
                yield self._batch(images, labels, keys, bad_keys, worker, position)
                images, labels, keys, bad_keys = [], [], [], []
        if images and self.drop_last:
            images, labels, keys = [], [], []
        if images or bad_keys or (self.shard_guard and self.shard_guard.skipped):  # so that every skip gets counted
            yield self._batch(images, labels, keys, bad_keys, worker, position)

    def _augmentation_seed(self, epoch: int, worker: int, position: int) -> int:
        """Seeds the record's random crop and flip from its place in the stream: a resumed run crops and flips exactly
        as an uninterrupted one, whatever the worker processes' RNG states."""
        return hash((self.seed, epoch, self.process_index, worker, position)) & (2**63 - 1)

    def _augment(self, image: Image.Image, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG (the main process's, without workers) alone
            torch.manual_seed(seed)
            return self.transform(image)

    def _read(self, record: dict[str, Any], key: str, seed: int) -> tuple[torch.Tensor | bytes | None, str | None]:
        """The record's image, augmented, or still encoded when the loader decodes on a device; or None and why not.

        An image smaller than ``min_image_size`` (e.g. smaller than one patch of the model) is skipped: upscaled to the
        model's input it would only teach it blur.
        """
        try:
            source = _record_source(record[self.columns.image])
            size = _source_size(source) if self.min_image_size > 1 else None
            if size is not None and min(size) < self.min_image_size:
                return None, f"{size[0]}x{size[1]} px, smaller than {self.min_image_size} px"
            if self.transform is None:
                return _as_bytes(source), None
            if self.from_bytes is not None:
                # Decoding and augmentation are one step here, so any failure in it means a bad file.
                return self.from_bytes(_as_bytes(source), random.Random(seed)), None
            image = _as_image(source, self.min_decode_side)
        except Exception as error:  # noqa: BLE001 - any decoder failure means "bad file": skip it, never stop the run
            logger.debug("Cannot decode %s: %r", key, error)
            return None, "unreadable image"
        return self._augment(image, seed), None

    def _batch(
        self, images: list[Any], labels: list[int], keys: list[str], bad_keys: list[str], worker: int, position: int
    ) -> dict[str, Any]:
        batch: dict[str, Any] = {"_worker": worker, "_position": position, "_bad_keys": bad_keys,
                                 "_skipped_shards": self.shard_guard.take_skipped() if self.shard_guard else []}
        if images:
            if self.transform is None:
                batch["encoded"], batch["_keys"] = images, keys  # the keys name the files the device cannot decode
            else:
                batch["pixel_values"] = torch.stack(images)
            if self.columns.labels is not None:
                batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


def _decode_or_none(encoded: list[bytes], keys: list[str], device: torch.device) -> list[torch.Tensor | None]:
    """Decode a batch on ``device``; None for an image no decoder can read."""
    try:
        return list(decode_images_on_device(encoded, device))
    except Exception:  # noqa: BLE001 - one bad file fails the whole batched decode: find it by decoding one at a time
        return [_decode_one_or_none(data, key, device) for data, key in zip(encoded, keys)]


def _decode_one_or_none(data: bytes, key: str, device: torch.device) -> torch.Tensor | None:
    # Errors are logged, never kept: an exception's traceback would tie the loader into a reference cycle, and a loader
    # freed by the cycle collector shuts its workers down only after a 5 s timeout each.
    try:
        return decode_images_on_device([data], device)[0]
    except Exception:  # noqa: BLE001 - nvjpeg rejects some files PIL reads (e.g. CMYK): PIL decides, as in the workers
        pass
    try:
        return decode_image_tensor(data).to(device)
    except Exception as error:  # noqa: BLE001 - any decoder failure means "bad file": skip it, never stop the run
        logger.debug("Cannot decode %s: %r", key, error)
        return None


@dataclass(frozen=True)
class _DeviceDecoding:
    """The main process's half of ``decode_on=<device>``: decode the workers' encoded batches there and augment them."""

    device: torch.device
    augment: Callable[[Sequence[torch.Tensor]], torch.Tensor]

    def apply(self, batch: dict[str, Any], tally: _BadImageTally) -> None:
        """Replace "encoded" by "pixel_values" on the device. Unreadable images are dropped, so the batch may be smaller
        (refilling it would break the exact resume position); their keys join "_bad_keys" to be counted as skipped."""
        encoded, keys = batch.pop("encoded", []), batch.pop("_keys", [])
        if not encoded:
            return
        images = _decode_or_none(encoded, keys, self.device)
        good = [index for index, image in enumerate(images) if image is not None]
        bad_keys = [f"{key} (unreadable image)" for key, image in zip(keys, images) if image is None]
        batch["_bad_keys"] = batch["_bad_keys"] + bad_keys
        tally.count(bad_keys, read=len(encoded))
        labels = batch.pop("labels", None)
        if not good:
            return  # nothing left: the loader only counts the skips
        batch["pixel_values"] = self.augment([images[index] for index in good])
        if labels is not None:
            batch["labels"] = labels[good].to(self.device, non_blocking=True)


@dataclass
class _StreamPosition:
    """Where an epoch stands: what the main process has consumed so far (the resumable state)."""

    epoch: int
    num_workers: int
    batches: int = 0
    next_worker: int = 0
    worker_positions: list[int] = field(default_factory=list)
    completed: bool = False

    @classmethod
    def start(cls, epoch: int, num_workers: int) -> _StreamPosition:
        return cls(epoch=epoch, num_workers=num_workers, worker_positions=[0] * num_workers)


class ImageStreamLoader:
    """Batches ``{"pixel_values": (B, 3, H, W), "labels": (B,)}`` of this process's share of the stream.

    With ``decode_on`` a device, the tensors are already on it, and a batch with unreadable images has fewer than B.
    Already split by process: do not pass it through ``accelerator.prepare``. A training stream of known length yields
    exactly ``len(self)`` batches per epoch on every process (a worker that runs out starts another pass over its
    part), so that processes stay in step.
    """

    def __init__(
        self,
        stream: _WorkerStream,
        *,
        num_workers: int,
        num_samples: int | None,
        num_processes: int,
        batch_size: int,
        fixed_length: bool,
        device_decoding: _DeviceDecoding | None = None,
        skipped_shards: Sequence[str] = (),
    ) -> None:
        self._stream = stream
        self._device_decoding = device_decoding
        self._num_workers = max(num_workers, 1)
        self._loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,  # the workers build the batches themselves
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
        )
        self.num_samples = num_samples
        self._num_processes = num_processes
        self._batch_size = batch_size
        self._fixed_length = fixed_length
        labels = stream.columns.labels
        self.has_labels = labels is not None  # batches carry "labels"
        self.class_names = list(labels.names) if labels is not None and labels.names is not None else None
        self.num_classes = len(self.class_names) if self.class_names is not None else None
        self.epoch = 0
        self._position = _StreamPosition.start(0, self._num_workers)
        self._resume_from: _StreamPosition | None = None
        self._skipped = 0
        self._skipped_shards = set(skipped_shards)

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("The length of this stream is unknown: pass --num_train_samples.")
        per_process = self.num_samples / self._num_processes
        if self._fixed_length:
            return max(1, int(per_process // self._batch_size))
        return math.ceil(per_process / self._batch_size)  # an estimate: workers may each end with a partial batch

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle order per epoch (seed + epoch); a state loaded for this very epoch is kept."""
        self.epoch = epoch
        if self._resume_from is not None and self._resume_from.epoch != epoch:
            self._resume_from = None

    def skipped_images(self) -> int:
        return self._skipped

    def skipped_shards(self) -> list[str]:
        """The shards this process went on without (--skip_bad_shards): left out at start-up or given up mid-stream."""
        return sorted(self._skipped_shards)

    def state_dict(self) -> dict[str, Any]:
        position = self._resume_from or self._position
        return {**asdict(position), "skipped_images": self._skipped, "skipped_shards": self.skipped_shards()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self._skipped = state.pop("skipped_images", 0)
        self._skipped_shards.update(state.pop("skipped_shards", []))
        position = _StreamPosition(**state)
        if position.num_workers != self._num_workers:
            saved = "0 or 1" if position.num_workers == 1 else position.num_workers  # 0 reads the stream like 1
            raise UsageError(
                f"The checkpoint's data-stream position was saved with --dataloader_num_workers {saved}, and this run "
                f"has --dataloader_num_workers {self._loader.num_workers}: each worker reads its own part of the "
                f"stream, so resume with --dataloader_num_workers {saved} to continue exactly where it stopped."
            )
        self.epoch = position.epoch
        self._resume_from = position

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        position = self._resume_from or _StreamPosition.start(self.epoch, self._num_workers)
        self._resume_from = None
        self._position = position
        if position.completed:
            return
        self._stream.control.copy_(
            torch.tensor([position.epoch, position.next_worker, *position.worker_positions], dtype=torch.int64)
        )
        limit = len(self) if self._fixed_length else None
        if limit is None or position.batches < limit:
            yield from self._consume(position, limit)
        position.completed = True

    def _consume(self, position: _StreamPosition, limit: int | None) -> Iterator[dict[str, torch.Tensor]]:
        tally = _BadImageTally(self._stream.max_bad_image_fraction)  # the device's share; the workers keep theirs
        try:
            for batch in self._loader:
                if "_error" in batch:
                    raise batch["_error"]
                if self._device_decoding is not None:
                    self._device_decoding.apply(batch, tally)
                self._record_progress(position, batch.pop("_worker"), batch.pop("_position"), batch.pop("_bad_keys"))
                self._record_skipped_shards(batch.pop("_skipped_shards"))
                if "pixel_values" not in batch:
                    continue
                position.batches += 1
                yield batch
                if limit is not None and position.batches >= limit:
                    return
        except Exception:
            self._stop_workers()
            raise

    def _stop_workers(self) -> None:
        """Stop the persistent workers now: the exception's traceback keeps this loader alive, and a loader freed later
        by the cycle collector stops each worker only after a 5 s timeout."""
        iterator = getattr(self._loader, "_iterator", None)  # DataLoader has no public close
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            self._loader._iterator = None

    def _record_progress(self, position: _StreamPosition, worker: int, consumed: int, bad_keys: list[str]) -> None:
        position.worker_positions[worker] = consumed
        position.next_worker = (worker + 1) % self._num_workers
        for key in bad_keys:
            logger.warning("Skipped a record: %s", key)
        self._skipped += len(bad_keys)

    def _record_skipped_shards(self, shards: list[str]) -> None:
        # A corrupt shard fails again in every epoch (and again on resume): counted once, like the start-up ones.
        self._skipped_shards.update(shards)


# --- Public entry point ------------------------------------------------------------------------------------------------


def _prepare_source(
    stream: IterableDataset, columns: _Columns, features: dict[str, Any], *, train: bool, seed: int,
    args: DataArguments, max_samples: int | None,
) -> IterableDataset:
    label = columns.labels.column if columns.labels is not None else None
    keep = [columns.image] + [name for name in (label, KEY_COLUMN) if name is not None and name in features]
    stream = stream.select_columns(keep)
    if isinstance(features[columns.image], ImageFeature):
        stream = stream.cast_column(columns.image, ImageFeature(decode=False))  # decode ourselves: skip bad files
    if max_samples is not None:
        stream = stream.take(max_samples)
    if train:
        # max_buffer_input_shards=1: interleaving shards uses threads, and on parquet `datasets` then sleeps 5 s at
        # the end of every pass (SLEEP_TIME_ON_THREADS_SHUTDOWN). Shard order is still shuffled every epoch.
        stream = stream.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size, max_buffer_input_shards=1)
    return stream


def _decode_device(decode_on: str) -> torch.device:
    try:
        device = torch.device(decode_on)
    except RuntimeError as error:
        raise ValueError(
            f"decode_on must be {DECODE_IN_WORKERS!r} or a torch device (cuda, cuda:1, cpu), got {decode_on!r}."
        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"decode_on={decode_on!r} needs a GPU, and none is visible.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # this process's GPU (Accelerate sets it)
    return device


def _device_decoding(decode_on: str, transform: Callable[[Image.Image], torch.Tensor]) -> _DeviceDecoding | None:
    if decode_on == DECODE_IN_WORKERS:
        return None
    device = _decode_device(decode_on)  # checked even where unused: a wrong flag fails before training starts
    augment = getattr(transform, "device_augment", None)
    if augment is None:
        logger.info("decode_on=%s: this loader's transform has no on-device version; it decodes in the workers.",
                    decode_on)
        return None
    return _DeviceDecoding(device, augment)


def build_dataloader(
    args: DataArguments,
    split: str,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    drop_last: bool | None = None,
    labels: bool = True,
    num_classes: int | None = None,
    min_image_size: int = 1,
) -> ImageStreamLoader:
    """The loader of ``split`` ("train" or "validation") for process ``process_index`` of ``num_processes``.

    ``train`` shuffles (buffer + seed + epoch) and, by default, drops the last incomplete batch. With
    ``args.fast_decode`` and a transform that has a ``from_bytes`` (the pretraining one), the workers decode and augment
    each image in one step from its encoded bytes. With ``args.decode_on`` a device and a transform that has a
    ``device_augment`` (the pretraining one), batches are decoded and augmented on that device and come out there.
    ``labels=False`` never reads the label column (pretraining); otherwise batches carry class ids when the data has
    labels (see `_resolve_labels`; ``num_classes``, when given, must match named labels and bound integer ones).
    Images whose width or height is below ``min_image_size`` (pass the model's patch
    size) are skipped and counted.
    Raises `UsageError` for an unknown dataset, a missing split or column (listing what exists), an empty folder, bad
    local shards, validation labels the train split lacks, or a ``decode_on`` that is no usable device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    builder, left_out = _load_checked_source(args)
    split_name = _pick_split(split, args, available_splits(builder))
    if split_name is None:
        raise UsageError(f"No validation split found; available splits: {', '.join(available_splits(builder))}.")
    for path, problem in left_out.get(split_name, {}).items():
        _warn_left_out(path, problem)
    guard = guard_shards(builder, args.skip_bad_shards)
    stream = _open_stream(builder, split_name)
    features = _column_types(stream)
    image_column = _detect_column(features, args.image_column_name, ImageFeature, IMAGE_COLUMN_CANDIDATES, "Image")
    if image_column is None:
        raise UsageError(f"No image column found; available columns: {', '.join(features)}. Pass --image_column_name.")
    label_columns = _resolve_labels(builder, args, split_name, stream, features, num_classes) if labels else None
    columns = _Columns(image_column, label_columns)
    max_samples = args.max_train_samples if split == "train" else args.max_eval_samples
    override = args.num_train_samples if split == "train" else None
    num_samples = _epoch_samples(_split_size(builder, split_name), override, max_samples)
    fixed_length = train and num_samples is not None
    if train and num_samples is None and num_processes > 1:
        logger.warning("The training stream's length is unknown: pass --num_train_samples so that every process "
                       "runs the same number of steps per epoch.")
    device_decoding = _device_decoding(args.decode_on, transform)
    worker_stream = _WorkerStream(
        _prepare_source(stream, columns, features, train=train, seed=seed, args=args, max_samples=max_samples),
        columns,
        None if device_decoding is not None else transform,
        batch_size,
        drop_last=train if drop_last is None else drop_last,
        repeat=fixed_length,
        process_index=process_index,
        num_processes=num_processes,
        num_workers=args.dataloader_num_workers,
        min_decode_side=getattr(transform, "min_source_side", None) if args.fast_decode else None,
        max_bad_image_fraction=args.max_bad_image_fraction,
        seed=seed,
        from_bytes=getattr(transform, "from_bytes", None) if args.fast_decode else None,
        min_image_size=min_image_size,
        shard_guard=guard,
    )
    return ImageStreamLoader(
        worker_stream,
        num_workers=args.dataloader_num_workers,
        num_samples=num_samples,
        num_processes=num_processes,
        batch_size=batch_size,
        fixed_length=fixed_length,
        device_decoding=device_decoding,
        skipped_shards=list(left_out.get(split_name, {})),
    )
