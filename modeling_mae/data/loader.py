"""The main process's side of the stream: `ImageStreamLoader`, resumable mid-epoch, and `build_dataloader`, the
one entry point every script uses.

On resume each worker skips the records it had already consumed (cheap: they are not decoded) and the worker
round-robin is rotated, so that batches come out in exactly the uninterrupted order.

A pass that yields no batch at all is a `UsageError` saying why ("the train split yielded no images: ..."), so that no
script counts an empty epoch as an epoch and loops on. Where the cause is known before any reading (a split of 0
records, all of its shards left out, fewer images than one training batch), `build_dataloader` refuses it at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from datasets import ClassLabel as ClassLabelFeature
from datasets import DatasetBuilder, IterableDataset
from datasets import Image as ImageFeature
from PIL import Image

from ..errors import UsageError
from .array_folder import ArrayFolder
from .channels import RGB_CHANNELS
from .holdout import HoldoutSide, carve_holdout
from .labels import resolve_labels
from .shards import ShardGuard, guard_shards
from .sources import (
    DECODE_IN_WORKERS,
    IMAGE_COLUMN_CANDIDATES,
    KEY_COLUMN,
    LABEL_COLUMN_CANDIDATES,
    DataArguments,
    array_dtype,
    available_splits,
    column_types,
    detect_column,
    epoch_samples,
    holds_arrays,
    load_checked_source,
    open_stream,
    pick_split,
    split_flag,
    split_size,
    warn_left_out,
)
from .stream import BadImageTally, Columns, DeviceDecoding, WorkerStream

logger = logging.getLogger(__name__)




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
    """Batches ``{"pixel_values": (B, C, H, W), "labels": (B,)}`` of this process's share of the stream (C: the
    transform's ``num_channels``).

    With ``decode_on`` a device, the tensors are already on it, and a batch with unreadable images has fewer than B.
    Already split by process: do not pass it through ``accelerator.prepare``. A training stream of known length yields
    exactly ``len(self)`` batches per epoch on every process (a worker that runs out starts another pass over its
    part), so that processes stay in step.
    """

    def __init__(
        self,
        stream: WorkerStream,
        *,
        split: str,
        train: bool,
        num_workers: int,
        num_samples: int | None,
        num_processes: int,
        batch_size: int,
        fixed_length: bool,
        device_decoding: DeviceDecoding | None = None,
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
        self.split = split  # the dataset's name of the split, for messages
        # Every training process must get batches; an evaluation split shared by several processes may leave one
        # of them nothing (3 images, 4 processes): the metric then counts what all of them scored.
        self._must_yield = train or num_processes == 1
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
            return int(per_process // self._batch_size)  # >= 1: `build_dataloader` refuses a smaller split
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
        skipped_before = self._skipped
        if limit is None or position.batches < limit:
            yield from self._consume(position, limit)
        if position.batches == 0 and self._must_yield:
            self._stop_workers()
            raise self._no_images_error(sum(position.worker_positions), self._skipped - skipped_before)
        position.completed = True

    def _no_images_error(self, read: int, skipped: int) -> UsageError:
        """Why a pass yielded no batch: no records, no readable shard, every record skipped, or a partial batch."""
        if read == 0 and self._skipped_shards:
            reason = (f"it holds no readable record ({len(self._skipped_shards)} unreadable shard(s) left out with "
                      f"--skip_bad_shards: {'; '.join(self.skipped_shards())})")
        elif read == 0:
            reason = "it holds no records"
        elif skipped == read:
            reason = (f"all {read} records read were skipped (unreadable, smaller than a patch, of another channel "
                      "count or without a label: see the warnings above)")
        else:
            reason = (f"its {read - skipped} usable images are fewer than one batch of {self._batch_size}, and a "
                      "training epoch drops a partial batch")
        share = " (this process's share of it)" if self._num_processes > 1 else ""
        return UsageError(f"the {self.split} split yielded no images{share}: {reason}")

    def _consume(self, position: _StreamPosition, limit: int | None) -> Iterator[dict[str, torch.Tensor]]:
        tally = BadImageTally(self._stream.max_bad_image_fraction)  # the device's share; the workers keep theirs
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


def _prepare_source(
    stream: IterableDataset, columns: Columns, features: dict[str, Any], *, train: bool, seed: int,
    args: DataArguments, max_samples: int | None, holdout_side: HoldoutSide | None = None,
) -> IterableDataset:
    label = columns.labels.column if columns.labels is not None else None
    holdout_label = holdout_side.label_column if holdout_side is not None else None
    keep = [columns.image] + [name for name in dict.fromkeys((label, holdout_label, KEY_COLUMN))
                              if name is not None and name in features]
    stream = stream.select_columns(keep)
    if isinstance(features[columns.image], ImageFeature):
        stream = stream.cast_column(columns.image, ImageFeature(decode=False))  # decode ourselves: skip bad files
    if holdout_side is not None:
        stream = stream.filter(holdout_side)
    if max_samples is not None:
        stream = stream.take(max_samples)
    if train:
        # max_buffer_input_shards=1: interleaving shards uses threads, and on parquet `datasets` then sleeps 5 s at
        # the end of every pass (SLEEP_TIME_ON_THREADS_SHUTDOWN). Shard order is still shuffled every epoch.
        stream = stream.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size, max_buffer_input_shards=1)
    return stream


def _holdout_side(args: DataArguments, stream: IterableDataset, features: dict[str, Any], image_column: str,
                  split: str) -> HoldoutSide | None:
    """With --holdout_fraction, the train split's side that `split` streams, stratified by the label column (even
    for a loader that reads no labels, so that every loader holds out the same records)."""
    if args.holdout_fraction is None:
        return None
    label = detect_column(features, args.label_column_name, ClassLabelFeature, LABEL_COLUMN_CANDIDATES, "Label")
    holdout = carve_holdout(stream, image_column, label, args.holdout_fraction, args.holdout_seed)
    return HoldoutSide(holdout, image_column, label, held_out=split == "validation")


def refuse_fewer_than_a_batch(split_name: str, num_samples: int, batch_size: int, num_processes: int) -> None:
    """A training epoch is whole batches on every process: a split too small for one is refused, rather than repeated
    to fill it (every step would train on copies of the same few images)."""
    if num_samples >= batch_size * num_processes:
        return
    largest = num_samples // num_processes
    on = f" on each of {num_processes} processes" if num_processes > 1 else ""
    advice = f"pass --per_device_train_batch_size {largest} or less" if largest else "use fewer processes"
    raise UsageError(f"the {split_name} split has {num_samples} images, fewer than one training batch of {batch_size}"
                     f"{on}: {advice}, or train on more images")


def _refuse_known_empty(builder: DatasetBuilder, split: str, split_name: str, left_out: dict[str, str]) -> None:
    """A split whose shards were all left out as unreadable, or whose files hold 0 records, stops before any reading."""
    files = (builder.config.data_files or {}).get(split_name)
    if left_out and not files:
        shards = "; ".join(f"{path} ({problem})" for path, problem in left_out.items())
        raise UsageError(f"the {split_name} split yielded no images: its {len(left_out)} shard(s) are all unreadable, "
                         f"and --skip_bad_shards left them out: {shards}")
    if split_size(builder, split_name) == 0:
        more = f" and {len(files) - 1} more files" if files and len(files) > 1 else ""
        where = f"{files[0]}{more}" if files else "split info"
        raise UsageError(f"the {split_name} split has 0 records ({where}): point {split_flag(split)} or "
                         "--dataset_name at a split with images")


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


def _device_decoding(
    decode_on: str, transform: Callable[[Image.Image], torch.Tensor], arrays: bool
) -> DeviceDecoding | None:
    if decode_on == DECODE_IN_WORKERS:
        return None
    device = _decode_device(decode_on)  # checked even where unused: a wrong flag fails before training starts
    augment = getattr(transform, "device_augment", None)
    if augment is None or arrays:
        what = "the images are arrays" if arrays else "this loader's transform has no on-device version"
        logger.info("decode_on=%s: %s; it decodes in the workers.", decode_on, what)
        return None
    return DeviceDecoding(device, augment)


@dataclass(frozen=True)
class OpenSplit:
    """A split opened for streaming: its builder (whose shards read through `guard`), the dataset's name of the
    split, its stream, column types and image column."""

    builder: DatasetBuilder
    name: str
    guard: ShardGuard
    stream: IterableDataset
    features: dict[str, Any]
    image_column: str
    left_out: dict[str, str]  # the split's unreadable shards left out with --skip_bad_shards: {path: problem}

    @property
    def holds_arrays(self) -> bool:
        """Whether the images are arrays (an array column, or a folder of .npy files), not encoded images."""
        return holds_arrays(self.features[self.image_column]) or isinstance(self.builder, ArrayFolder)


def open_split(args: DataArguments, split: str) -> OpenSplit:
    """Open ``split`` ("train" or "validation") of the source for streaming, refusing in one line what cannot be
    streamed (see `build_dataloader`)."""
    builder, left_out = load_checked_source(args)
    split_name = pick_split(split, args, available_splits(builder))
    if split_name is None:
        raise UsageError(f"No validation split found; available splits: {', '.join(available_splits(builder))}.")
    split_left_out = left_out.get(split_name, {})
    for path, problem in split_left_out.items():
        warn_left_out(path, problem)
    _refuse_known_empty(builder, split, split_name, split_left_out)
    guard = guard_shards(builder, args.skip_bad_shards)
    stream = open_stream(builder, split_name)
    features = column_types(stream)
    image_column = detect_column(features, args.image_column_name, ImageFeature, IMAGE_COLUMN_CANDIDATES, "Image",
                                 fallback=holds_arrays)
    if image_column is None:
        raise UsageError(f"No image column found; available columns: {', '.join(features)}. Pass --image_column_name.")
    return OpenSplit(builder, split_name, guard, stream, features, image_column, split_left_out)


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
    labels (see `resolve_labels`; ``num_classes``, when given, must match named labels and bound integer ones).
    Images whose width or height is below ``min_image_size`` (pass the model's patch
    size) are skipped and counted.
    The transform's ``num_channels`` (3 when it has none) is the channel count of the batches: see `stream`.
    Raises `UsageError` for an unknown dataset, a missing split or column (listing what exists), an empty folder, bad
    local shards, validation labels the train split lacks, or a ``decode_on`` that is no usable device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    opened = open_split(args, split)
    builder, split_name, stream, features = opened.builder, opened.name, opened.stream, opened.features
    image_column = opened.image_column
    label_columns = resolve_labels(builder, args, split_name, stream, features, num_classes) if labels else None
    columns = Columns(image_column, label_columns, array_dtype(features[image_column]))
    holdout_side = _holdout_side(args, stream, features, image_column, split)
    max_samples = args.max_train_samples if split == "train" else args.max_eval_samples
    override = args.num_train_samples if split == "train" else None
    known = split_size(builder, split_name) if holdout_side is None else holdout_side.size
    num_samples = epoch_samples(known, override, max_samples)
    fixed_length = train and num_samples is not None
    if fixed_length:
        refuse_fewer_than_a_batch(split_name, num_samples, batch_size, num_processes)
    if train and num_samples is None and num_processes > 1:
        logger.warning("The training stream's length is unknown: pass --num_train_samples so that every process "
                       "runs the same number of steps per epoch.")
    device_decoding = _device_decoding(args.decode_on, transform, opened.holds_arrays)
    worker_stream = WorkerStream(
        _prepare_source(stream, columns, features, train=train, seed=seed, args=args, max_samples=max_samples,
                        holdout_side=holdout_side),
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
        shard_guard=opened.guard,
        num_channels=getattr(transform, "num_channels", RGB_CHANNELS),
    )
    return ImageStreamLoader(
        worker_stream,
        split=split_name,
        train=train,
        num_workers=args.dataloader_num_workers,
        num_samples=num_samples,
        num_processes=num_processes,
        batch_size=batch_size,
        fixed_length=fixed_length,
        device_decoding=device_decoding,
        skipped_shards=list(opened.left_out),
    )
