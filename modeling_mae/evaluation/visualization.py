"""The paper's Figure 2 for a training run: one row per image, under a strip of column titles,
masked | reconstruction | reconstruction + visible | original.

As in the paper, the reconstruction is the raw decoder output on every patch, mapped back to pixels with each
patch's own mean/std when the model regresses normalised pixels (`norm_pix_loss`). No loss is computed on the
visible patches, so their raw output is poor; the third column pastes the visible patches back, as the official
demo notebook does.

Images of any channel count C become 8-bit RGB pictures: un-normalised with the data set's per-channel mean/std (the
model config's) back to the data's own [0, 1] scale (8-bit / 255, 16-bit / 65535), which maps to 0-255 whatever the
data's depth; then three bands are shown as red, green and blue (`display_bands`): C == 1 in grayscale, C == 3 as it
is, C > 3 a chosen band triple (`--display_channels`, default the first three).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ..errors import UsageError

GAP = 2  # pixels of white between tiles
MIN_TILE_SIDE = 96  # small images (the 32x32 sample) are enlarged so they can be seen
COLUMN_TITLES = ("masked", "reconstruction", "reconstruction + visible", "original")
TILE_WIDTH_PER_TITLE_PIXEL = 8  # title font size = tile width / 8 (12 px over the 96-pixel tiles of the sample)
MIN_TITLE_FONT_SIZE = 12
PICTURE_BANDS = 3  # red, green, blue


@torch.no_grad()
def reconstruct(
    model: nn.Module, unwrapped: nn.Module, pixel_values: torch.Tensor, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked input, reconstruction, pixel mask (1 = removed)), each `(B, C, H, W)`, the images in the input's
    normalised space.

    `model` is the (possibly DDP/DeepSpeed-wrapped) model that runs the forward pass: with ZeRO-3 or DDP buffers the
    forward is a collective, so every process must call this. `unwrapped` provides the pure tensor helpers.
    """
    was_training = model.training
    model.eval()
    output = model(pixel_values, noise=noise)
    model.train(was_training)
    pixel_values = pixel_values.float()
    reconstruction = unwrapped.logits_to_pixels(output.logits.float(), pixel_values)
    patch_values = unwrapped.patchify(pixel_values).shape[-1]
    # The mask is per patch (1 = removed); spread it over the patch's pixels. 0 is the dataset mean after
    # normalisation, so removed patches show up grey, as in the paper.
    pixel_mask = unwrapped.unpatchify(
        output.mask.float().unsqueeze(-1).expand(-1, -1, patch_values), tuple(pixel_values.shape[-2:])
    )
    return pixel_values * (1 - pixel_mask), reconstruction, pixel_mask


def display_bands(num_channels: int, display_channels: Sequence[int] | None = None) -> tuple[int, ...]:
    """The bands of a `num_channels`-channel image shown as red, green and blue: `display_channels` (0-based) when
    given, else the first three, or the first band three times (grayscale) for fewer than three channels. An index
    out of range is a `UsageError` naming the valid range."""
    if display_channels is None:
        return (0,) * PICTURE_BANDS if num_channels < PICTURE_BANDS else tuple(range(PICTURE_BANDS))
    if any(not 0 <= band < num_channels for band in display_channels):
        raise UsageError(
            f"--display_channels {','.join(map(str, display_channels))}: the model's images have {num_channels} "
            f"channel(s), so each index must be in 0..{num_channels - 1}"
        )
    return tuple(display_channels)


