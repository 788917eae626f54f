"""ImageNet-like data made locally: natural-looking JPEGs in the `ILSVRC/imagenet-1k` parquet layout.

For benchmarks and checks that must run where nothing can be downloaded (issue 13). What makes a JPEG cost what an
ImageNet photo costs to store and decode is its content: natural photographs have an amplitude spectrum close to
1/f, colour channels that mostly move together (luminance carries the detail, chroma is smooth), objects with sharp
edges, and sensor noise. `natural_image` draws exactly that: a 1/f luminance field with smoother (1/f^1.5) chroma as
background, polygons filled with their own such texture in front of it, and Gaussian noise. At 500x375 (ImageNet's
most common size) and JPEG quality 90 the files average ~110 kB, ImageNet's mean (its 1.28M training images take
~140 GB).

    write_imagenet_like(directory, num_train=2048, num_validation=64, num_shards=16)

writes `data/train-0000i-of-0000n.parquet` and `data/validation-00000-of-00001.parquet` with the Hub's columns:
`image` (an `Image` feature: a struct of `bytes` and `path`) and `label` (a `ClassLabel` of 1000 classes), in row
groups of 100 rows as `datasets` writes image data. Every image depends only on (seed, split, index): the same data
whatever the number of shards or processes.
"""

from __future__ import annotations

import functools
import io
import pathlib
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # imported where used: only the shard writer needs datasets
    import datasets

IMAGENET_SIZE = (500, 375)  # (width, height): the most common size of ImageNet's photos
JPEG_QUALITY = 90
NUM_CLASSES = 1000
ROWS_PER_ROW_GROUP = 100  # what `datasets` writes for image data
CONTRAST = 50.0  # grey levels per standard deviation of the texture; sets the detail, hence the JPEG size
NOISE_LEVEL = 3.0  # grey levels of sensor noise
CHROMA_SCALE = 4  # chroma is drawn at 1/4 of the resolution
SPLIT_SEEDS = {"train": 0, "validation": 1}


def pink_noise(rng: np.random.Generator, height: int, width: int, exponent: float, channels: int) -> np.ndarray:
    """`(height, width, channels)` float32 fields of unit variance whose amplitude spectrum falls as 1/f^exponent."""
    frequency = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])  # (H, W // 2 + 1)
    frequency[0, 0] = np.inf  # no constant term: the mean is set by the caller
    phases = np.exp(2j * np.pi * rng.random((channels, *frequency.shape)))
    fields = np.fft.irfft2(frequency**-exponent * phases, s=(height, width)).astype(np.float32)  # (C, H, W)
    fields /= fields.std(axis=(1, 2), keepdims=True)
    return fields.transpose(1, 2, 0)  # (H, W, C)


