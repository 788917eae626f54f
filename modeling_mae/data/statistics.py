"""The data set's own image statistics, and whether its images can have the model's channel count.

- `check_channels`: whether a split's images can be the model's C channels, from its first decodable records; refused
  in one line naming both counts when none of them can (a data set that mixes counts passes: the loader skips and
  counts the odd images).
- `compute_image_statistics`: the per-channel mean and std over every pixel of a bounded sample (the first
  ``max_images`` images of the split), on the scale the pipeline decodes them to (`channels`: 8-bit / 255, 16-bit
  / 65535, floats as they are), with the rescale factor of that scale. The images stream through `build_dataloader`
  (its workers; unreadable images and images of another channel count skipped and counted) with a progress bar. Each
  image is reduced to its per-channel pixel count, mean and sum of squared deviations, merged exactly (Chan et al.'s
  pairwise update), so images of different sizes mix and large values keep their precision. A channel whose std is 0
  (a constant band) is refused: it cannot be normalised by.
- `report_image_statistics`: run_scripts/image_stats.py: prints them with the flags that use them, writes the JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Image as ImageFeature
from datasets import IterableDataset
from PIL import Image
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..errors import UsageError
from .channels import (
    EIGHT_BIT_SCALE,
    RGB_CHANNELS,
    SIXTEEN_BIT_SCALE,
    ChannelMismatch,
    decode_channels,
    pixel_scale,
    read_pixels,
    uses_rgb_path,
)
from .fast_decode import to_rgb
from .loader import OpenSplit, build_dataloader, open_split
from .sources import KEY_COLUMN, DataArguments, ImageStatsArguments, array_dtype
from .stream import _record_key, _record_source

logger = logging.getLogger(__name__)

PROBED_RECORDS = 16  # records `check_channels` reads
STATISTICS_BATCH_SIZE = 64
MIN_RELATIVE_STD = 1e-9  # below this fraction of the mean (or 0): a constant channel; float32 data varies by >= 1e-7
JSON_KEYS = ("image_mean", "image_std", "rescale_factor", "images")


@dataclass(frozen=True)
class ImageStatistics:
    """Per-channel mean and std of the pixels, on the scale `rescale_factor` gives raw values, over `images` images."""

    mean: list[float]
    std: list[float]
    rescale_factor: float
    images: int

    def to_json(self) -> dict[str, Any]:
        return dict(zip(JSON_KEYS, (self.mean, self.std, self.rescale_factor, self.images), strict=True))

    @classmethod
    def read(cls, path: str | pathlib.Path) -> ImageStatistics:
        """The statistics a JSON file of run_scripts/image_stats.py holds; a file without them is a `UsageError`."""
        try:
            values = json.loads(pathlib.Path(path).read_text())
            return cls(*(values[key] for key in JSON_KEYS))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{path} holds no image statistics ({', '.join(JSON_KEYS)}): write it with "
                             f"run_scripts/image_stats.py --output {path} ({error!r})") from error

    def flags(self) -> str:
        """The command-line flags that normalise with these statistics."""
        return (f"--image_mean {' '.join(f'{value:.6g}' for value in self.mean)} "
                f"--image_std {' '.join(f'{value:.6g}' for value in self.std)}")


class PixelMoments:
    """A loader transform that reduces an image to its per-channel (pixel count, mean, sum of squared deviations from
    that mean): a float64 tensor (C, 3), whatever the image's size, so that a batch of them stacks."""

    def __init__(self, num_channels: int) -> None:
        self.num_channels = num_channels  # read by the stream: the decoding of C channels

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = _rgb_pixels(image) if self.num_channels == RGB_CHANNELS else decode_channels(image, self.num_channels)
        values = image.double().flatten(1)  # (C, H, W) -> (C, H * W)
        mean = values.mean(1)
        squared_deviations = (values - mean[:, None]).square().sum(1)
        return torch.stack([torch.full_like(mean, values.shape[1]), mean, squared_deviations], dim=1)  # (C, 3)


