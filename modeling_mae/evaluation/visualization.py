"""The paper's Figure 2 for a training run: one row per image, under a strip of column titles,
masked | reconstruction | reconstruction + visible | original.

As in the paper, the reconstruction is the raw decoder output on every patch, mapped back to pixels with each
patch's own mean/std when the model regresses normalised pixels (`norm_pix_loss`). No loss is computed on the
visible patches, so their raw output is poor; the third column pastes the visible patches back, as the official
demo notebook does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw, ImageFont
from torch import nn

GAP = 2  # pixels of white between tiles
MIN_TILE_SIDE = 96  # small images (the 32x32 sample) are enlarged so they can be seen
COLUMN_TITLES = ("masked", "reconstruction", "reconstruction + visible", "original")
TILE_WIDTH_PER_TITLE_PIXEL = 8  # title font size = tile width / 8 (12 px over the 96-pixel tiles of the sample)
MIN_TITLE_FONT_SIZE = 12


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


def to_uint8_images(images: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]) -> np.ndarray:
    """Normalised `(B, C, H, W)` -> `(B, H, W, C)` uint8 pixels."""
    mean = torch.tensor(image_mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(image_std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    pixels = ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
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
) -> Image.Image:
    """Figure 2: a row per image of `pixel_values`, under the column titles: masked | reconstruction |
    reconstruction + visible | original."""
    masked, reconstruction, pixel_mask = reconstruct(model, unwrapped, pixel_values, noise)
    pasted = masked + reconstruction * pixel_mask
    columns = [
        to_uint8_images(images, image_mean, image_std)
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
