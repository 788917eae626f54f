"""Images of any channel count through the data pipeline (issue 22): 1-channel 8-bit, 16-bit and float images keep
their values, multi-band arrays (parquet Array3D and list columns, webdataset and image-folder `.npy` files,
channels-first or -last) stream as (B, C, H, W) batches, images of another channel count are skipped and counted or
refused at start-up, and the data set's statistics match numpy's on the same pixels.

The pixels are checked through `eval_transform` at 14 px on 16 px images: its resize is then a no-op and its center
crop keeps rows and columns 1-14, so with mean 0 and std 1 a batch holds the decoded values themselves.
"""

from __future__ import annotations

import io
import json
import logging
import pathlib
from typing import Any

import numpy as np
import pytest
import torch
from data_fixtures import (
    band_arrays,
    make_array_parquet,
    make_image_parquet,
    make_npy_imagefolder,
    make_npy_webdataset,
    single_band_png,
)
from datasets import Array3D, Image, List, Value
from PIL import Image as PILImage

from modeling_mae.data.channels import array_channels_first
from modeling_mae.data.loader import build_dataloader
from modeling_mae.data.sources import (
    IMAGE_COLUMN_CANDIDATES,
    DataArguments,
    detect_column,
    holds_arrays,
)
from modeling_mae.data.statistics import (
    ImageStatistics,
    check_channels,
    compute_image_statistics,
)
from modeling_mae.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    finetune_transform,
    pretrain_transform,
)
from modeling_mae.errors import UsageError
from run_scripts import image_stats

SIZE = 16  # the images' side
CROP = 14  # eval_transform(14): resize to int(14 / 0.875) = 16 (a no-op here), then the central 14 x 14
INSIDE = slice(1, 15)  # the rows and columns that crop keeps


def _encoded(array: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def _rgb_png(gray: np.ndarray) -> bytes:
    return _encoded(np.stack([gray] * 3, axis=-1), "PNG")  # (H, W) -> (H, W, 3)


def read_all(directory: pathlib.Path, num_channels: int, **loader: Any) -> tuple[torch.Tensor, Any]:
    """Every image of the train split as the pipeline decodes it (no augmentation, not normalised): (N, C, 14, 14)."""
    transform = eval_transform(CROP, [0.0] * num_channels, [1.0] * num_channels, num_channels=num_channels)
    data_loader = build_dataloader(DataArguments(dataset_name=str(directory)), "train", transform, 4, train=False,
                                   **loader)
    return torch.cat([batch["pixel_values"] for batch in data_loader]), data_loader


def expected(array: np.ndarray, channels_last: bool) -> np.ndarray:
    """What the pipeline must make of an array, by numpy: (C, 14, 14) on its own scale."""
    chw = array.transpose(2, 0, 1) if channels_last else array
    scale = {np.dtype("uint8"): 1 / 255, np.dtype("uint16"): 1 / 65535}.get(array.dtype, 1.0)
    return chw[:, INSIDE, INSIDE].astype(np.float64) * scale


def assert_same_images(batches: torch.Tensor, references: list[np.ndarray]) -> None:
    """`batches` holds exactly the `references`, in any order (image folders list their files class by class)."""
    assert len(batches) == len(references)
    for image in batches.double().numpy():
        distances = [np.abs(image - reference).max() for reference in references]
        assert min(distances) < 1e-6, f"no reference image matches (closest: {min(distances):.3g} away)"


# --- 1-channel images keep their values ------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "image_format", "scale", "value"), [
    ("uint8", "PNG", 1 / 255, 200), ("uint16", "PNG", 1 / 65535, 1000), ("float32", "TIFF", 1.0, 1000.5)])
