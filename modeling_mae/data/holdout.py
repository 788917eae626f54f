"""A held-out part of the train split, for choosing hyperparameters without looking at the split that is reported.

With ``--holdout_fraction F``, the "train" loader streams the train split less a held-out part, and the "validation"
loader streams that part instead of the validation split. The part is seeded and stratified: every record's image
bytes are hashed with ``--holdout_seed``, and in every class (the whole split, when it has no labels) the ``round(F x
class size)`` records of smallest hash are held out. The choice is kept as one hash threshold per class, so each
process and loader worker decides alone, in any order, without sharing record indices; an image stored twice lands on
one side only (no copy of a held-out image is trained on). Finding the thresholds reads the split's labels and encoded
images once, without decoding them: seconds for the data sets it is meant for (up to ~100k small images).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from datasets import Image as ImageFeature
from datasets import IterableDataset

from .stream import _as_bytes, _record_source

HASH_BYTES = 8
RECORDS_PER_READ = 1_000


def record_hash(image: Any, seed: int) -> int:
    """The image column's value (encoded bytes, {"bytes", "path"} or a PIL image) hashed with the seed."""
    digest = hashlib.blake2b(_as_bytes(_record_source(image)), digest_size=HASH_BYTES, key=seed.to_bytes(8, "big"))
    return int.from_bytes(digest.digest(), "big")


def class_thresholds(hashes_by_class: dict[Any, list[int]], fraction: float) -> dict[Any, int]:
    """label -> largest hash held out (-1: none): the round(fraction x class size) smallest hashes of each class."""
    thresholds = {}
    for label, hashes in hashes_by_class.items():
        count = round(fraction * len(hashes))
        thresholds[label] = sorted(hashes)[count - 1] if count else -1
    return thresholds


@dataclass(frozen=True)
class Holdout:
    """Which records of the train split are held out, and how many are on each side."""

    seed: int
    thresholds: dict[Any, int]
    held_out: int  # records held out (duplicates of a held-out image included)
    kept: int  # records trained on

    def is_held_out(self, label: Any, image: Any) -> bool:
        return record_hash(image, self.seed) <= self.thresholds.get(label, -1)


@dataclass(frozen=True)
class HoldoutSide:
    """A stream filter (picklable, for loader workers): keeps the held-out records, or the others."""

    holdout: Holdout
    image_column: str
    label_column: str | None
    held_out: bool

    @property
    def size(self) -> int:
        return self.holdout.held_out if self.held_out else self.holdout.kept

    def __call__(self, record: dict[str, Any]) -> bool:
        label = record[self.label_column] if self.label_column else None
        return self.holdout.is_held_out(label, record[self.image_column]) == self.held_out


def carve_holdout(stream: IterableDataset, image_column: str, label_column: str | None, fraction: float,
                  seed: int) -> Holdout:
    """Read the train split's labels and encoded images once; hold out `fraction` of every class."""
    records = stream.select_columns([image_column, *filter(None, [label_column])])
    if records.features is not None and isinstance(records.features[image_column], ImageFeature):
        records = records.cast_column(image_column, ImageFeature(decode=False))
    hashes_by_class: dict[Any, list[int]] = defaultdict(list)
    for batch in records.iter(batch_size=RECORDS_PER_READ):
        labels = batch[label_column] if label_column else [None] * len(batch[image_column])
        for image, label in zip(batch[image_column], labels, strict=True):
            hashes_by_class[label].append(record_hash(image, seed))
    thresholds = class_thresholds(hashes_by_class, fraction)
    held_out = sum(hash_ <= thresholds[label] for label, hashes in hashes_by_class.items() for hash_ in hashes)
    total = sum(len(hashes) for hashes in hashes_by_class.values())
    return Holdout(seed, thresholds, held_out, total - held_out)

