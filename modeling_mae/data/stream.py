"""The DataLoader workers' side of the stream: records in, decoded and augmented batches out.

Every worker builds whole batches from its own part of the stream and reports, with each batch, how many records it
has consumed and which ones were bad (undecodable, too small, unlabelled): the main process (`loader`) keeps these
positions and counts, so nothing relies on worker-local state. With ``decode_on`` a device the workers only read the
encoded bytes (`DeviceDecoding` decodes them in the main process).

The transform's ``num_channels`` (C) chooses the decoding: for 3, encoded images go through the RGB path as they always
did; for any other C, and for arrays whatever C is, `channels.decode_channels` reads C channels on the data's own
scale, and an image of another channel count is skipped and counted with the reason (``3 channels (RGB image), the
model takes 1``).
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from datasets.utils.file_utils import xopen
from PIL import Image

from ..errors import UsageError
from .channels import RGB_CHANNELS, ChannelMismatch, decode_channels, uses_rgb_path
from .fast_decode import to_rgb
from .labels import LabelColumn
from .shards import ShardGuard
from .sources import KEY_COLUMN
from .transforms import (
    decode_image,
    decode_image_tensor,
    decode_images_on_device,
)

logger = logging.getLogger(__name__)


RECORDS_PER_READ = 64  # records fetched from `datasets` at a time (undecoded bytes, so this is cheap)


MIN_IMAGES_BEFORE_BAD_FRACTION_CHECK = 32  # a few bad files at the start of a shard must not stop a run


PASS_EPOCH_STRIDE = 1_000_003  # seeds the extra passes a worker makes to fill a fixed-length epoch, distinct per epoch


def _record_source(value: Any, dtype: str | None = None) -> bytes | Image.Image | np.ndarray:
    """The image column's value ({"bytes", "path"} from Image(decode=False), raw bytes, an already decoded PIL image,
    an array, or an array column's nested lists) as encoded bytes, the PIL image or an array (of `dtype`, the array
    column's, when given); a path is read once, here."""
    if isinstance(value, dict):
        return value.get("bytes") or _read_file(value["path"])
    if isinstance(value, list):
        return np.asarray(value, dtype=dtype)  # a parquet Array3D/list column, or a webdataset .npy streamed as lists
    return value


def _as_bytes(source: bytes | Image.Image | np.ndarray) -> bytes:
    """Encoded bytes, to be decoded elsewhere (an array: its raw bytes, to be hashed)."""
    if isinstance(source, np.ndarray):
        return source.tobytes()
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
class Columns:
    image: str
    labels: LabelColumn | None  # None: the loader does not read labels, or the data has none
    image_dtype: str | None = None  # an array column's element dtype (Array3D, nested lists); None: encoded images


class UnusableDataError(UsageError, RuntimeError):
    """Most records of the data cannot be used; a RuntimeError too, as it was before it became a user's error."""


@dataclass
class BadImageTally:
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


class WorkerStream(torch.utils.data.IterableDataset):
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
        columns: Columns,
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
        num_channels: int = RGB_CHANNELS,
    ) -> None:
        self.source = source
        self.num_channels = num_channels
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
        self.pass_had_images = False  # whether this worker's current pass over its part has given a usable image

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker_info = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker_info.num_workers, worker_info.id) if worker_info else (1, 0)
        epoch, rotation, *starts = self.control.tolist()
        worker = (worker_id + rotation) % num_workers
        records = self._records(epoch, worker, num_workers, starts[worker])
        try:
            yield from self._batches(records, starts[worker], worker, epoch)
        except UsageError as error:  # raised again by the main process: one line, not a DataLoader worker traceback
            yield {"_error": error.with_traceback(None)}  # a traceback would tie the loader into a reference cycle

    def _records(self, epoch: int, worker: int, num_workers: int, start: int) -> Iterator[dict[str, Any]]:
        """This worker's part of the stream from record `start` on (those before were consumed before a resume), in
        passes over the part while a fixed-length epoch needs more and the last pass gave a usable image."""
        # Workers of all processes are one flat pool: disjoint parts that together cover the stream.
        stream = split_dataset_by_node(
            self.source, rank=self.process_index * num_workers + worker, world_size=self.num_processes * num_workers
        )
        position = 0
        for pass_index in itertools.count():
            stream.set_epoch(epoch + pass_index * PASS_EPOCH_STRIDE)
            self.pass_had_images = False  # `_batches` sets it: it handles each record before it asks for the next
            for columns in stream.iter(batch_size=RECORDS_PER_READ):
                for values in zip(*columns.values()):
                    position += 1
                    if position > start:
                        yield dict(zip(columns, values))
                    else:  # skipped undecoded: taken as usable, as the interrupted run may have found it
                        self.pass_had_images = True
            if not (self.repeat and self.pass_had_images):
                return  # a pass over a part without a usable image, made again, would loop forever

    def _batches(
        self, records: Iterator[dict[str, Any]], position: int, worker: int, epoch: int
    ) -> Iterator[dict[str, Any]]:
        images: list[torch.Tensor | bytes] = []
        labels: list[int] = []
        keys: list[str] = []
        bad_keys: list[str] = []
        tally = BadImageTally(self.max_bad_image_fraction)
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
            self.pass_had_images = True
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

    def _augment(self, image: Image.Image | torch.Tensor, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG (the main process's, without workers) alone
            torch.manual_seed(seed)
            return self.transform(image)

    def _read(self, record: dict[str, Any], key: str, seed: int) -> tuple[torch.Tensor | bytes | None, str | None]:
        """The record's image, augmented, or still encoded when the loader decodes on a device; or None and why not.

        An image smaller than ``min_image_size`` (e.g. smaller than one patch of the model) is skipped: upscaled to the
        model's input it would only teach it blur. So is an image of another channel count than the model's.
        """
        try:
            source = _record_source(record[self.columns.image], self.columns.image_dtype)
            if uses_rgb_path(source, self.num_channels):
                size = _source_size(source) if self.min_image_size > 1 else None
            else:
                source = decode_channels(source, self.num_channels, self.min_decode_side)  # (C, H, W) float32
                size = (source.shape[-1], source.shape[-2])
            if size is not None and min(size) < self.min_image_size:
                return None, f"{size[0]}x{size[1]} px, smaller than {self.min_image_size} px"
            if isinstance(source, torch.Tensor):
                image = source
            elif self.transform is None:
                return _as_bytes(source), None
            elif self.from_bytes is not None:
                # Decoding and augmentation are one step here, so any failure in it means a bad file.
                return self.from_bytes(_as_bytes(source), random.Random(seed)), None
            else:
                image = _as_image(source, self.min_decode_side)
        except ChannelMismatch as mismatch:
            return None, str(mismatch)
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
class DeviceDecoding:
    """The main process's half of ``decode_on=<device>``: decode the workers' encoded batches there and augment them."""

    device: torch.device
    augment: Callable[[Sequence[torch.Tensor]], torch.Tensor]

    def apply(self, batch: dict[str, Any], tally: BadImageTally) -> None:
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
