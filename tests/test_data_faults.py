"""Messy data at the data layer: string, integer and ClassLabel labels, records without a usable label, images smaller
than a patch, shards that cannot be read (found before training, or failing while streaming), errors that are not the
shard's, and splits that yield nothing or less than a batch."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import pathlib
import signal
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pytest
from accelerate.state import AcceleratorState, GradientState
from data_fixtures import (
    CLASS_NAMES,
    batch_ids,
    corrupt_page,
    empty_parquet,
    make_imagefolder,
    make_parquet_shards,
    make_webdataset,
    read_with_a_restart,
    truncate,
)

from modeling_mae.data import loader as data_loader
from modeling_mae.data import shards
from modeling_mae.data.loader import build_dataloader
from modeling_mae.data.shards import ShardGuard, ShardReadError
from modeling_mae.data.sources import DataArguments
from modeling_mae.data.transforms import eval_transform, pretrain_transform
from modeling_mae.errors import EXIT_USAGE, UsageError, run_main
from run_scripts.run_finetune import main as finetune_main
from run_scripts.run_linear_probe import main as linear_probe_main
from run_scripts.run_mae import main as pretrain_main

ID_TRANSFORM = eval_transform(8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # encoded_id reads each sample's id back
UNSORTED_NAMES = ("fish", "cat", "dog")  # sample i is UNSORTED_NAMES[i % 3]; sorted, fish is class 2


def ids_and_labels(loader: data_loader.ImageStreamLoader) -> list[tuple[int, int]]:
    return [pair for batch in loader for pair in zip(batch_ids(batch), batch["labels"].tolist())]


def ids_of(loader: data_loader.ImageStreamLoader) -> list[int]:
    return [sample_id for batch in loader for sample_id in batch_ids(batch)]


# --- Labels ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_string_labels_are_numbered_by_sorted_name_over_the_train_split(
    tmp_path: pathlib.Path, num_workers: int
) -> None:
    make_parquet_shards(tmp_path, 12, labels="string", names=UNSORTED_NAMES)
    # The validation split holds two of the names only: numbered on their own, dog would be 0, not 1.
    make_parquet_shards(tmp_path, 6, num_shards=1, split="validation", labels="string", names=("dog", "fish"))
    args = DataArguments(dataset_name=str(tmp_path), dataloader_num_workers=num_workers)
    train = build_dataloader(args, "train", ID_TRANSFORM, 4, train=False)
    validation = build_dataloader(args, "validation", ID_TRANSFORM, 4, train=False)
    assert train.class_names == validation.class_names == ["cat", "dog", "fish"] and train.num_classes == 3
    class_of = {"fish": 2, "cat": 0, "dog": 1}
    assert sorted(ids_and_labels(train)) == [(i, class_of[UNSORTED_NAMES[i % 3]]) for i in range(12)]
    assert sorted(ids_and_labels(validation)) == [(i, 1 if i % 2 == 0 else 2) for i in range(6)]


def test_a_validation_label_the_train_split_lacks_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    make_parquet_shards(tmp_path, 12, labels="string")
    make_parquet_shards(tmp_path, 6, num_shards=1, split="validation", labels="string", names=("cat", "bird"))
    args = DataArguments(dataset_name=str(tmp_path))
    with pytest.raises(UsageError, match=r"'validation' split has label\(s\) that the 'train' split has not: 'bird'"):
        build_dataloader(args, "validation", ID_TRANSFORM, 4, train=False)


def test_integer_validation_labels_the_train_split_lacks_are_refused_alike(tmp_path: pathlib.Path) -> None:
    """k-NN and the linear probe take their classes from the train split: labels 3-5 could never be predicted."""
    make_parquet_shards(tmp_path, 12, labels="int")  # 0, 1, 2
    make_parquet_shards(tmp_path, 12, num_shards=1, split="validation", labels="int", names=tuple("abcdef"))  # 0-5
    args = DataArguments(dataset_name=str(tmp_path))
    with pytest.raises(UsageError) as raised:
        build_dataloader(args, "validation", ID_TRANSFORM, 4, train=False)
    assert str(raised.value) == ("The 'validation' split has label(s) that the 'train' split has not: 3, 4, 5. The "
                                 "classes are the train split's 3 labels, so these cannot be scored.")
    # --num_labels 6 (fine-tuning) makes them class ids of a 6-class head: scorable.
    six_classes = build_dataloader(args, "validation", ID_TRANSFORM, 4, train=False, num_classes=6)
    assert sorted(ids_and_labels(six_classes)) == [(i, i % 6) for i in range(12)]


def test_a_split_without_the_label_column_names_the_flag_and_its_columns(tmp_path: pathlib.Path) -> None:
    """`datasets` gives the validation split the train split's columns: its records would all come without a label."""
    make_parquet_shards(tmp_path, 12)
    bare = make_parquet_shards(tmp_path, 6, num_shards=1, split="validation", labels=None)[0]
    with pytest.raises(UsageError) as raised:
        build_dataloader(DataArguments(dataset_name=str(tmp_path)), "validation", ID_TRANSFORM, 4, train=False)
    assert str(raised.value) == (
        f"The 'validation' split has no label column 'label': the columns of {bare} are image. Name its label column "
        "with --label_column_name, or choose a split with labels.")