def to_uint8_images(
    images: torch.Tensor,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    display_channels: Sequence[int] | None = None,
) -> np.ndarray:
    """Normalised `(B, C, H, W)` -> `(B, H, W, 3)` uint8 pictures of the `display_bands` (`image_mean`/`image_std`:
    one value per channel)."""
    if not len(image_mean) == len(image_std) == images.shape[1]:
        # Broadcasting 3 statistics over 1 channel would silently make a tinted 3-channel picture of a grayscale image.
        raise ValueError(f"{images.shape[1]}-channel images with {len(image_mean)} means and {len(image_std)} stds")
    mean = torch.tensor(image_mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(image_std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    bands = list(display_bands(images.shape[1], display_channels))
    scaled = (images * std + mean)[:, bands]  # (B, 3, H, W) on the data's [0, 1] scale
    pixels = (scaled.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def grid_image(rows: Sequence[Sequence[np.ndarray]]) -> Image.Image:
    """Tiles `(H, W, C)` uint8 arrays, all the same shape, on a white canvas, enlarged to >= MIN_TILE_SIDE."""
    height, width = rows[0][0].shape[:2]
    scale = max(1, -(-MIN_TILE_SIDE // min(height, width)))  # ceil division
    tile_h, tile_w = height * scale, width * scale
    num_cols = max(len(row) for row in rows)
    canvas = Image.new("RGB", (num_cols * (tile_w + GAP) + GAP, len(rows) * (tile_h + GAP) + GAP), "white")
    for row_index, row in enumerate(rows):
        for col_index, tile in enumerate(row):
            image = Image.fromarray(tile).resize((tile_w, tile_h), Image.Resampling.NEAREST)
            canvas.paste(image, (GAP + col_index * (tile_w + GAP), GAP + row_index * (tile_h + GAP)))
    return canvas


def wrap_to_width(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (a single word wider than that keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def column_titles(titles: Sequence[str], tile_width: int) -> Image.Image:
    """A white strip as wide as a `grid_image` of `len(titles)` columns, each title centred over its column in black,
    wrapped to the column's width. PIL's own font (FreeType's when available): no font file, no matplotlib."""
    font = ImageFont.load_default(size=max(MIN_TITLE_FONT_SIZE, tile_width // TILE_WIDTH_PER_TITLE_PIXEL))
    wrapped = [wrap_to_width(title, font, tile_width) for title in titles]
    line_height = int(font.getbbox("Ag")[3]) + GAP  # from the top of the line to below the descender
    height = max(len(lines) for lines in wrapped) * line_height + 2 * GAP
    strip = Image.new("RGB", (len(titles) * (tile_width + GAP) + GAP, height), "white")
    draw = ImageDraw.Draw(strip)
    for column, lines in enumerate(wrapped):
        centre = GAP + column * (tile_width + GAP) + tile_width / 2
        for row, line in enumerate(lines):
            draw.text((round(centre - font.getlength(line) / 2), GAP + row * line_height), line, fill="black", font=font)
    return strip


def add_column_titles(grid: Image.Image, titles: Sequence[str] = COLUMN_TITLES) -> Image.Image:
    """`grid` (a `grid_image` of `len(titles)` columns) under a strip of column titles."""
    tile_width = (grid.width - GAP) // len(titles) - GAP
    strip = column_titles(titles, tile_width)
    figure = Image.new("RGB", (grid.width, strip.height + grid.height), "white")
    figure.paste(strip, (0, 0))
    figure.paste(grid, (0, strip.height))
    return figure


def reconstruction_figure(
    model: nn.Module,
    unwrapped: nn.Module,
    pixel_values: torch.Tensor,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    noise: torch.Tensor | None = None,
    display_channels: Sequence[int] | None = None,
) -> Image.Image:
    """Figure 2: a row per image of `pixel_values`, under the column titles: masked | reconstruction |
    reconstruction + visible | original; `display_channels`: the bands shown (`display_bands`)."""
    masked, reconstruction, pixel_mask = reconstruct(model, unwrapped, pixel_values, noise)
    pasted = masked + reconstruction * pixel_mask
    columns = [
        to_uint8_images(images, image_mean, image_std, display_channels)
        for images in (masked, reconstruction, pasted, pixel_values.float())
    ]
    return add_column_titles(grid_image([list(row) for row in zip(*columns, strict=True)]))


def log_figure(accelerator: Accelerator, name: str, figure: Image.Image, step: int) -> None:
    """Send the figure to every tracker that takes images (call on the main process)."""
    pixels = np.asarray(figure)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: pixels[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [figure]}, step=step)
