"""How a label column becomes class ids: a ``ClassLabel`` gives its ids and names, integers are ids, and strings
become ids by sorted unique name over the train split (so that every process and split numbers them alike). Labels of
another split that the train split lacks, and a split whose shards lack the label column, are refused before any
image is read.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
from datasets import ClassLabel, DatasetBuilder, IterableDataset, Value
from datasets.utils.file_utils import xopen

from ..errors import UsageError, describe
from .shards import local_parquet_columns
from .sources import (
    LABEL_COLUMN_CANDIDATES,
    DataArguments,
    available_splits,
    detect_column,
    pick_split,
)

logger = logging.getLogger(__name__)


_STRING_DTYPES = ("string", "large_string")


@dataclass(frozen=True)
class LabelColumn:
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


def resolve_labels(
    builder: DatasetBuilder, args: DataArguments, split_name: str, stream: IterableDataset, features: dict[str, Any],
    num_classes: int | None,
) -> LabelColumn | None:
    """The label column and its encoding: a ClassLabel's ids, integers as they are (checked against `num_classes` when
    given), or strings mapped to ids by sorted unique name over the train split (the same on every process and for
    every split). A split whose labels the train split lacks is refused (integer ones: where parquet shards give them
    cheaply, and when no `num_classes` makes them ids of their own), and so is a split whose shards lack the column."""
    column = detect_column(features, args.label_column_name, ClassLabel, LABEL_COLUMN_CANDIDATES, "Label")
    if column is None:
        return None
    _refuse_shards_without(builder, split_name, column)
    if isinstance(features[column], ClassLabel):
        return _checked_count(LabelColumn(column, tuple(features[column].names)), num_classes)
    train_split = pick_split("train", args, available_splits(builder))
    if not _holds_strings(features[column], stream, column):
        if num_classes is None and split_name != train_split and _all_parquet(builder, split_name, train_split):
            _refuse_unseen(builder, split_name, train_split, column, _label_values(builder, train_split, column))
        return LabelColumn(column, count=num_classes)
    names = sorted(_label_values(builder, train_split, column))
    if split_name != train_split:
        _refuse_unseen(builder, split_name, train_split, column, set(names))
    logger.info("Labels in column %r are strings: %d classes, numbered by sorted name over the %r split.",
                column, len(names), train_split)
    return _checked_count(LabelColumn(column, tuple(names), {name: index for index, name in enumerate(names)}), num_classes)


def _refuse_unseen(builder: DatasetBuilder, split_name: str, train_split: str, column: str, known: set[Any]) -> None:
    """The model's classes are the train split's labels: another split's label outside them could never be scored."""
    unseen = sorted(_label_values(builder, split_name, column) - known)
    if unseen:
        shown = ", ".join(map(repr, unseen[:10])) + (f", ... ({len(unseen)} in all)" if len(unseen) > 10 else "")
        numbered = " (numbered by sorted name)" if all(isinstance(label, str) for label in known) else ""
        raise UsageError(
            f"The {split_name!r} split has label(s) that the {train_split!r} split has not: {shown}. The classes are "
            f"the train split's {len(known)} labels{numbered}, so these cannot be scored."
        )


def _refuse_shards_without(builder: DatasetBuilder, split_name: str, column: str) -> None:
    """`datasets` gives every split of parquet shards the columns of the first split's first shard: a split whose
    (local) shards lack the label column would stream records without a label, all skipped."""
    for file in (builder.config.data_files or {}).get(split_name, []):
        columns = local_parquet_columns(file)
        if columns is not None and column not in columns:
            raise UsageError(
                f"The {split_name!r} split has no label column {column!r}: the columns of {file} are "
                f"{', '.join(sorted(columns))}. Name its label column with --label_column_name, or choose a split "
                "with labels."
            )


def _checked_count(labels: LabelColumn, num_classes: int | None) -> LabelColumn:
    """Named labels fix the number of classes themselves: a different --num_labels is a mistake, not an override."""
    if num_classes is not None and labels.names is not None and num_classes != len(labels.names):
        raise UsageError(f"--num_labels {num_classes}, but the labels of column {labels.column!r} name "
                         f"{len(labels.names)} classes: drop --num_labels (the names give the classes).")
    return labels


def _holds_strings(feature: Any, stream: IterableDataset, column: str) -> bool:
    if feature is None:  # the source declares no features: look at the first value
        return isinstance(next(iter(stream.select_columns([column]).take(1)))[column], str)
    return isinstance(feature, Value) and feature.dtype in _STRING_DTYPES


def _all_parquet(builder: DatasetBuilder, *split_names: str) -> bool:
    """Whether the splits are parquet shards, whose label column can be read alone."""
    data_files = builder.config.data_files or {}
    return all(data_files.get(name) and all(str(file).endswith(".parquet") for file in data_files[name])
               for name in split_names)


def _label_values(builder: DatasetBuilder, split_name: str, column: str) -> set[Any]:
    """The distinct labels of a split: from the label column alone of parquet shards, else from the stream."""
    if _all_parquet(builder, split_name):
        files = builder.config.data_files[split_name]
        return set().union(*(_parquet_label_values(_file_version(file), column) for file in files))
    stream = builder.as_streaming_dataset(split=split_name).select_columns([column])
    return {value for batch in stream.iter(batch_size=1024) for value in batch[column] if value is not None}


def _file_version(file: str) -> tuple[str, int, int]:
    """A file and, when local, its size and modification time: a cache key that changes with the file."""
    path = pathlib.Path(file)
    if not path.is_file():
        return file, 0, 0
    stat = path.stat()
    return file, stat.st_size, stat.st_mtime_ns


@functools.cache
def _parquet_label_values(file: tuple[str, int, int], column: str) -> frozenset[Any]:
    """The distinct labels of one parquet shard, reading its label column only (cached: each loader of a run needs
    the train split's)."""
    try:
        with xopen(file[0], "rb") as handle:  # local or remote (hf://...)
            values = pq.ParquetFile(handle).read(columns=[column]).column(column).unique().to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(f"Cannot read the labels of shard {file[0]} ({describe(error)})") from error
    return frozenset(value for value in values if value is not None)