def test_string_labels_of_a_webdataset_are_read_from_the_stream(tmp_path: pathlib.Path) -> None:
    make_webdataset(tmp_path, 9, string_labels=True)
    loader = build_dataloader(DataArguments(dataset_name=str(tmp_path), label_column_name="txt"), "train", ID_TRANSFORM,
                              4, train=False)
    assert loader.class_names == list(CLASS_NAMES)
    assert sorted(ids_and_labels(loader)) == [(i, i % 3) for i in range(9)]


def test_an_image_folder_gives_class_label_names_from_its_folders(tmp_path: pathlib.Path) -> None:
    make_imagefolder(tmp_path, 9, split="train")
    make_imagefolder(tmp_path, 6, split="validation")
    args = DataArguments(dataset_name=str(tmp_path))
    loaders = [build_dataloader(args, split, ID_TRANSFORM, 4, train=False) for split in ("train", "validation")]
    assert [loader.class_names for loader in loaders] == [list(CLASS_NAMES)] * 2
    assert sorted(ids_and_labels(loaders[1])) == [(i, i % 3) for i in range(6)]


@pytest.mark.parametrize("labels", ["string", "classlabel"])
def test_a_loader_without_labels_never_reads_the_label_column(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, labels: str
) -> None:
    make_parquet_shards(tmp_path, 8, labels=labels)

    def no_labels(*args: object) -> None:
        raise AssertionError("the label column was read")

    monkeypatch.setattr(data_loader, "resolve_labels", no_labels)
    loader = build_dataloader(DataArguments(dataset_name=str(tmp_path)), "train", pretrain_transform(8), 4, train=True,
                              labels=False)
    assert [set(batch) for batch in loader] == [{"pixel_values"}] * 2 and not loader.has_labels


