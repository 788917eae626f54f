"""Offline tests of ``decode_on=<device>``: the workers read encoded bytes, the main process decodes and augments.

The tensor path is the same whatever the device, so it runs here on the CPU (torchvision decodes JPEGs there too);
only nvjpeg itself needs a GPU.
"""

from __future__ import annotations

import gc
import pathlib
import weakref

import pytest
import torch
import torchvision
from data_fixtures import (
    batch_ids,
    image_bytes,
    make_parquet_shards,
    read_with_a_restart,
)

from modeling_mae.data.loader import ImageStreamLoader, build_dataloader
from modeling_mae.data.sources import DataArguments
from modeling_mae.data.transforms import (
    decode_images_on_device,
    eval_transform,
    pretrain_transform,
)

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they are what decode_images_on_device uses.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
# Solid-colour images survive the random crop and flip, so with mean 0 / std 1 every pixel still reads back the id.
ID_PRETRAIN = pretrain_transform(8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
# JPEGs (the device's own decoder), a truncated JPEG and garbage (both skipped), and formats that fall back to PIL.
KINDS = {i: "jpeg" for i in range(24)} | {1: "truncated", 2: "cmyk", 4: "gray16", 5: "garbage", 8: "palette", 9: "rgb"}


def make_source(
    tmp_path: pathlib.Path, num_samples: int, num_shards: int = 2, kinds: dict[int, str] | None = None
) -> str:
    kinds = {i: "jpeg" for i in range(num_samples)} | (kinds or {})
    make_parquet_shards(tmp_path, num_samples, num_shards=num_shards, kinds=kinds)
    return str(tmp_path)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_device_path_yields_the_workers_images_and_skips_the_bad(tmp_path: pathlib.Path, num_workers: int) -> None:
    source = make_source(tmp_path, 24, kinds=KINDS)
    loaders = {
        decode_on: build_dataloader(DataArguments(dataset_name=source, dataloader_num_workers=num_workers,
                                                  decode_on=decode_on), "train", ID_PRETRAIN, 4, train=False)
        for decode_on in ("workers", "cpu")
    }
    batches = {decode_on: list(loader) for decode_on, loader in loaders.items()}
    samples = {
        decode_on: [(i, label) for batch in found for i, label in zip(batch_ids(batch), batch["labels"].tolist())]
        for decode_on, found in batches.items()
    }
    # The same images with the same labels. The device path drops a bad image from its batch instead of refilling it,
    # so with several workers the round-robin interleaves differently sized batches: compare the order with one only.
    in_order = list if num_workers == 0 else sorted
    assert in_order(samples["cpu"]) == in_order(samples["workers"])
    assert len(samples["cpu"]) == 22
    assert {i for i, kind in KINDS.items() if kind == "jpeg"} <= {i for i, _ in samples["cpu"]}  # gray loses the id
    assert loaders["cpu"].skipped_images() == loaders["workers"].skipped_images() == 2
    device_batches = batches["cpu"]
    assert any(len(batch["pixel_values"]) < 4 for batch in device_batches[:-1])
    for batch in device_batches:
        assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape[1:] == (3, 8, 8)
        assert len(batch["labels"]) == len(batch["pixel_values"])


def test_a_loader_that_skipped_images_is_freed_at_once(tmp_path: pathlib.Path) -> None:
    """No reference cycle through the decode errors: one would delay its workers' shutdown by 5 s each."""
    args = DataArguments(dataset_name=make_source(tmp_path, 8, kinds={1: "truncated"}), decode_on="cpu")
    gc.disable()
    try:
        loader = build_dataloader(args, "train", ID_PRETRAIN, 4, train=False)
        assert len(list(loader)) == 2 and loader.skipped_images() == 1
        freed = weakref.ref(loader)
        del loader
        assert freed() is None
    finally:
        gc.enable()


def test_training_epoch_on_the_device_has_fixed_length_and_shapes(tmp_path: pathlib.Path) -> None:
    args = DataArguments(dataset_name=make_source(tmp_path, 30), decode_on="cpu")
    loader = build_dataloader(args, "train", pretrain_transform(16), 4, train=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 30 // 4
    assert all(b["pixel_values"].shape == (4, 3, 16, 16) and b["labels"].shape == (4,) for b in batches)
    assert all(b["pixel_values"].device == b["labels"].device == torch.device("cpu") for b in batches)
    assert loader.num_classes == 3


@pytest.mark.parametrize(("num_workers", "num_shards", "stop_after"), [(0, 2, 3), (2, 3, 3)])
def test_a_resumed_device_stream_continues_exactly_where_it_stopped(
    tmp_path: pathlib.Path, num_workers: int, num_shards: int, stop_after: int
) -> None:
    source = make_source(tmp_path, 44, num_shards=num_shards, kinds={6: "garbage", 30: "truncated"})
    args = DataArguments(dataset_name=source, dataloader_num_workers=num_workers, shuffle_buffer_size=8,
                         decode_on="cpu")

    def loader() -> ImageStreamLoader:
        stream = build_dataloader(args, "train", ID_PRETRAIN, 4, train=True, seed=5)
        stream.set_epoch(2)
        return stream

    uninterrupted, restarted, resumed = read_with_a_restart(loader, stop_after)
    assert restarted == uninterrupted
    assert resumed.skipped_images() == 2


def test_mostly_undecodable_jpegs_stop_with_a_clear_error(tmp_path: pathlib.Path) -> None:
    source = make_source(tmp_path, 40, kinds={i: "truncated" for i in range(40) if i % 4})
    args = DataArguments(dataset_name=source, decode_on="cpu")
    with pytest.raises(RuntimeError, match="could not be decoded"):
        list(build_dataloader(args, "train", ID_PRETRAIN, 4, train=False))


def test_transforms_without_a_device_version_keep_decoding_in_the_workers(tmp_path: pathlib.Path) -> None:
    source = make_source(tmp_path, 8)
    transform = eval_transform(8)
    batches = [next(iter(build_dataloader(DataArguments(dataset_name=source, decode_on=decode_on), "train", transform,
                                          4, train=False))) for decode_on in ("workers", "cpu")]
    assert torch.equal(batches[0]["pixel_values"], batches[1]["pixel_values"])


def test_a_wrong_decode_on_fails_before_training(tmp_path: pathlib.Path) -> None:
    source = make_source(tmp_path, 8)
    with pytest.raises(ValueError, match="decode_on must be 'workers' or a torch device"):
        build_dataloader(DataArguments(dataset_name=source, decode_on="gpu"), "train", ID_PRETRAIN, 4, train=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a GPU"):
            build_dataloader(DataArguments(dataset_name=source, decode_on="cuda"), "train", ID_PRETRAIN, 4, train=True)


def test_non_jpegs_are_decoded_like_in_the_workers() -> None:
    """16-bit PNGs come out as 8-bit RGB (torchvision's own PNG decoder would keep them uint16)."""
    gray16, gray, cmyk = decode_images_on_device([image_bytes(7, k) for k in ("gray16", "gray", "cmyk")], "cpu")
    assert gray16.dtype == gray.dtype == cmyk.dtype == torch.uint8 and gray16.shape == cmyk.shape == (3, 20, 24)
    assert (gray16.int() - gray.int()).abs().max() <= 1


def test_without_torchvisions_deprecated_decoder_pil_decodes_the_same_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = [image_bytes(i, kind) for i, kind in enumerate(("jpeg", "cmyk", "jpeg"))]
    with_torchvision = decode_images_on_device(encoded, "cpu")
    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    for expected, actual in zip(with_torchvision, decode_images_on_device(encoded, "cpu"), strict=True):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
