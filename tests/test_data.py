"""Offline tests of the streamed data pipeline on tiny generated shards in the three local layouts."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import pathlib
import random
import struct
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator

import datasets
import numpy as np
import pytest
import torch
from data_fixtures import (
    BAD_KINDS,
    CLASS_NAMES,
    ODD_KINDS,
    batch_ids,
    id_colour,
    image_bytes,
    make_imagefolder,
    make_parquet_shards,
    make_webdataset,
    read_with_a_restart,
)
from datasets.exceptions import DatasetNotFoundError
from PIL import Image, UnidentifiedImageError

from modeling_mae.data import shards
from modeling_mae.data.loader import ImageStreamLoader, build_dataloader
from modeling_mae.data.sources import (
    DataArguments,
    resolve_split_name,
    sample_dataset_path,
)
from modeling_mae.data.transforms import (
    decode_image,
    eval_transform,
    finetune_transform,
    mixup_cutmix,
    pretrain_transform,
)

MAKERS: dict[str, Callable[..., list[pathlib.Path]]] = {
    "parquet": make_parquet_shards,
    "webdataset": make_webdataset,
    "imagefolder": lambda directory, num_samples, num_shards=0, kinds=None: make_imagefolder(directory, num_samples, kinds),
}
MIXED_KINDS = {1: "truncated", 2: "cmyk", 4: "gray", 5: "garbage", 7: "rgba", 8: "palette", 10: "gray16", 11: "tiny"}
# What decoding each bad kind raises (PIL's errors, also on the fused path): the loader skips on any of them.
BAD_KIND_ERRORS = {"truncated": (OSError, "Truncated File Read"),
                   "garbage": (UnidentifiedImageError, "cannot identify")}
# Identity-preserving transform: 8x8 resize of the [0, 1] pixels, so encoded_id reads back each sample's id.
ID_TRANSFORM = eval_transform(8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def make_source(tmp_path: pathlib.Path, form: str, num_samples: int, num_shards: int = 2,
                kinds: dict[int, str] | None = None) -> str:
    folder = tmp_path / form
    MAKERS[form](folder, num_samples, num_shards=num_shards, kinds=kinds)
    return str(folder)


def make_textured_source(tmp_path: pathlib.Path, num_samples: int) -> str:
    """Two parquet shards of noise images, alternately PNG and JPEG: unlike the solid-colour fixtures, every crop and
    flip shows in the pixels."""
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    images = []
    for index in range(num_samples):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buffer, "JPEG" if index % 2 else "PNG")
        images.append({"bytes": buffer.getvalue(), "path": f"{index}.{'jpg' if index % 2 else 'png'}"})
    dataset = Dataset.from_dict({"image": images}, features=Features({"image": ImageFeature()}))
    (tmp_path / "data").mkdir(parents=True)
    for shard in range(2):
        path = tmp_path / "data" / f"train-{shard:05d}-of-00002.parquet"
        dataset.shard(2, shard, contiguous=True).to_parquet(str(path))
    return str(tmp_path)


def epoch_ids(loader: ImageStreamLoader) -> list[int]:
    return [sample_id for batch in loader for sample_id in batch_ids(batch)]


# --- Transforms ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ("rgb", "jpeg") + ODD_KINDS)
@pytest.mark.parametrize("make_transform", [pretrain_transform, eval_transform, finetune_transform])
def test_every_image_mode_becomes_a_normalised_rgb_tensor(kind: str, make_transform: Callable) -> None:
    image = decode_image(image_bytes(7, kind))
    assert image.mode == "RGB"
    pixels = make_transform((16, 12))(Image.open(io.BytesIO(image_bytes(7, kind))))
    assert pixels.shape == (3, 16, 12) and pixels.dtype == torch.float32


def expected_colour(sample_id: int, kind: str) -> torch.Tensor:
    """The colour a solid image of each kind decodes to, computed here: its id colour, or for the grey kinds that
    colour's ITU-R 601-2 luma (PIL's L conversion) on all three channels; in [0, 1], (3,)."""
    colour = torch.tensor(id_colour(sample_id), dtype=torch.float64)
    if kind in ("gray", "gray16"):
        colour = (colour @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)).expand(3)
    return colour.float() / 255


@pytest.mark.parametrize("kind", ("rgb", "jpeg") + ODD_KINDS)
@pytest.mark.parametrize("make_transform", [pretrain_transform, eval_transform])
def test_every_image_mode_keeps_its_colour(kind: str, make_transform: Callable) -> None:
    """Solid images with three different channels (id 1000: 136, 232, 56): every output pixel is the image's colour,
    channels in order, grey on all three, 16 bits rescaled and not clipped; the palette image is dithered, so only
    its mean. Unnormalised (mean 0, std 1), to see the mode conversion alone. Fine-tuning's RandAugment and random
    erasing change colours on purpose."""
    pixels = make_transform((16, 12), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(
        Image.open(io.BytesIO(image_bytes(1000, kind)))
    )
    expected = expected_colour(1000, kind)[:, None, None]  # (3, 1, 1)
    if kind == "palette":
        torch.testing.assert_close(pixels.mean((1, 2), keepdim=True), expected, atol=4 / 255, rtol=0)
    else:
        torch.testing.assert_close(pixels, expected.expand_as(pixels), atol=1.5 / 255, rtol=0)  # JPEG: +-1 level


def test_sixteen_bit_images_are_rescaled_not_clipped() -> None:
    assert abs(decode_image(image_bytes(7, "gray16")).getpixel((0, 0))[0] - decode_image(
        image_bytes(7, "gray")).getpixel((0, 0))[0]) <= 1


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_bytes_raise_on_decode(kind: str) -> None:
    error, message = BAD_KIND_ERRORS[kind]
    with pytest.raises(error, match=message):
        decode_image(image_bytes(3, kind))


@pytest.mark.parametrize("kind", ("rgb", "jpeg") + ODD_KINDS + BAD_KINDS)
def test_the_fused_pretraining_transform_reads_every_format_like_the_plain_one(kind: str) -> None:
    transform = pretrain_transform((16, 12))
    encoded = image_bytes(7, kind)
    if kind in BAD_KINDS:
        error, message = BAD_KIND_ERRORS[kind]
        with pytest.raises(error, match=message):
            transform.from_bytes(encoded, random.Random(0))
        return
    fused = transform.from_bytes(encoded, random.Random(0))
    assert fused.shape == (3, 16, 12) and fused.dtype == torch.float32
    # Solid colours: any crop has the image's colour, so the mode conversions (16-bit rescaled, not clipped) must agree.
    torch.testing.assert_close(fused.mean((1, 2)), transform(decode_image(encoded)).mean((1, 2)), atol=0.02, rtol=0)


def _ramp_statistics(crops: list[torch.Tensor]) -> torch.Tensor:
    """Per crop of a red-horizontal / green-vertical ramp: where the crop is (mean red, green), how wide and tall it is
    (red, green range) and whether it was flipped (red decreasing) -> (N, 5)."""
    stacked = torch.stack(crops)
    red, green = stacked[:, 0], stacked[:, 1]
    width, height = red[:, :, -1].mean(1) - red[:, :, 0].mean(1), green[:, -1].mean(1) - green[:, 0].mean(1)
    return torch.stack([red.mean((1, 2)), green.mean((1, 2)), width.abs(), height, (width < 0).float()], 1)


def test_the_fused_pretraining_transform_draws_the_plain_crop_and_flip_distribution() -> None:
    x, y = np.meshgrid(np.linspace(0, 255, 96), np.linspace(0, 255, 64))
    ramp = Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))
    buffer = io.BytesIO()
    ramp.save(buffer, format="PNG")
    transform = pretrain_transform(16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    torch.manual_seed(0)
    plain = _ramp_statistics([transform(ramp) for _ in range(600)])
    fused = _ramp_statistics([transform.from_bytes(buffer.getvalue(), random.Random(seed)) for seed in range(600)])
    # ~4 standard errors of the difference of two 600-sample means.
    assert ((fused.mean(0) - plain.mean(0)).abs() <= 0.25 * plain.std(0)).all(), (fused.mean(0), plain.mean(0))
    assert ((fused.std(0) - plain.std(0)).abs() <= 0.15 * plain.std(0)).all(), (fused.std(0), plain.std(0))


def test_fast_decode_shrinks_large_jpegs_but_keeps_enough_pixels_for_the_crop() -> None:
    transform = finetune_transform(32)  # pretraining decodes per sampled crop instead (its `from_bytes`)
    large = image_bytes(3, "jpeg", size=(1600, 1200))
    reduced = decode_image(large, min_side=transform.min_source_side)
    assert transform.min_source_side <= min(reduced.size) < 1200
    assert decode_image(large).size == (1600, 1200)


def test_mixup_cutmix_gives_smoothed_soft_targets() -> None:
    pixels, targets = mixup_cutmix(num_classes=5)(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert pixels.shape == (4, 3, 8, 8) and targets.shape == (4, 5)
    assert torch.allclose(targets.sum(1), torch.ones(4)) and targets.min() >= 0.1 / 5 - 1e-6


@pytest.mark.parametrize(("mixup_alpha", "cutmix_alpha"), [(0.8, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_mixup_or_cutmix_alone_and_smoothing_alone(mixup_alpha: float, cutmix_alpha: float) -> None:
    pixels = torch.randn(4, 3, 8, 8)
    mixed, targets = mixup_cutmix(5, mixup_alpha, cutmix_alpha, label_smoothing=0.1)(pixels, torch.tensor([0, 1, 2, 3]))
    assert torch.allclose(targets.sum(1), torch.ones(4)) and targets.min() >= 0.1 / 5 - 1e-6
    if mixup_alpha == cutmix_alpha == 0:
        assert torch.equal(mixed, pixels) and torch.allclose(targets[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))


# --- Sources and bad files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("form", list(MAKERS))
def test_local_forms_yield_every_good_image_once_and_count_the_bad(
    tmp_path: pathlib.Path, form: str, num_workers: int
) -> None:
    args = DataArguments(dataset_name=make_source(tmp_path, form, 24, kinds=MIXED_KINDS),
                         dataloader_num_workers=num_workers)
    loader = build_dataloader(args, "train", ID_TRANSFORM, 4, train=False)
    batches = list(loader)
    ids = [sample_id for batch in batches for sample_id in batch_ids(batch)]
    labels = [label for batch in batches for label in batch["labels"].tolist()]
    good_plain = [i for i in range(24) if i not in MIXED_KINDS]
    assert len(ids) == 24 - 2 and loader.skipped_images() == 2
    assert Counter(i for i in ids if i in good_plain) == Counter(good_plain)
    assert all(label == sample_id % 3 for sample_id, label in zip(ids, labels) if sample_id in good_plain)
    assert loader.num_samples == 24


def test_training_epoch_has_fixed_length_and_shapes(tmp_path: pathlib.Path) -> None:
    args = DataArguments(dataset_name=make_source(tmp_path, "parquet", 30, kinds={3: "garbage"}))
    loader = build_dataloader(args, "train", pretrain_transform(16), 4, train=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 30 // 4
    assert all(b["pixel_values"].shape == (4, 3, 16, 16) and b["labels"].shape == (4,) for b in batches)
    assert loader.class_names == list(CLASS_NAMES) and loader.num_classes == 3


def test_max_train_samples_caps_the_epoch(tmp_path: pathlib.Path) -> None:
    args = DataArguments(dataset_name=make_source(tmp_path, "parquet", 40), max_train_samples=12)
    loader = build_dataloader(args, "train", ID_TRANSFORM, 4, train=False)
    assert loader.num_samples == 12 and len(epoch_ids(loader)) == 12
    above = build_dataloader(dataclasses.replace(args, max_train_samples=100), "train", ID_TRANSFORM, 4, train=False)
    assert above.num_samples == 40 and len(epoch_ids(above)) == 40  # a cap above the split's size leaves it whole


def test_unlabelled_data_yields_pixels_only(tmp_path: pathlib.Path) -> None:
    make_parquet_shards(tmp_path, 8, labels=None)
    loader = build_dataloader(DataArguments(dataset_name=str(tmp_path)), "train", ID_TRANSFORM, 4, train=True)
    assert [set(batch) for batch in loader] == [{"pixel_values"}] * 2 and loader.num_classes is None


def test_mostly_bad_data_stops_with_a_clear_error(tmp_path: pathlib.Path) -> None:
    kinds = {i: "garbage" for i in range(40) if i % 4}
    args = DataArguments(dataset_name=make_source(tmp_path, "parquet", 40, kinds=kinds))
    with pytest.raises(RuntimeError, match="could not be decoded"):
        list(build_dataloader(args, "train", ID_TRANSFORM, 4, train=False))


# --- Distribution, epochs, resumption ------------------------------------------------------------------------------


@pytest.mark.parametrize(("form", "num_shards", "num_workers"),
                         [("parquet", 4, 0), ("parquet", 3, 2), ("webdataset", 2, 2), ("imagefolder", 0, 0)])
def test_two_ranks_see_disjoint_data_that_covers_everything(
    tmp_path: pathlib.Path, form: str, num_shards: int, num_workers: int
) -> None:
    args = DataArguments(dataset_name=make_source(tmp_path, form, 48, num_shards=num_shards),
                         dataloader_num_workers=num_workers, shuffle_buffer_size=16)
    per_rank = [epoch_ids(build_dataloader(args, "train", ID_TRANSFORM, 4, train=True, seed=3, process_index=rank,
                                           num_processes=2)) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 24
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(48))


@pytest.mark.parametrize("num_workers", [0, 2])  # with 2, the persistent workers must see the new epoch
def test_each_epoch_has_a_new_order_and_an_epoch_is_reproducible(tmp_path: pathlib.Path, num_workers: int) -> None:
    args = DataArguments(dataset_name=make_source(tmp_path, "parquet", 32, num_shards=4), shuffle_buffer_size=8,
                         dataloader_num_workers=num_workers)
    loader = build_dataloader(args, "train", ID_TRANSFORM, 4, train=True, seed=1)
    start = time.perf_counter()
    first, again = epoch_ids(loader), epoch_ids(loader)
    loader.set_epoch(1)
    second = epoch_ids(loader)
    assert first == again and first != second and sorted(first) == sorted(second) == list(range(32))
    assert time.perf_counter() - start < 10  # not 5 s of `datasets` thread-shutdown sleep per parquet pass


@pytest.mark.parametrize(("num_workers", "num_shards", "stop_after"), [(0, 2, 3), (2, 3, 3), (2, 4, 4)])
def test_a_resumed_stream_continues_exactly_where_it_stopped(
    tmp_path: pathlib.Path, num_workers: int, num_shards: int, stop_after: int
) -> None:
    source = make_source(tmp_path, "parquet", 44, num_shards=num_shards, kinds={6: "garbage", 30: "truncated"})
    args = DataArguments(dataset_name=source, dataloader_num_workers=num_workers, shuffle_buffer_size=8)

    def loader() -> ImageStreamLoader:
        stream = build_dataloader(args, "train", ID_TRANSFORM, 4, train=True, seed=5)
        stream.set_epoch(2)
        return stream

    uninterrupted, restarted, resumed = read_with_a_restart(loader, stop_after)
    assert restarted == uninterrupted
    assert resumed.skipped_images() == 2
    assert list(resumed) != [] and resumed.state_dict()["epoch"] == 2  # after the resumed epoch: a full epoch again


@pytest.mark.parametrize("fast_decode", [True, False])  # the fused decode + augmentation, and the plain transform
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_stream_draws_the_same_augmentations(
    tmp_path: pathlib.Path, num_workers: int, fast_decode: bool
) -> None:
    args = DataArguments(dataset_name=make_textured_source(tmp_path, 24), dataloader_num_workers=num_workers,
                         shuffle_buffer_size=8, fast_decode=fast_decode)
    transform = pretrain_transform((8, 8))  # random crops and flips

    def loader() -> ImageStreamLoader:
        return build_dataloader(args, "train", transform, 4, train=True, seed=3)

    uninterrupted = [batch["pixel_values"] for batch in loader()]
    interrupted = loader()
    head = [batch["pixel_values"] for batch in itertools.islice(interrupted, 2)]
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    torch.manual_seed(1234)  # the global RNG differs after a restart; the crops must not depend on it
    tail = [batch["pixel_values"] for batch in resumed]
    assert len(head + tail) == len(uninterrupted)
    for got, expected in zip(head + tail, uninterrupted):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("fast_decode", [True, False])
def test_every_record_and_epoch_draws_its_own_crop(tmp_path: pathlib.Path, fast_decode: bool) -> None:
    """16 copies of one noise image: the augmentation seed of each record comes from its place in the stream and the
    epoch, so the 32 crops of two epochs differ (with one seed for all, they would all be the same crop)."""
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    image = {"bytes": buffer.getvalue(), "path": "same.png"}
    (tmp_path / "data").mkdir()
    Dataset.from_dict({"image": [image] * 16}, features=Features({"image": ImageFeature()})).to_parquet(
        str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    loader = build_dataloader(DataArguments(dataset_name=str(tmp_path), fast_decode=fast_decode), "train",
                              pretrain_transform((8, 8)), 4, train=True, seed=0)
    crops = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        crops += [crop for batch in loader for crop in batch["pixel_values"]]
    assert len(crops) == 32 and len({crop.numpy().tobytes() for crop in crops}) >= 30


def test_pretraining_with_and_without_fast_decode_yields_the_same_batches(tmp_path: pathlib.Path) -> None:
    """The fused path (the transform's `from_bytes`) against the plain one: same records, labels, shapes and skips;
    pixels close but not equal (another resize path and other random draws)."""
    source = make_source(tmp_path, "parquet", 40, kinds=MIXED_KINDS | {12: "jpeg", 13: "jpeg"})
    transform = pretrain_transform((16, 12))
    fused_calls: list[bytes] = []

    def spy(encoded: bytes, rng: random.Random) -> torch.Tensor:
        fused_calls.append(encoded)
        return transform.from_bytes(encoded, rng)

    spied = dataclasses.replace(transform, from_bytes=spy)
    loaders = {fast: build_dataloader(DataArguments(dataset_name=source, fast_decode=fast), "train", spied, 4,
                                      train=False) for fast in (True, False)}
    batches = {fast: list(loader) for fast, loader in loaders.items()}
    assert len(fused_calls) == 40  # every record, the bad ones included, went through the fused path, and only once
    fast, plain = batches[True], batches[False]
    shapes = [(4, 3, 16, 12)] * 9 + [(2, 3, 16, 12)]  # 38 readable images
    assert [b["pixel_values"].shape for b in fast] == [b["pixel_values"].shape for b in plain] == shapes
    assert [b["labels"].tolist() for b in fast] == [b["labels"].tolist() for b in plain]
    assert loaders[True].skipped_images() == loaders[False].skipped_images() == 2
    fast_pixels, plain_pixels = (torch.cat([b["pixel_values"] for b in found]) for found in (fast, plain))
    assert not torch.equal(fast_pixels, plain_pixels)
    # Solid colours: each image's channel means survive any crop, so the two paths agree image by image.
    torch.testing.assert_close(fast_pixels.mean((2, 3)), plain_pixels.mean((2, 3)), atol=0.03, rtol=0)
    torch.testing.assert_close(fast_pixels.std(), plain_pixels.std(), atol=0.01, rtol=0.01)


# --- Sample data and errors ------------------------------------------------------------------------------------------


def test_embedded_sample_is_the_default(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # works from any working directory
    args = DataArguments()
    train = build_dataloader(args, "train", pretrain_transform(32), 8, train=True)
    batch = next(iter(train))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and train.num_samples == 10_000 and train.num_classes == 10
    assert resolve_split_name(args, "validation") == "test"
    assert build_dataloader(args, "validation", eval_transform(32), 8, train=False).num_samples == 2_000
    assert (sample_dataset_path() / "LICENSE").is_file() and (sample_dataset_path() / "README.md").is_file()


def test_user_errors_are_clear(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is empty"):
        build_dataloader(DataArguments(dataset_name=str(empty)), "train", ID_TRANSFORM, 2, train=True)
    with pytest.raises(ValueError, match="does not exist"):
        build_dataloader(DataArguments(dataset_name=str(tmp_path / "nope")), "train", ID_TRANSFORM, 2, train=True)
    source = make_source(tmp_path, "parquet", 8)
    with pytest.raises(ValueError, match="available splits: train"):
        build_dataloader(DataArguments(dataset_name=source, train_split="nope"), "train", ID_TRANSFORM, 2, train=True)
    with pytest.raises(ValueError, match="No validation split found; available splits: train"):
        build_dataloader(DataArguments(dataset_name=source), "validation", ID_TRANSFORM, 2, train=False)
    with pytest.raises(ValueError, match="available columns: image, label"):
        build_dataloader(DataArguments(dataset_name=source, image_column_name="pixels"), "train", ID_TRANSFORM, 2,
                         train=True)

    def not_found(*args: object, **kwargs: object) -> None:
        raise DatasetNotFoundError("missing")

    monkeypatch.setattr(datasets, "load_dataset_builder", not_found)  # sources imports it when it loads a source
    with pytest.raises(ValueError, match=r"^--dataset_name someone/no-such-dataset: no such local folder .*hf auth"):
        build_dataloader(DataArguments(dataset_name="someone/no-such-dataset"), "train", ID_TRANSFORM, 2, train=True)


TWO_RANK_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
from data_fixtures import encoded_id
from modeling_mae.data.loader import build_dataloader
from modeling_mae.data.sources import DataArguments
from modeling_mae.data.transforms import eval_transform

accelerator = Accelerator(cpu=True)
args = DataArguments(dataset_name=sys.argv[1], dataloader_num_workers=1, shuffle_buffer_size=8)
transform = eval_transform(8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
loader = build_dataloader(args, "train", transform, 4, train=True, process_index=accelerator.process_index,
                          num_processes=accelerator.num_processes)
ids = [encoded_id(image.mean((1, 2)) * 255) for batch in loader for image in batch["pixel_values"]]
skipped = accelerator.reduce(torch.tensor(loader.skipped_images()), reduction="sum").item()
with open(f"{sys.argv[2]}/rank{accelerator.process_index}.json", "w") as file:
    json.dump({"ids": ids, "world": accelerator.num_processes, "skipped": skipped}, file)
"""


def test_two_real_processes_see_disjoint_data(tmp_path: pathlib.Path) -> None:
    """Two gloo processes under `accelerate launch` (not `--cpu`, which silently runs one process)."""

    kinds = {5: "garbage", 17: "truncated"}
    source = make_source(tmp_path, "parquet", 42, num_shards=4, kinds=kinds)
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT)
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "PYTHONPATH": f"{repo}:{repo / 'tests'}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), source,
               str(tmp_path)]
    subprocess.run(command, env=env, check=True, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world"] for rank in ranks] == [2, 2] and [rank["skipped"] for rank in ranks] == [2, 2]
    assert len(ranks[0]["ids"]) == len(ranks[1]["ids"]) == 42 // 2 // 4 * 4
    assert sorted(ranks[0]["ids"] + ranks[1]["ids"]) == [i for i in range(42) if i not in kinds]


# --- Local shard checks and shard names (mutation testing found these paths untested) --------------------------------


def test_shards_with_a_bad_footer_chunks_past_the_end_or_only_magic_bytes_are_named_with_their_problem(
    tmp_path: pathlib.Path,
) -> None:
    blob = make_parquet_shards(tmp_path / "good", 32, num_shards=1)[0].read_bytes()  # more data than footer
    footer = struct.unpack("<I", blob[-8:-4])[0]  # a parquet file ends with its footer, the footer's length, PAR1
    broken = {
        "footer.parquet": blob[: -8 - footer] + b"\xff" * footer + blob[-8:],  # magic bytes whole, footer garbage
        "pages.parquet": blob[:4] + blob[-8 - footer :],  # header and footer whole, the data pages gone
        "magic.parquet": b"PAR1PAR1",  # both magic bytes and nothing else: 8 bytes
    }
    for name, data in broken.items():
        (tmp_path / name).write_bytes(data)
    problems = shards.find_bad_shards([str(tmp_path / name) for name in broken])
    assert problems[str(tmp_path / "footer.parquet")].startswith("unreadable parquet footer (OSError: ")
    assert problems[str(tmp_path / "pages.parquet")] == "parquet row group 0 ends past the end of the file"
    assert problems[str(tmp_path / "magic.parquet")].startswith("unreadable parquet footer (ArrowInvalid: ")


def test_tars_that_are_no_tar_or_stop_before_a_megabyte_of_junk_are_named_and_a_minimal_end_is_whole(
    tmp_path: pathlib.Path,
) -> None:
    blob = make_webdataset(tmp_path / "good", 4, num_shards=1)[0].read_bytes()  # 4 samples: 8 members of 1 block each
    members_end = 8 * 2 * tarfile.BLOCKSIZE  # each member: a header block and a data block
    shapes = {
        "garbage.tar": b"\x01" * 4096,
        "junk.tar": blob[:members_end] + b"\xff" * (2 << 20),  # the members, then 2 MiB that are no tar header
        "minimal.tar": blob[: members_end + 2 * tarfile.BLOCKSIZE],  # just the 2 end blocks, no record padding
    }
    for name, data in shapes.items():
        (tmp_path / name).write_bytes(data)
    problems = shards.find_bad_shards([str(tmp_path / name) for name in shapes])
    assert problems == {
        str(tmp_path / "garbage.tar"): "unreadable tar file (ReadError: invalid header)",
        str(tmp_path / "junk.tar"): f"corrupt tar file (the archive stops at byte {members_end} of "
                                    f"{members_end + (2 << 20)})",
    }
    assert shards.scan_shard(tmp_path / "minimal.tar").records == 4


def test_only_local_parquet_files_have_columns_read_at_start_up(tmp_path: pathlib.Path) -> None:
    local = make_parquet_shards(tmp_path, 4, num_shards=1)[0]
    assert shards.local_parquet_columns(str(local)) == {"image", "label"}
    assert shards.local_parquet_columns("hf://datasets/org/name/data/train-00000-of-00001.parquet") is None
    assert shards.local_parquet_columns(str(make_webdataset(tmp_path / "wds", 4, num_shards=1)[0])) is None


def test_a_shard_is_named_by_its_first_file_and_how_many_more_it_reads() -> None:
    assert shards.shard_name({"files": ["a.parquet"]}) == "a.parquet"
    assert shards.shard_name({"tar_paths": ["a.tar", "b.tar", "c.tar"]}) == "a.tar (and 2 more files)"
    assert shards.shard_name({"split": "train", "index": 3}) == "{'split': 'train', 'index': 3}"  # no file list


def test_a_shard_given_up_says_why_its_reads_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "SHARD_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(shards, "_GIVEN_UP", set())

    def unreachable(tar_paths: list[str]) -> Iterator[tuple[int, dict]]:
        raise ConnectionError("connection reset by peer")
        yield  # a generator, as a builder's shard reader is

    with pytest.raises(shards.ShardReadError) as raised:
        list(shards.ShardGuard(unreachable, skip_bad_shards=False)(tar_paths=["hf://x/train-0.tar"]))
    assert str(raised.value) == (
        f"shard hf://x/train-0.tar could not be read ({shards.SHARD_READ_ATTEMPTS} attempts, 0 records read): "
        "ConnectionError: connection reset by peer; replace the file, or pass --skip_bad_shards to go on without it")