def upsample(fields: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of float fields `(h, w, C)` -> `(height, width, C)`."""
    channels = [Image.fromarray(fields[..., c], mode="F").resize((width, height), Image.Resampling.BICUBIC)
                for c in range(fields.shape[-1])]
    return np.stack([np.asarray(channel) for channel in channels], axis=-1)


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A natural texture `(H, W, 3)` of zero mean: 1/f luminance plus weaker, smoother 1/f^1.5 chroma (drawn at a
    quarter of the resolution, as smooth fields lose nothing by it; JPEG subsamples chroma anyway)."""
    luminance = pink_noise(rng, height, width, 1.0, 1)  # (H, W, 1), broadcast to the three channels
    chroma = pink_noise(rng, max(2, height // CHROMA_SCALE), max(2, width // CHROMA_SCALE), 1.5, 2)  # (h, w, 2)
    return luminance + upsample(chroma, height, width) @ rng.normal(0, 0.3, (2, 3)).astype(np.float32)


def polygon_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random filled polygon (3 to 11 corners around a random centre) as a `(H, W, 1)` float mask."""
    centre_x, centre_y = rng.uniform(0, width), rng.uniform(0, height)
    radius_x, radius_y = rng.uniform(0.04, 1 / 3) * width, rng.uniform(0.04, 1 / 3) * height
    angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 12)))
    corners = [(centre_x + radius_x * np.cos(a), centre_y + radius_y * np.sin(a)) for a in angles]
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon(corners, fill=255)
    return (np.asarray(mask, dtype=np.float32) / 255)[..., None]


def natural_image(
    rng: np.random.Generator, width: int = IMAGENET_SIZE[0], height: int = IMAGENET_SIZE[1]
) -> np.ndarray:
    """A natural-looking RGB image `(height, width, 3)` uint8: a textured background, 2 to 5 objects with sharp edges
    in front of it (each its own colour and contrast, cut from one foreground texture), sensor noise."""
    pixels = rng.uniform(50, 200, 3).astype(np.float32) + CONTRAST * texture(rng, height, width)
    foreground = texture(rng, height, width)
    for _ in range(rng.integers(2, 6)):
        mask = polygon_mask(rng, height, width)
        colour = rng.uniform(50, 200, 3).astype(np.float32)
        pixels = pixels * (1 - mask) + (colour + CONTRAST * rng.uniform(0.3, 1.0) * foreground) * mask
    pixels += NOISE_LEVEL * rng.standard_normal(pixels.shape, dtype=np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def natural_jpeg(seed: int, index: int, width: int = IMAGENET_SIZE[0], height: int = IMAGENET_SIZE[1],
                 quality: int = JPEG_QUALITY) -> bytes:
    """Image `index` of the stream `seed`: the same bytes whoever draws it, in whatever order."""
    return jpeg_bytes(natural_image(np.random.default_rng([seed, index]), width, height), quality)


def natural_jpegs(count: int, width: int = IMAGENET_SIZE[0], height: int = IMAGENET_SIZE[1], seed: int = 0,
                  quality: int = JPEG_QUALITY) -> list[bytes]:
    return [natural_jpeg(seed, index, width, height, quality) for index in range(count)]


# ------------------------------------------------------------------------------------------------------ parquet shards


def imagenet_features() -> datasets.Features:
    """The columns of `ILSVRC/imagenet-1k`'s parquet files: `image` (Image) and `label` (ClassLabel, 1000 classes)."""
    from datasets import ClassLabel, Features
    from datasets import Image as ImageFeature

    return Features({"image": ImageFeature(), "label": ClassLabel(num_classes=NUM_CLASSES)})


@dataclass(frozen=True)
class ShardSpec:
    """Rows `[first, first + count)` of a split, written to `path`."""

    path: pathlib.Path
    split: str
    first: int
    count: int
    seed: int
    width: int
    height: int
    quality: int
    copies: int = 1  # the shard holds its images this many times over


def write_shard(spec: ShardSpec, schema: pa.Schema) -> list[int]:
    """Write one parquet shard with `schema` (it carries the `datasets` features); returns the JPEG sizes in bytes."""
    stream_seed = spec.seed * len(SPLIT_SEEDS) + SPLIT_SEEDS[spec.split]
    indices = range(spec.first, spec.first + spec.count)
    images = [natural_jpeg(stream_seed, index, spec.width, spec.height, spec.quality) for index in indices]
    labels = np.random.default_rng([stream_seed, spec.first]).integers(0, NUM_CLASSES, spec.count)
    table = pa.Table.from_pydict(
        {"image": [{"bytes": data, "path": f"synthetic_{spec.split}_{index:08d}.JPEG"}
                   for data, index in zip(images, indices)] * spec.copies,
         "label": labels.tolist() * spec.copies},
        schema=schema,
    )
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, spec.path, row_group_size=ROWS_PER_ROW_GROUP)
    return [len(data) for data in images]


def shard_specs(directory: pathlib.Path, split: str, num_images: int, num_shards: int, seed: int,
                size: tuple[int, int], quality: int, copies: int = 1) -> list[ShardSpec]:
    """Contiguous, near-equal shards `data/{split}-0000i-of-0000n.parquet` (the Hub's names)."""
    bounds = np.linspace(0, num_images, num_shards + 1).round().astype(int)
    return [ShardSpec(directory / "data" / f"{split}-{index:05d}-of-{num_shards:05d}.parquet", split,
                      int(bounds[index]), int(bounds[index + 1] - bounds[index]), seed, *size, quality, copies)
            for index in range(num_shards)]


def write_imagenet_like(directory: str | pathlib.Path, num_train: int, num_validation: int, num_shards: int = 16,
                        seed: int = 0, size: tuple[int, int] = IMAGENET_SIZE, quality: int = JPEG_QUALITY,
                        processes: int | None = None, train_copies: int = 1) -> dict[str, float]:
    """Write the train and validation splits, one process per shard; returns what was written (JPEG sizes in kB).

    `num_shards` a multiple of the DataLoader workers lets `datasets` give each worker whole shards instead of making
    every worker read every shard. `train_copies` > 1 writes every training image that many times (as more rows):
    a DataLoader worker then makes passes as long as over a large data set (each pass costs a little to start)
    without drawing more images."""
    directory = pathlib.Path(directory)
    specs = (shard_specs(directory, "train", num_train, num_shards, seed, size, quality, train_copies)
             + shard_specs(directory, "validation", num_validation, 1, seed, size, quality))
    write = functools.partial(write_shard, schema=imagenet_features().arrow_schema)  # workers need not import datasets
    with ProcessPoolExecutor(max_workers=processes) as pool:
        sizes = [nbytes for shard in pool.map(write, specs) for nbytes in shard]
    return {"train_images": num_train, "train_rows": num_train * train_copies, "validation_images": num_validation,
            "train_shards": num_shards,
            "width": size[0], "height": size[1], "quality": quality, "mean_kb": statistics.mean(sizes) / 1e3,
            "median_kb": statistics.median(sizes) / 1e3, "min_kb": min(sizes) / 1e3, "max_kb": max(sizes) / 1e3,
            "total_mb": sum(sizes) / 1e6}