def test_records_without_a_usable_label_are_skipped_and_counted(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    from data_fixtures import image_bytes
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    (tmp_path / "string" / "data").mkdir(parents=True)
    (tmp_path / "classlabel" / "data").mkdir(parents=True)
    images = [{"bytes": image_bytes(i), "path": f"{i}.png"} for i in range(6)]
    for form, feature, values in (("string", Value("string"), ["cat", None, "dog", "cat", None, "dog"]),
                                  ("classlabel", ClassLabel(names=["cat", "dog"]), [0, -1, 1, 0, -1, 1])):
        Dataset.from_dict({"image": images, "label": values}, features=Features(
            {"image": ImageFeature(), "label": feature})).to_parquet(str(tmp_path / form / "data" / "train-0.parquet"))
        loader = build_dataloader(DataArguments(dataset_name=str(tmp_path / form)), "train", ID_TRANSFORM, 4,
                                  train=False)
        with caplog.at_level(logging.WARNING, logger="modeling_mae.data"):
            assert sorted(ids_and_labels(loader)) == [(0, 0), (2, 1), (3, 0), (5, 1)]
        assert loader.skipped_images() == 2
    assert "Skipped a record: 1.png (no label)" in caplog.text
    assert "Skipped a record: 4.png (label -1 is no class id)" in caplog.text


# --- Images smaller than a patch -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fast_decode", "decode_on"), [(True, "workers"), (False, "workers"), (True, "cpu")])
def test_images_smaller_than_a_patch_are_skipped_and_counted(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, fast_decode: bool, decode_on: str
) -> None:
    make_parquet_shards(tmp_path, 12, kinds={3: "pixel", 7: "tiny"})  # 1x1 and 3x2 px
    args = DataArguments(dataset_name=str(tmp_path), fast_decode=fast_decode, decode_on=decode_on)
    loader = build_dataloader(args, "train", pretrain_transform(8), 4, train=False, min_image_size=4)
    with caplog.at_level(logging.WARNING, logger="modeling_mae.data"):
        assert sum(batch["pixel_values"].shape[0] for batch in loader) == 10
    assert loader.skipped_images() == 2
    assert "3.png (1x1 px, smaller than 4 px)" in caplog.text and "7.png (3x2 px, smaller than 4 px)" in caplog.text
    everything = build_dataloader(args, "train", pretrain_transform(8), 4, train=False)  # library default: keep all
    assert sum(batch["pixel_values"].shape[0] for batch in everything) == 12 and everything.skipped_images() == 0


# --- Bad shards found before training -------------------------------------------------------------------------------


def member_boundary(path: pathlib.Path) -> int:
    """A byte offset between two members of a tar: `tarfile`'s stream reader ends there without any error."""
    with tarfile.open(path) as tar:
        return list(tar)[4].offset


def inside_member(path: pathlib.Path) -> int:
    """A byte offset inside a member's data: `tarfile`'s stream reader raises "unexpected end of data"."""
    with tarfile.open(path) as tar:
        return list(tar)[4].offset_data + 10


def make_shards(folder: pathlib.Path, form: str, num_samples: int = 24, num_shards: int = 4) -> list[pathlib.Path]:
    maker = make_parquet_shards if form == "parquet" else make_webdataset
    return maker(folder, num_samples, num_shards=num_shards)


def shard_ids(form: str, shard: int, num_samples: int = 24, num_shards: int = 4) -> set[int]:
    """The sample ids the fixtures put in a shard: contiguous for parquet, one in `num_shards` for webdataset."""
    if form == "parquet":
        size = num_samples // num_shards
        return set(range(shard * size, (shard + 1) * size))
    return set(range(shard, num_samples, num_shards))


CUTS = [("parquet", "half"), ("webdataset", "inside"), ("webdataset", "boundary")]


def cut(path: pathlib.Path, how: str) -> None:
    truncate(path, {"half": lambda _: None, "inside": inside_member, "boundary": member_boundary}[how](path))


@pytest.mark.parametrize(("form", "how"), CUTS)
def test_bad_local_shards_stop_before_training_in_one_line(tmp_path: pathlib.Path, form: str, how: str) -> None:
    paths = make_shards(tmp_path, form)
    for index in (1, 2):
        cut(paths[index], how)
    with pytest.raises(UsageError) as raised:
        build_dataloader(DataArguments(dataset_name=str(tmp_path)), "train", ID_TRANSFORM, 4, train=True)
    message = str(raised.value)
    assert "\n" not in message and "--skip_bad_shards" in message and message.startswith("2 unreadable shard(s)")
    assert str(paths[1]) in message and str(paths[2]) in message and str(paths[0]) not in message


@pytest.mark.parametrize(("form", "how"), CUTS)
def test_skip_bad_shards_goes_on_without_them_and_counts_them(tmp_path: pathlib.Path, form: str, how: str) -> None:
    paths = make_shards(tmp_path, form)
    cut(paths[2], how)
    args = DataArguments(dataset_name=str(tmp_path), skip_bad_shards=True)
    loader = build_dataloader(args, "train", ID_TRANSFORM, 4, train=False)
    good = set(range(24)) - shard_ids(form, 2)
    assert loader.num_samples == 18 and Counter(ids_of(loader)) == Counter(good)
    assert loader.skipped_shards() == [str(paths[2])] and loader.state_dict()["skipped_shards"] == [str(paths[2])]


def test_a_tar_with_a_zeroed_header_is_found_bad(tmp_path: pathlib.Path) -> None:
    """A zero block where a header should be ends `tarfile`'s walk early, silently: the rest must be zeros."""
    paths = make_webdataset(tmp_path, 24, num_shards=1)
    blob = bytearray(paths[0].read_bytes())
    start = member_boundary(paths[0])
    blob[start : start + tarfile.BLOCKSIZE] = bytes(tarfile.BLOCKSIZE)
    paths[0].write_bytes(bytes(blob))
    assert "corrupt tar file" in shards.find_bad_shards([str(paths[0])])[str(paths[0])]


# --- Shards that fail while streaming (remote reads) ----------------------------------------------------------------


@pytest.fixture
def remote_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards as a remote source has them: not checked before training, so that a bad one fails while streaming; and
    no waiting between the read attempts."""
    monkeypatch.setattr(shards, "find_bad_shards", lambda files: {})
    monkeypatch.setattr(shards, "SHARD_RETRY_DELAY_S", 0.0)


def loader_with_a_cut_shard(
    folder: pathlib.Path, form: str, how: str, **flags: object
) -> tuple[pathlib.Path, data_loader.ImageStreamLoader]:
    """An evaluation loader (each record once) over 4 shards, the second one cut; returns that shard and the loader."""
    paths = make_shards(folder, form)
    cut(paths[1], how)
    return paths[1], build_dataloader(DataArguments(dataset_name=str(folder), **flags), "train", ID_TRANSFORM, 4,
                                      train=False)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(("form", "how"), CUTS)
def test_a_shard_failing_mid_stream_stops_the_run_with_its_name(
    tmp_path: pathlib.Path, remote_shards: None, form: str, how: str, num_workers: int
) -> None:
    bad, loader = loader_with_a_cut_shard(tmp_path, form, how, dataloader_num_workers=num_workers)
    with pytest.raises(ShardReadError) as raised:
        list(loader)
    message = str(raised.value)
    assert "\n" not in message and f"shard {bad} could not be read ({shards.SHARD_READ_ATTEMPTS} attempts" in message
    assert "--skip_bad_shards" in message


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(("form", "how"), CUTS)
def test_a_shard_failing_mid_stream_is_skipped_and_counted(
    tmp_path: pathlib.Path, remote_shards: None, form: str, how: str, num_workers: int
) -> None:
    bad, loader = loader_with_a_cut_shard(tmp_path, form, how, dataloader_num_workers=num_workers, skip_bad_shards=True)
    seen = Counter(ids_of(loader))
    good = set(range(24)) - shard_ids(form, 1)
    assert max(seen.values()) == 1 and good <= set(seen) <= good | shard_ids(form, 1)  # what was read before the cut
    assert loader.skipped_shards() == [str(bad)]
    assert ids_of(loader) and loader.skipped_shards() == [str(bad)]  # the next epoch: counted once


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_stream_with_a_skipped_shard_continues_exactly(
    tmp_path: pathlib.Path, remote_shards: None, num_workers: int
) -> None:
    paths = make_shards(tmp_path, "webdataset", num_samples=44)
    cut(paths[2], "inside")  # records before the cut are kept: the resume position counts them
    args = DataArguments(dataset_name=str(tmp_path), dataloader_num_workers=num_workers, shuffle_buffer_size=8,
                         skip_bad_shards=True)

    def loader() -> data_loader.ImageStreamLoader:
        return build_dataloader(args, "train", ID_TRANSFORM, 4, train=True, seed=5)

    uninterrupted, restarted, resumed = read_with_a_restart(loader, stop_after=3)
    assert restarted == uninterrupted and resumed.skipped_shards() == [str(paths[2])]


@pytest.mark.parametrize("num_shards", [4, 3])  # split by shard, and (3 shards, 2 ranks) one record in two
def test_ranks_stay_disjoint_with_a_skipped_shard(tmp_path: pathlib.Path, remote_shards: None, num_shards: int) -> None:
    paths = make_shards(tmp_path, "webdataset", num_samples=48, num_shards=num_shards)
    cut(paths[1], "inside")
    args = DataArguments(dataset_name=str(tmp_path), skip_bad_shards=True)
    per_rank = [ids_of(build_dataloader(args, "train", ID_TRANSFORM, 4, train=False, process_index=rank,
                                        num_processes=2)) for rank in (0, 1)]
    good = set(range(48)) - shard_ids("webdataset", 1, 48, num_shards)
    both = per_rank[0] + per_rank[1]
    assert not set(per_rank[0]) & set(per_rank[1]) and len(set(both)) == len(both)
    assert good <= set(per_rank[0] + per_rank[1]) <= good | shard_ids("webdataset", 1, 48, num_shards)


def test_a_failed_read_is_retried_from_the_record_where_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "SHARD_RETRY_DELAY_S", 0.0)
    calls = itertools.count()

    def flaky_tables(files: list[str]) -> Iterator[tuple[int, pa.Table]]:
        """Three tables of 4 rows; the first two reads fail after 6 rows (in the middle of the second table)."""
        failing = next(calls) < 2
        for index in range(3):
            table = pa.table({"row": list(range(4 * index, 4 * index + 4))})
            if failing and index == 1:
                yield index, table.slice(0, 2)
                raise OSError("connection reset")
            yield index, table

    guard = ShardGuard(flaky_tables, skip_bad_shards=False)
    rows = [row for _, table in guard(files=["hf://shard-0.parquet"]) for row in table.column("row").to_pylist()]
    assert rows == list(range(12)) and next(calls) == 3 and guard.skipped == []


def test_a_shard_given_up_fails_fast_the_next_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next epoch (or another loader) reads it again, cut at the same record, without the retries' waits."""
    monkeypatch.setattr(shards, "SHARD_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(shards, "_GIVEN_UP", set())
    reads = []

    def broken_examples(tar_paths: list[str]) -> Iterator[tuple[int, dict]]:
        reads.append(tar_paths[0])
        yield 0, {"id": 0}
        raise tarfile.ReadError("unexpected end of data")

    guards = [ShardGuard(broken_examples, skip_bad_shards=True) for _ in range(2)]  # e.g. the train and figure loaders
    epochs = [[example["id"] for _, example in guard(tar_paths=["/data/train-0001.tar"])] for guard in guards * 2]
    assert epochs == [[0]] * 4 and len(reads) == shards.SHARD_READ_ATTEMPTS + 3
    assert [guard.take_skipped() for guard in guards] == [["/data/train-0001.tar"] * 2] * 2
    assert guards[0].skipped == []



# --- Errors that are not the shard's ---------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [MemoryError(), pa.ArrowMemoryError("malloc of size 4294967296 failed"),
                                   OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(),
                                   TypeError("a bug of ours")], ids=lambda error: type(error).__name__)
