"""Messy data at the data layer: string and ClassLabel labels, records without a usable label, images smaller than a
patch, and shards that cannot be read (found before training, or failing while streaming)."""

from __future__ import annotations

import itertools
import logging
import pathlib
import tarfile
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
import pytest
from data_fixtures import (
    CLASS_NAMES,
    batch_ids,
    make_imagefolder,
    make_parquet_shards,
    make_webdataset,
    read_with_a_restart,
    truncate,
)

from modeling_mae.data import loader as data_loader
from modeling_mae.data import shards, sources
from modeling_mae.data.loader import build_dataloader
from modeling_mae.data.shards import ShardGuard, ShardReadError
from modeling_mae.data.sources import DataArguments
from modeling_mae.data.transforms import eval_transform, pretrain_transform
from modeling_mae.errors import UsageError

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
    monkeypatch.setattr(sources, "find_bad_shards", lambda files: {})
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