def _rgb_pixels(image: Image.Image) -> torch.Tensor:
    """An image as the RGB path decodes it (any mode to 8-bit RGB), on its scale: (3, H, W) in [0, 1]."""
    return v2.functional.pil_to_tensor(to_rgb(image)).double() * EIGHT_BIT_SCALE


def merge_moments(moments: torch.Tensor) -> torch.Tensor:
    """(N, C, 3) per-part (count, mean, sum of squared deviations) -> (C, 3) of all parts together, exactly."""
    counts, means, squared_deviations = moments.unbind(-1)  # each (N, C)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    spread = (squared_deviations + counts * (means - mean).square()).sum(0)
    return torch.stack([total, mean, spread], dim=1)  # (C, 3)


@dataclass(frozen=True)
class _Probe:
    """What the first records of a split say: their scales (those that can be C channels) and the others."""

    split_name: str
    scales: list[float]
    mismatches: list[tuple[str, ChannelMismatch]]  # (record key, why it cannot be C channels)

    @property
    def rescale_factor(self) -> float:
        """The scale of most probed images (a processor has one: 8-bit and 16-bit images mixed in one data set are
        rare); 8-bit when none could be read."""
        return Counter(self.scales).most_common(1)[0][0] if self.scales else EIGHT_BIT_SCALE


def _probe(args: DataArguments, num_channels: int, split: str) -> _Probe:
    """Decode the first `PROBED_RECORDS` records of the split (undecodable ones are passed over)."""
    opened = open_split(args, split)
    if num_channels == RGB_CHANNELS and not opened.holds_arrays:
        return _Probe(opened.name, [EIGHT_BIT_SCALE], [])  # the RGB path reads every encoded image, in 8 bits
    scales: list[float] = []
    mismatches: list[tuple[str, ChannelMismatch]] = []
    for position, record in enumerate(_first_records(opened), start=1):
        key = _record_key(record, opened.image_column, position)
        try:
            source = _record_source(record[opened.image_column], array_dtype(opened.features[opened.image_column]))
            scale = EIGHT_BIT_SCALE if uses_rgb_path(source, num_channels) else pixel_scale(
                read_pixels(source, num_channels).dtype)
        except ChannelMismatch as mismatch:
            mismatches.append((key, mismatch))
            continue
        except Exception as error:  # noqa: BLE001 - an unreadable image: the loader skips and counts it
            logger.debug("Cannot decode %s: %r", key, error)
            continue
        scales.append(scale)
    return _Probe(opened.name, scales, mismatches)


def _first_records(opened: OpenSplit) -> IterableDataset:
    """The split's first `PROBED_RECORDS` records: their image (undecoded) and key."""
    columns = [opened.image_column] + ([KEY_COLUMN] if KEY_COLUMN in opened.features else [])
    stream = opened.stream.select_columns(columns)
    if isinstance(opened.features[opened.image_column], ImageFeature):
        stream = stream.cast_column(opened.image_column, ImageFeature(decode=False))  # decode ourselves
    return stream.take(PROBED_RECORDS)


def _refuse_mismatch(probe: _Probe, num_channels: int) -> None:
    """Refuse a split none of whose probed images can have C channels; warn when only some cannot (mixed data)."""
    if not probe.mismatches:
        return
    if probe.scales:
        logger.warning("%d of the first records of the %s split cannot have %d channels: they will be skipped (e.g. "
                       "%s: %s)", len(probe.mismatches), probe.split_name, num_channels, *probe.mismatches[0])
        return
    counts = sorted({mismatch.channels for _, mismatch in probe.mismatches})
    key, example = probe.mismatches[0]
    raise UsageError(
        f"The {probe.split_name} split's images have {' or '.join(map(str, counts))} channels, and the model's config "
        f"num_channels={num_channels} (first records: {key}: {example}): convert the images, or use a config with "
        f"num_channels={counts[0]}."
    )