@pytest.mark.parametrize("skip_bad_shards", [False, True])
def test_resource_errors_and_bugs_pass_through_and_mark_no_shard_bad(
    monkeypatch: pytest.MonkeyPatch, error: BaseException, skip_bad_shards: bool
) -> None:
    """Out of memory or disk, Ctrl-C, a bug: the run stops with that error at once, no shard is retried, blamed or
    given up (--skip_bad_shards would otherwise go on without valid data)."""
    monkeypatch.setattr(shards, "_GIVEN_UP", set())
    monkeypatch.setattr(shards, "SHARD_RETRY_DELAY_S", 0.0)
    reads = []

    def failing_tables(files: list[str]) -> Iterator[tuple[int, pa.Table]]:
        reads.append(files[0])
        yield 0, pa.table({"row": [0, 1]})
        raise error

    guard = ShardGuard(failing_tables, skip_bad_shards=skip_bad_shards)
    with pytest.raises(type(error)) as raised:
        list(guard(files=["/data/train-0000.parquet"]))
    assert raised.value is error and reads == ["/data/train-0000.parquet"]
    assert guard.skipped == [] and shards._GIVEN_UP == set()


# --- Splits that yield nothing, or less than a batch -----------------------------------------------------------------


class Hang(BaseException):
    """Raised by `within` in the main thread: a BaseException, so that no `except Exception` of the code swallows it."""


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail a block that runs longer than `seconds` (a hang) instead of waiting for ever (main thread, no workers)."""

    def expire(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_of_shards_all_given_up_stops_in_one_line(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, num_workers: int
) -> None:
    """Every shard fails at its first record (damaged inside, past a whole footer): an epoch yields nothing, and a
    training loop that counted it as an epoch would start the next one for ever."""
    monkeypatch.setattr(shards, "SHARD_RETRY_DELAY_S", 0.0)
    paths = make_parquet_shards(tmp_path, 24, num_shards=2)
    for path in paths:
        corrupt_page(path)
    args = DataArguments(dataset_name=str(tmp_path), skip_bad_shards=True, dataloader_num_workers=num_workers)
    loader = build_dataloader(args, "train", ID_TRANSFORM, 4, train=True)
    with pytest.raises(UsageError) as raised:
        list(loader)
    assert str(raised.value) == (
        "the train split yielded no images: it holds no readable record (2 unreadable shard(s) left out with "
        f"--skip_bad_shards: {paths[0]}; {paths[1]})")


def test_an_epoch_whose_records_are_all_skipped_stops_instead_of_reading_them_again(tmp_path: pathlib.Path) -> None:
    """--max_bad_image_fraction 1 never stops for bad images: a fixed-length epoch must not make pass after pass over
    records that give no image."""
    make_parquet_shards(tmp_path, 12, kinds=dict.fromkeys(range(12), "garbage"))
    args = DataArguments(dataset_name=str(tmp_path), max_bad_image_fraction=1.0)
    loader = build_dataloader(args, "train", ID_TRANSFORM, 4, train=True)
    with within(60), pytest.raises(UsageError, match=r"^the train split yielded no images: all 12 records read were "
                                                     r"skipped \(unreadable"):
        list(loader)


def test_an_evaluation_share_may_be_empty_when_several_processes_read(tmp_path: pathlib.Path) -> None:
    """3 images for 4 processes: the 4th gets nothing, and the metric counts what the others scored."""
    make_parquet_shards(tmp_path, 3, num_shards=1)
    args = DataArguments(dataset_name=str(tmp_path))
    assert ids_of(build_dataloader(args, "train", ID_TRANSFORM, 4, train=False, process_index=3, num_processes=4)) == []


def test_a_split_whose_shards_were_all_left_out_stops_before_reading(tmp_path: pathlib.Path) -> None:
    paths = make_parquet_shards(tmp_path, 24, num_shards=2)
    for path in paths:
        truncate(path)
    with pytest.raises(UsageError) as raised:
        build_dataloader(DataArguments(dataset_name=str(tmp_path), skip_bad_shards=True), "train", ID_TRANSFORM, 4,
                         train=True)
    assert str(raised.value) == (
        "the train split yielded no images: its 2 shard(s) are all unreadable, and --skip_bad_shards left them out: "
        f"{paths[0]} (truncated parquet file (no PAR1 footer)); {paths[1]} (truncated parquet file (no PAR1 footer))")


@pytest.mark.parametrize("train", [True, False])
def test_a_split_of_zero_records_is_said_to_be_empty(tmp_path: pathlib.Path, train: bool) -> None:
    paths = make_parquet_shards(tmp_path, 6, num_shards=2)
    for path in paths:
        empty_parquet(path)
    with pytest.raises(UsageError) as raised:
        build_dataloader(DataArguments(dataset_name=str(tmp_path)), "train", ID_TRANSFORM, 4, train=train)
    assert str(raised.value) == (f"the train split has 0 records ({paths[0]} and 1 more files): point --train_split or "
                                 "--dataset_name at a split with images")


def test_a_zero_row_shard_among_others_is_read_as_empty(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid shard of 0 rows (pyarrow's empty table) is no bad shard: no retries, nothing skipped, no error."""
    monkeypatch.setattr(shards, "SHARD_RETRY_DELAY_S", 0.0)
    paths = make_parquet_shards(tmp_path, 12, num_shards=3)
    empty_parquet(paths[1])
    loader = build_dataloader(DataArguments(dataset_name=str(tmp_path)), "train", ID_TRANSFORM, 4, train=False)
    assert sorted(ids_of(loader)) == [0, 1, 2, 3, 8, 9, 10, 11] and loader.skipped_shards() == []