def test_single_channel_images_keep_their_values_on_their_own_scale(
    tmp_path: pathlib.Path, dtype: str, image_format: str, scale: float, value: float
) -> None:
    """8-bit (L) and 16-bit (I;16) PNGs and float (F) TIFFs stay one channel, divided by 255, by 65535 (a 16-bit 1000
    is 1000/65535, not squashed through 8 bits) or kept as they are."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, np.iinfo(dtype).max, (SIZE, SIZE), endpoint=True).astype(dtype) if dtype != "float32"
              else rng.uniform(-3, 9, (SIZE, SIZE)).astype(dtype) for _ in range(5)]
    arrays[0][5, 7] = value
    make_image_parquet(tmp_path, [_encoded(array, image_format) for array in arrays])
    images, _ = read_all(tmp_path, num_channels=1)
    assert images.shape == (5, 1, CROP, CROP)
    reference = np.stack([array[INSIDE, INSIDE] for array in arrays])[:, None].astype(np.float64) * scale
    np.testing.assert_allclose(images.double().numpy(), reference, rtol=1e-6, atol=1e-9)
    assert images[0, 0, 4, 6].item() == pytest.approx(value * scale, rel=1e-6)  # row 5, column 7 of the image


# --- Multi-band arrays ------------------------------------------------------------------------------------------------


def _array3d_parquet(directory: pathlib.Path, arrays: list[np.ndarray]) -> None:
    make_array_parquet(directory, arrays)


def _list_parquet(directory: pathlib.Path, arrays: list[np.ndarray]) -> None:
    make_array_parquet(directory, arrays, nested_lists=True)


def _webdataset(directory: pathlib.Path, arrays: list[np.ndarray]) -> None:
    make_npy_webdataset(directory, arrays)


def _image_folder(directory: pathlib.Path, arrays: list[np.ndarray]) -> None:
    make_npy_imagefolder(directory, arrays, split="train")


@pytest.mark.parametrize(("write", "dtype", "channels_last"), [
    (_array3d_parquet, "uint16", False), (_array3d_parquet, "uint8", True), (_array3d_parquet, "float32", True),
    (_list_parquet, "float32", True),
    (_webdataset, "uint8", True), (_webdataset, "uint16", False), (_image_folder, "float32", False),
    (_image_folder, "uint16", True),
], ids=["array3d-chw-uint16", "array3d-hwc-uint8", "array3d-hwc-float32", "lists-hwc-float32", "webdataset-hwc-uint8",
        "webdataset-chw-uint16", "npy-folder-chw-float32", "npy-folder-hwc-uint16"])
def test_four_band_arrays_stream_as_four_channel_batches(
    tmp_path: pathlib.Path, write: Any, dtype: str, channels_last: bool
) -> None:
    """Parquet Array3D and list columns, webdataset .npy members and an image folder of .npy files: every image comes
    out with its 4 bands in order, on its own scale, whichever axis holds the channels."""
    arrays = band_arrays(7, 4, (SIZE, SIZE), dtype, channels_last=channels_last)
    write(tmp_path, arrays)
    images, loader = read_all(tmp_path, num_channels=4)
    assert images.shape == (7, 4, CROP, CROP)
    assert_same_images(images, [expected(array, channels_last) for array in arrays])
    assert loader.skipped_images() == 0


def test_four_band_batches_train_and_carry_their_labels(tmp_path: pathlib.Path) -> None:
    """Through the pretraining transform (random crop, flip) and the fine-tuning one without RandAugment, in batches
    (B, 4, H, W) with the labels of the records."""
    make_array_parquet(tmp_path, band_arrays(8, 4, (20, 24), "uint16"))
    args = DataArguments(dataset_name=str(tmp_path))
    for transform in (pretrain_transform(SIZE, [0.5] * 4, [0.25] * 4, num_channels=4),
                      finetune_transform(SIZE, [0.5] * 4, [0.25] * 4, num_channels=4, rand_augment=False)):
        batches = list(build_dataloader(args, "train", transform, 4, train=True, seed=1))
        assert [tuple(batch["pixel_values"].shape) for batch in batches] == [(4, 4, SIZE, SIZE)] * 2
        assert sorted(torch.cat([batch["labels"] for batch in batches]).tolist()) == sorted(i % 3 for i in range(8))


def test_channels_last_wins_a_tie_and_2d_arrays_are_one_channel() -> None:
    """An array whose first and last axes both have C elements is read as (H, W, C)."""
    tie = np.arange(4 * 5 * 4).reshape(4, 5, 4)
    np.testing.assert_array_equal(array_channels_first(tie, 4), np.moveaxis(tie, -1, 0))
    flat = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(array_channels_first(flat, 1), flat[None])


def test_an_array_column_is_the_image_column_when_no_image_column_is_there() -> None:
    """An Array3D or nested-list column is found as the image column when it is the only image-like one; an Image
    feature or a usual name still comes first, and a 1-D list (e.g. an embedding or tags) is no image."""
    bands = {"bands": Array3D((4, 5, 6), "uint16"), "tags": List(Value("int64")), "label": Value("int64")}
    nested = {"tags": List(Value("float32")), "pixels": List(List(List(Value("float32"))))}
    with_image = {"embedding": List(List(Value("float32"))), "picture": Image(), "bands": Array3D((4, 5, 6), "uint8")}

    def detect(features: dict[str, Any]) -> str | None:
        return detect_column(features, None, Image, IMAGE_COLUMN_CANDIDATES, "Image", fallback=holds_arrays)

    assert [detect(bands), detect(nested), detect(with_image)] == ["bands", "pixels", "picture"]
    assert detect({"name": Value("string"), "tags": List(Value("int64"))}) is None


# --- Images of another channel count -----------------------------------------------------------------------------------


def test_a_mixed_channel_data_set_skips_and_counts_the_odd_images(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """For a 1-channel model, the RGB images among grayscale ones are skipped, counted and logged with their key and
    reason; the grayscale ones come through."""
    rng = np.random.default_rng(0)
    gray = [rng.integers(0, 255, (SIZE, SIZE), endpoint=True).astype(np.uint8) for _ in range(6)]
    encoded = [single_band_png(array) for array in gray]
    for index in (1, 4):
        encoded[index] = _rgb_png(gray[index])
    make_image_parquet(tmp_path, encoded)
    with caplog.at_level(logging.WARNING, logger="modeling_mae"):
        images, loader = read_all(tmp_path, num_channels=1)
    assert loader.skipped_images() == 2
    assert_same_images(images, [gray[i][None, INSIDE, INSIDE] / 255 for i in (0, 2, 3, 5)])
    skipped = sorted(record.getMessage() for record in caplog.records if "Skipped a record" in record.getMessage())
    assert skipped == [f"Skipped a record: {index}.png (3 channels (RGB image), the model takes 1)" for index in (1, 4)]


def test_check_channels_refuses_a_data_set_that_cannot_match_in_one_line(tmp_path: pathlib.Path) -> None:
    """RGB images for a 1-channel model, and 4-band arrays for a 3-channel one, are refused naming both counts;
    grayscale images pass for 1 channel and for 3 (the RGB path expands them), and so does a mixed data set, each
    giving the rescale factor of its pixels."""
    rng = np.random.default_rng(0)
    gray = [rng.integers(0, 255, (SIZE, SIZE), endpoint=True).astype(np.uint8) for _ in range(4)]
    make_image_parquet(tmp_path / "rgb", [_rgb_png(array) for array in gray])
    make_image_parquet(tmp_path / "gray", [single_band_png(array) for array in gray])
    make_image_parquet(tmp_path / "mixed", [_rgb_png(gray[0])] + [single_band_png(array) for array in gray[1:]])
    make_npy_webdataset(tmp_path / "bands", band_arrays(4, 4, (SIZE, SIZE), "uint16"))
    for folder, num_channels, found in (("rgb", 1, 3), ("bands", 3, 4)):
        with pytest.raises(UsageError) as refused:
            check_channels(DataArguments(dataset_name=str(tmp_path / folder)), num_channels)
        message = str(refused.value)
        assert "\n" not in message
        assert f"images have {found} channels" in message and f"num_channels={num_channels}" in message, message
    passed = {(folder, num_channels): check_channels(DataArguments(dataset_name=str(tmp_path / folder)), num_channels)
              for folder, num_channels in (("gray", 1), ("gray", 3), ("mixed", 1), ("bands", 4))}
    assert passed == {("gray", 1): 1 / 255, ("gray", 3): 1 / 255, ("mixed", 1): 1 / 255, ("bands", 4): 1 / 65535}


# --- The data set's statistics -----------------------------------------------------------------------------------------


def _numpy_statistics(pixels: list[np.ndarray], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over every pixel of (C, H, W) images of any sizes, by numpy."""
    flat = np.concatenate([image.reshape(image.shape[0], -1).astype(np.float64) * scale for image in pixels], axis=1)
    return flat.mean(1), flat.std(1)