def check_channels(data_args: DataArguments, num_channels: int, split: str = "train") -> float:
    """Refuse, in one line naming both counts, a split none of whose first decodable records can have
    ``num_channels`` channels; returns the rescale factor of those records' pixels (1/255, 1/65535 or 1). For 3
    channels, encoded images always can (the RGB path converts every mode to 8 bits): only arrays are read."""
    probe = _probe(data_args, num_channels, split)
    _refuse_mismatch(probe, num_channels)
    return probe.rescale_factor


def compute_image_statistics(
    data_args: DataArguments, num_channels: int, max_images: int = 10_000, split: str = "train"
) -> ImageStatistics:
    """Per-channel mean and std (population, over every pixel) of the first ``max_images`` images of ``split``; the
    split must pass `check_channels`, and every channel must vary."""
    probe = _probe(data_args, num_channels, split)
    _refuse_mismatch(probe, num_channels)
    cap = "max_train_samples" if split == "train" else "max_eval_samples"
    capped = dataclasses.replace(data_args, **{cap: min(getattr(data_args, cap) or max_images, max_images)})
    loader = build_dataloader(capped, split, PixelMoments(num_channels), STATISTICS_BATCH_SIZE, train=False,
                              labels=False)
    parts: list[torch.Tensor] = []  # (C, 3) moments of each batch
    images = 0
    with tqdm(total=loader.num_samples, desc=f"statistics of the {loader.split} split", unit="image") as bar:
        for batch in loader:
            parts.append(merge_moments(batch["pixel_values"]))  # (B, C, 3) -> (C, 3)
            images += len(batch["pixel_values"])
            bar.update(len(batch["pixel_values"]))
    count, mean, spread = merge_moments(torch.stack(parts)).unbind(-1)  # (N, C, 3) -> (C, 3) -> 3 x (C,)
    std = (spread / count).sqrt()
    _refuse_constant(mean.tolist(), std.tolist(), images)
    if loader.skipped_images():
        logger.warning("%d records skipped (see the warnings above)", loader.skipped_images())
    return ImageStatistics(mean.tolist(), std.tolist(), probe.rescale_factor, images)


def _refuse_constant(mean: list[float], std: list[float], images: int) -> None:
    """A channel whose every pixel has the same value cannot be normalised (its std is 0)."""
    for channel, (channel_mean, channel_std) in enumerate(zip(mean, std, strict=True)):
        if not channel_std > MIN_RELATIVE_STD * abs(channel_mean):
            raise UsageError(
                f"Channel {channel} has std {channel_std:.3g} over the {images} images read (every pixel is "
                f"{channel_mean:.6g}): normalising would divide by zero. Drop the band from the data, or pass "
                "--image_mean/--image_std of your own."
            )


def _fraction(scale: float) -> str:
    """1/255 and 1/65535 as such, other scales as numbers."""
    return f"1/{round(1 / scale)}" if scale in (EIGHT_BIT_SCALE, SIXTEEN_BIT_SCALE) else f"{scale:g}"


def report_image_statistics(data_args: DataArguments, args: ImageStatsArguments) -> dict[str, Any]:
    """run_scripts/image_stats.py: compute the statistics, print them and the flags that use them, and write them to
    ``args.output`` (JSON) when given; returns them as the JSON holds them."""
    statistics = compute_image_statistics(data_args, args.num_channels, args.max_images, args.split)
    lines = [
        f"Per-channel statistics of {statistics.images} images (pixel values x {_fraction(statistics.rescale_factor)}):",
        f"  mean: {' '.join(f'{value:.6g}' for value in statistics.mean)}",
        f"  std:  {' '.join(f'{value:.6g}' for value in statistics.std)}",
        f"Normalise with: {statistics.flags()}",
    ]
    if args.output is not None:
        path = pathlib.Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(statistics.to_json(), indent=2) + "\n")
        lines.append(f"  or: --image_stats {path}   (written: {path.resolve()})")
    print("\n".join(lines))
    return statistics.to_json()