@pytest.mark.parametrize(("num_samples", "num_processes", "advice"), [
    (3, 1, "fewer than one training batch of 8: pass --per_device_train_batch_size 3 or less"),
    (10, 2, "fewer than one training batch of 8 on each of 2 processes: pass --per_device_train_batch_size 5 or less"),
    (1, 2, "fewer than one training batch of 8 on each of 2 processes: use fewer processes"),
], ids=["one process", "two processes", "fewer images than processes"])
def test_a_training_split_smaller_than_one_batch_is_refused(
    tmp_path: pathlib.Path, num_samples: int, num_processes: int, advice: str
) -> None:
    """Rather than repeated to fill a batch: every step would train on copies of the same few images."""
    make_parquet_shards(tmp_path, num_samples, num_shards=1)
    args = DataArguments(dataset_name=str(tmp_path))
    with pytest.raises(UsageError) as raised:
        build_dataloader(args, "train", ID_TRANSFORM, 8, train=True, num_processes=num_processes)
    assert str(raised.value) == f"the train split has {num_samples} images, {advice}, or train on more images"
    evaluation = build_dataloader(args, "train", ID_TRANSFORM, 8, train=False)  # evaluation reads each image once
    assert sorted(ids_of(evaluation)) == list(range(num_samples))


def script_error(main: Callable[[list[str]], Any], argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """A script's exit status and the last line it wrote to stderr (Accelerate's singletons reset after it)."""
    try:
        with within(120):  # a loop that counts an empty epoch as an epoch never ends
            status = run_main(main, argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return status, capsys.readouterr().err.strip().splitlines()[-1]


EPOCH_LOOPS = {
    "pretraining": (pretrain_main, ["--max_train_steps", "2"]),
    "fine-tuning": (finetune_main, ["--num_train_epochs", "1", "--mixup", "0", "--cutmix", "0"]),
    "linear probe": (linear_probe_main, ["--num_train_epochs", "1"]),
}


@pytest.mark.parametrize("loop", list(EPOCH_LOOPS))
def test_every_epoch_loop_stops_on_a_train_split_that_yields_nothing(
    tmp_path: pathlib.Path, model_config: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    loop: str
) -> None:
    monkeypatch.setattr(shards, "SHARD_RETRY_DELAY_S", 0.0)
    paths = make_parquet_shards(tmp_path / "data", 24, num_shards=2)
    for path in paths:
        corrupt_page(path)  # a whole footer: only reading finds them, and --skip_bad_shards gives each up
    make_parquet_shards(tmp_path / "data", 6, num_shards=1, split="validation")
    main, flags = EPOCH_LOOPS[loop]
    status, error = script_error(main, ["--dataset_name", str(tmp_path / "data"), "--model_config", str(model_config),
                                        "--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "4",
                                        "--skip_bad_shards", *flags], capsys)
    assert status == EXIT_USAGE
    assert error == ("error: the train split yielded no images: it holds no readable record (2 unreadable shard(s) "
                     f"left out with --skip_bad_shards: {paths[0]}; {paths[1]})")


def test_the_linear_probe_refuses_cached_features_fewer_than_one_batch(
    tmp_path: pathlib.Path, model_config: pathlib.Path, capsys: pytest.CaptureFixture
) -> None:
    """Its train features come from an evaluation pass (each image once): the batch is checked on their count."""
    make_parquet_shards(tmp_path / "data", 3, num_shards=1)
    make_parquet_shards(tmp_path / "data", 3, num_shards=1, split="validation")
    status, error = script_error(linear_probe_main, [
        "--dataset_name", str(tmp_path / "data"), "--model_config", str(model_config), "--output_dir",
        str(tmp_path / "run"), "--per_device_train_batch_size", "8", "--num_train_epochs", "1"], capsys)
    assert status == EXIT_USAGE
    assert error == ("error: the train split has 3 images, fewer than one training batch of 8: pass "
                     "--per_device_train_batch_size 3 or less, or train on more images")
