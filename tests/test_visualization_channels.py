"""Reconstruction figures of images of any channel count (issue 22, item 5): 1 channel in grayscale, more than 3 as the
chosen `--display_channels`, un-normalised with the model config's statistics; checked against pixels computed by hand
with numpy from the same input."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from test_training import run_args
from test_training import run_main as run_mae_main

from modeling_mae import MAEForPreTraining
from modeling_mae.errors import run_main
from modeling_mae.evaluation.visualization import GAP, MIN_TILE_SIDE
from modeling_mae.loops.visualize import render
from run_scripts.visualize import main as visualize_main

SIDE, PATCH, ROWS = 16, 4, 2  # tiny_config's 16x16 images of 4x4 patches
SCALE = MIN_TILE_SIDE // SIDE  # each image pixel is a SCALE x SCALE block of the figure
MASKED, ORIGINAL = 0, 3  # figure columns


def tile_of(figure: Image.Image, row: int, column: int, rows: int = ROWS) -> np.ndarray:
    """`(96, 96, 3)` pixels of one tile of a figure of `rows` rows, under its column titles."""
    pixels = np.asarray(figure.convert("RGB"))
    top = figure.height - rows * (MIN_TILE_SIDE + GAP) - GAP  # the grid is at the bottom, under the titles
    y, x = top + GAP + row * (MIN_TILE_SIDE + GAP), GAP + column * (MIN_TILE_SIDE + GAP)
    return pixels[y : y + MIN_TILE_SIDE, x : x + MIN_TILE_SIDE]


def by_hand(values: np.ndarray, mean: list[float], std: list[float], bands: list[int]) -> np.ndarray:
    """Normalised `(C, H, W)` float32 -> the `(96, 96, 3)` uint8 tile: un-normalised, `bands` as R, G, B, 0..1 -> 0..255,
    each pixel enlarged to a SCALE x SCALE block."""
    unnormalised = values * np.float32(std)[:, None, None] + np.float32(mean)[:, None, None]  # (C, H, W)
    picture = np.round(np.clip(unnormalised[bands], 0, 1) * np.float32(255)).astype(np.uint8)  # (3, H, W)
    return picture.transpose(1, 2, 0).repeat(SCALE, axis=0).repeat(SCALE, axis=1)  # (96, 96, 3)


def removed_patches(seed: int, mask_ratio: float = 0.75) -> np.ndarray:
    """`(ROWS, H, W)` bool: the pixels of the patches removed under `render`'s noise (lowest noise kept, row-major)."""
    patches_per_side = SIDE // PATCH
    noise = torch.rand(ROWS, patches_per_side**2, generator=torch.Generator().manual_seed(seed)).numpy()
    kept = int(patches_per_side**2 * (1 - mask_ratio))
    removed = noise.argsort(axis=1).argsort(axis=1) >= kept  # (ROWS, patches): rank of each patch's noise
    grid = removed.reshape(ROWS, patches_per_side, patches_per_side)  # (ROWS, 4, 4) patches, row-major
    return grid.repeat(PATCH, axis=1).repeat(PATCH, axis=2)  # (ROWS, 16, 16)


def one_error_line(stderr: str) -> str:
    """The script's one error line (the weights' loading bar may precede it); no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def figure_of(
    num_channels: int, mean: list[float], std: list[float], bands: tuple[int, ...] | None
) -> tuple[Image.Image, np.ndarray]:
    model = MAEForPreTraining(tiny_config(num_channels=num_channels, image_mean=mean, image_std=std)).eval()
    # Beyond [0, 1] once un-normalised: the clamp is exercised too.
    values = torch.randn(ROWS, num_channels, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) * 2
    return render(model, values, seed=3, bands=bands), values.numpy()


def test_one_channel_figure_is_grayscale_unnormalised_with_the_configs_statistics() -> None:
    mean, std = [0.25], [0.2]  # neither ImageNet's nor the 0.5 default: the figure must read the config's
    figure, values = figure_of(1, mean, std, bands=None)
    removed = removed_patches(seed=3)
    for row in range(ROWS):
        for column in range(4):
            pixels = tile_of(figure, row, column)
            assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all(), (row, column)
        np.testing.assert_array_equal(tile_of(figure, row, ORIGINAL), by_hand(values[row], mean, std, [0, 0, 0]))
        # Removed patches are the data set's mean (0 once normalised): grey, not ImageNet's tint.
        masked = np.where(removed[row], np.float32(0), values[row])  # (1, H, W)
        np.testing.assert_array_equal(tile_of(figure, row, MASKED), by_hand(masked, mean, std, [0, 0, 0]))


def test_four_band_figure_shows_the_chosen_bands_in_the_chosen_order() -> None:
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]
    figure, values = figure_of(4, mean, std, bands=(3, 0, 2))
    removed = removed_patches(seed=3)
    for row in range(ROWS):
        np.testing.assert_array_equal(tile_of(figure, row, ORIGINAL), by_hand(values[row], mean, std, [3, 0, 2]))
        masked = np.where(removed[row], np.float32(0), values[row])  # (4, H, W)
        np.testing.assert_array_equal(tile_of(figure, row, MASKED), by_hand(masked, mean, std, [3, 0, 2]))
    default, _ = figure_of(4, mean, std, bands=None)  # the first three bands
    np.testing.assert_array_equal(tile_of(default, 0, ORIGINAL), by_hand(values[0], mean, std, [0, 1, 2]))


def visualize_one_file(tmp_path: pathlib.Path, config_fields: dict, image_file: pathlib.Path, *flags: str) -> Image.Image:
    """visualize.py's figure of one `--images` file, from a saved random model of `config_fields`."""
    MAEForPreTraining(tiny_config(**config_fields)).save_pretrained(tmp_path / "model")
    figure = visualize_main(["--model_name_or_path", str(tmp_path / "model"), "--images", str(image_file),
                             "--output", str(tmp_path / "figure.png"), *flags])
    with Image.open(figure) as image:
        return image.convert("RGB")