def test_statistics_of_16_bit_images_of_several_sizes_match_numpy(tmp_path: pathlib.Path) -> None:
    """1-channel 16-bit PNGs of different sizes (so every pixel weighs the same, not every image) and an unreadable
    record (skipped): numpy's mean and std over the same pixels / 65535; only the first max_images are read."""
    rng = np.random.default_rng(0)
    sizes = [(16, 16), (30, 20), (9, 40), (25, 25), (12, 18), (16, 16)]
    arrays = [(rng.integers(0, 4000, size) + 3000 * index).astype(np.uint16) for index, size in enumerate(sizes)]
    encoded = [single_band_png(array) for array in arrays]
    encoded.insert(2, b"not an image")
    make_image_parquet(tmp_path, encoded)
    statistics = compute_image_statistics(DataArguments(dataset_name=str(tmp_path)), 1, max_images=6)
    mean, std = _numpy_statistics([array[None] for array in arrays[:5]], 1 / 65535)  # 6 records: 5 images + 1 bad
    np.testing.assert_allclose(statistics.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(statistics.std, std, rtol=1e-6)
    assert (statistics.images, statistics.rescale_factor) == (5, pytest.approx(1 / 65535))


def test_statistics_of_four_band_float_arrays_match_numpy(tmp_path: pathlib.Path) -> None:
    """Channels-last float32 bands of different offsets, kept on their own scale: per-channel mean and std."""
    arrays = [array + np.array([0, 100, -50, 7], np.float32) for array in band_arrays(9, 4, (SIZE, 12), "float32",
                                                                                      channels_last=True)]
    make_npy_imagefolder(tmp_path, arrays)
    statistics = compute_image_statistics(DataArguments(dataset_name=str(tmp_path)), 4)
    mean, std = _numpy_statistics([array.transpose(2, 0, 1) for array in arrays], 1.0)
    np.testing.assert_allclose(statistics.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(statistics.std, std, rtol=1e-6)
    assert (statistics.images, statistics.rescale_factor) == (9, 1.0)


def test_statistics_refuse_a_constant_channel(tmp_path: pathlib.Path) -> None:
    arrays = band_arrays(4, 4, (SIZE, SIZE), "uint16")
    for array in arrays:
        array[2] = 123
    make_array_parquet(tmp_path, arrays)
    with pytest.raises(UsageError, match=r"^Channel 2 has std 0 over the 4 images read \(every pixel is 0\.00187"):
        compute_image_statistics(DataArguments(dataset_name=str(tmp_path)), 4)


def test_the_statistics_command_prints_the_flags_and_writes_the_json(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arrays = band_arrays(5, 2, (SIZE, SIZE), "uint8")
    make_npy_webdataset(tmp_path / "data", arrays)
    output = tmp_path / "stats" / "bands.json"
    returned = image_stats.main(["--dataset_name", str(tmp_path / "data"), "--num_channels", "2",
                                 "--output", str(output)])
    written = json.loads(output.read_text())
    mean, std = _numpy_statistics(arrays, 1 / 255)
    assert written == returned and written["images"] == 5 and written["rescale_factor"] == pytest.approx(1 / 255)
    np.testing.assert_allclose(written["image_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(written["image_std"], std, rtol=1e-6)
    printed = capsys.readouterr().out
    flags = printed.split("Normalise with: ")[1].splitlines()[0].split()
    assert flags[0] == "--image_mean" and flags[3] == "--image_std"
    np.testing.assert_allclose([float(value) for value in flags[1:3] + flags[4:6]], [*mean, *std], rtol=1e-5)
    assert f"--image_stats {output}" in printed
    assert ImageStatistics.read(output).to_json() == written  # what --image_stats FILE reads
    (tmp_path / "other.json").write_text('{"mean": [0.5]}')
    with pytest.raises(UsageError, match="holds no image statistics"):
        ImageStatistics.read(tmp_path / "other.json")


# --- Transforms on C channels ------------------------------------------------------------------------------------------


def test_transforms_normalise_c_channels_and_refuse_what_cannot_work_on_them() -> None:
    """Every builder carries its channel count; normalisation is per channel (checked by numpy); RandAugment is
    refused for other than 1 or 3 channels, and statistics of another length than the channels are refused, each in
    one line; the fused and device versions are RGB only."""
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 2.0, 4.0]
    transforms = [pretrain_transform(CROP, mean, std, num_channels=4), eval_transform(CROP, mean, std, num_channels=4),
                  finetune_transform(CROP, mean, std, num_channels=4, rand_augment=False)]
    assert [transform.num_channels for transform in transforms] == [4, 4, 4]
    assert (transforms[0].from_bytes, transforms[0].device_augment) == (None, None)
    assert pretrain_transform(CROP).num_channels == 3 and pretrain_transform(CROP).from_bytes is not None
    image = torch.rand(4, SIZE, SIZE)
    reference = (image.numpy()[:, INSIDE, INSIDE] - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(transforms[1](image).numpy(), reference, rtol=1e-5, atol=1e-6)
    gray = finetune_transform(CROP, [0.5], [0.5], num_channels=1)  # RandAugment works on one channel
    assert {gray(torch.rand(1, 20, 24)).shape for _ in range(100)} == {(1, CROP, CROP)}  # every operation drawn
    refusals = [
        (lambda: finetune_transform(CROP, mean, std, num_channels=4),
         "RandAugment's colour operations work on 1 or 3 channels, and the images have 4: pass --no_rand_augment."),
        (lambda: pretrain_transform(CROP, IMAGENET_MEAN, IMAGENET_STD, num_channels=4),
         "The images have 4 channels, and the normalisation 3 mean and 3 std values: pass one of each per channel."),
        (lambda: eval_transform(CROP, [0.5], [0.5, 0.5], num_channels=1),
         "The images have 1 channels, and the normalisation 1 mean and 2 std values: pass one of each per channel."),
    ]
    for build, message in refusals:
        with pytest.raises(UsageError) as refused:
            build()
        assert str(refused.value) == message