def eval_crop(pixels: np.ndarray) -> np.ndarray:
    """The eval transform of an 18x18 image for 16x16 models: resized to 16 / 0.875 = 18 (unchanged), centre crop."""
    return pixels[..., 1:17, 1:17]


def test_visualize_draws_a_16_bit_grayscale_png_on_its_own_scale(tmp_path: pathlib.Path) -> None:
    """A 16-bit value v is shown as v / 65535 * 255 in gray (not clipped to 255 as an 8-bit conversion would)."""
    mean, std = [0.4], [0.25]
    raw = np.random.default_rng(0).integers(0, 65536, (18, 18), dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "scan.png")  # mode I;16
    figure = visualize_one_file(tmp_path, {"num_channels": 1, "image_mean": mean, "image_std": std},
                                tmp_path / "scan.png")
    values = eval_crop(raw.astype(np.float32) * np.float32(1 / 65535))[None]  # (1, 16, 16) on the [0, 1] scale
    normalised = (values - np.float32(mean[0])) / np.float32(std[0])  # what the model sees
    original = tile_of(figure, 0, ORIGINAL, rows=1)
    np.testing.assert_array_equal(original, by_hand(normalised, mean, std, [0, 0, 0]))
    assert (original[..., 0] == original[..., 2]).all()


def test_visualize_draws_the_display_channels_of_a_four_band_npy(tmp_path: pathlib.Path) -> None:
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]
    bands = np.random.default_rng(0).uniform(-0.2, 1.2, (18, 18, 4)).astype(np.float32)  # channels-last floats
    np.save(tmp_path / "tile.npy", bands)
    figure = visualize_one_file(tmp_path, {"num_channels": 4, "image_mean": mean, "image_std": std},
                                tmp_path / "tile.npy", "--display_channels", "3,2,1")
    values = eval_crop(bands.transpose(2, 0, 1))  # (4, 16, 16)
    normalised = (values - np.float32(mean)[:, None, None]) / np.float32(std)[:, None, None]
    np.testing.assert_array_equal(tile_of(figure, 0, ORIGINAL, rows=1), by_hand(normalised, mean, std, [3, 2, 1]))


@pytest.mark.parametrize(
    ("flag", "message"),
    [("4,2,1", "each index must be in 0..3"), ("3,2", "must be 3 comma-separated band indices"),
     ("3,2,x", "must be 3 comma-separated band indices")],
)
def test_visualize_refuses_wrong_display_channels_in_one_line_before_reading_data(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], flag: str, message: str
) -> None:
    MAEForPreTraining(tiny_config(num_channels=4)).save_pretrained(tmp_path / "model")
    (tmp_path / "no_images").mkdir()  # an error if it were read
    capsys.readouterr()
    status = run_main(visualize_main, ["--model_name_or_path", str(tmp_path / "model"), "--display_channels", flag,
                                       "--dataset_name", str(tmp_path / "no_images")])
    assert status == 2 and message in one_error_line(capsys.readouterr().err)


def test_visualize_refuses_an_image_of_other_channels_in_one_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    MAEForPreTraining(tiny_config(num_channels=1)).save_pretrained(tmp_path / "model")
    Image.new("RGB", (18, 18), (200, 10, 10)).save(tmp_path / "colour.png")
    capsys.readouterr()
    status = run_main(visualize_main, ["--model_name_or_path", str(tmp_path / "model"), "--images",
                                       str(tmp_path / "colour.png"), "--output", str(tmp_path / "figure.png")])
    line = one_error_line(capsys.readouterr().err)
    reason = line.split("colour.png", 1)[-1]  # both counts named after the file
    assert status == 2 and "colour.png" in line and "3" in reason and "1" in reason, line


def test_run_mae_refuses_display_channels_out_of_range_in_one_line_at_start_up(
    data_dir: pathlib.Path, model_config: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    status = run_main(run_mae_main, run_args(data_dir, model_config, output, "--display_channels", "0,1,3"))
    assert status == 2 and "each index must be in 0..2" in one_error_line(capsys.readouterr().err)
    assert not (output / "run_config.yaml").exists()  # refused before the run started


def test_run_mae_figure_shows_the_display_channels(
    data_dir: pathlib.Path, model_config: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The same untrained run drawn as RGB and as --display_channels 2,1,0: the colour planes swap, nothing else."""
    figures = []
    for name, extra in (("rgb", ()), ("bgr", ("--display_channels", "2,1,0"))):
        run_mae_main(run_args(data_dir, model_config, tmp_path / name, "--max_train_steps", "0", *extra))
        with Image.open(tmp_path / name / "reconstruction.png") as figure:
            figures.append(np.asarray(figure.convert("RGB")))
    rgb, bgr = figures
    assert not (rgb == bgr).all()
    np.testing.assert_array_equal(bgr, rgb[..., ::-1])  # the titles are black on white: the same either way
