"""Generators of tiny on-disk image data sets for offline tests, in the three local layouts the data pipeline streams:
parquet shards (HF layout), webdataset ``.tar`` shards and an image folder tree. Every image encodes its own id in its
pixels (see ``encoded_id``), so a test can check exactly which samples came out of a loader whatever the transform.

Bad files can be mixed in: ``"truncated"`` (a JPEG cut in half) and ``"garbage"`` (bytes that are no image); odd but
valid ones too: ``"cmyk"``, ``"gray"``, ``"rgba"``, ``"palette"``, ``"gray16"`` and ``"tiny"`` (3x2 pixels); and
``"pixel"`` (1x1, smaller than any patch). Labels: sample ``i`` is of class ``i % 3``, stored as a ``ClassLabel``, as
strings (``CLASS_NAMES``, or any ``names``), as plain integers or not at all. ``truncate`` cuts a shard as a partial
copy would.
"""

from __future__ import annotations

import io
import itertools
import json
import pathlib
import tarfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

CLASS_NAMES = ("cat", "dog", "fish")
CLASS_COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))  # of make_colour_classes' classes
BAD_KINDS = ("truncated", "garbage")
ODD_KINDS = ("cmyk", "gray", "rgba", "palette", "gray16", "tiny")


def id_colour(sample_id: int) -> tuple[int, int, int]:
    """A colour that encodes the id in base 16, 16 steps per channel, so it survives JPEG and mode conversions."""
    return (sample_id % 16 * 16 + 8, sample_id // 16 % 16 * 16 + 8, sample_id // 256 % 16 * 16 + 8)


def encoded_id(rgb_mean: Sequence[float]) -> int:
    """Inverse of ``id_colour`` from the mean RGB value (0-255) of an image."""
    r, g, b = (min(15, max(0, int(round((float(value) - 8) / 16)))) for value in rgb_mean)
    return r + 16 * g + 256 * b


def batch_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    """The ids of a batch of id-coloured images (normalised with mean 0 / std 1, any crop or flip)."""
    return [encoded_id(image.mean((1, 2)) * 255) for image in batch["pixel_values"]]


def read_with_a_restart(make_loader: Callable[[], Any], stop_after: int) -> tuple[list[list[int]], list[list[int]], Any]:
    """A stream loader's batch ids read whole, and read again with a restart: `stop_after` batches, then its state
    through JSON (as a checkpoint stores it) into a fresh loader, which reads the rest. Returns the two lists of
    batch ids and the resumed loader."""
    whole = [batch_ids(batch) for batch in make_loader()]
    interrupted = make_loader()
    head: Iterable[dict[str, torch.Tensor]] = itertools.islice(interrupted, stop_after)
    restarted = [batch_ids(batch) for batch in head]
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = make_loader()
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # what the training loop does when the resumed epoch starts
    return whole, restarted + [batch_ids(batch) for batch in resumed], resumed


def image_bytes(sample_id: int, kind: str = "rgb", size: tuple[int, int] = (24, 20)) -> bytes:
    """Encoded bytes of one image of the given kind (see the module docstring)."""
    if kind == "garbage":
        return b"this is not an image at all" * 3
    colour = id_colour(sample_id)
    if kind in ("tiny", "pixel"):
        size = (3, 2) if kind == "tiny" else (1, 1)
    image = Image.new("RGB", size, colour)
    if kind == "truncated":
        data = _encode(image, "JPEG")
        return data[: len(data) // 2]
    if kind == "cmyk":
        return _encode(image.convert("CMYK"), "JPEG", quality=100)
    if kind == "gray":
        return _encode(image.convert("L"), "PNG")
    if kind == "gray16":
        level = int(np.asarray(image.convert("L")).mean())
        return _encode(Image.fromarray(np.full(size[::-1], level * 257, dtype=np.uint16)), "PNG")
    if kind == "rgba":
        return _encode(image.convert("RGBA"), "PNG")
    if kind == "palette":
        return _encode(image.convert("P"), "PNG")
    return _encode(image, "PNG" if kind == "rgb" else "JPEG", quality=100)


def _encode(image: Image.Image, image_format: str, **options: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _suffix(kind: str) -> str:
    return ".png" if kind in ("rgb", "gray", "gray16", "rgba", "palette", "garbage", "tiny", "pixel") else ".jpg"


def sample_kinds(num_samples: int, kinds: dict[int, str] | None = None) -> list[str]:
    """Kind of every sample id: "rgb" unless overridden by ``kinds`` ({id: kind})."""
    kinds = kinds or {}
    return [kinds.get(sample_id, "rgb") for sample_id in range(num_samples)]


def make_parquet_shards(
    directory: pathlib.Path,
    num_samples: int,
    num_shards: int = 2,
    split: str = "train",
    kinds: dict[int, str] | None = None,
    labels: str | None = "classlabel",
    names: Sequence[str] = CLASS_NAMES,
) -> list[pathlib.Path]:
    """HF-layout parquet shards ``data/{split}-0000i-of-0000n.parquet`` with ``image`` (Image) + ``label``: a
    ClassLabel of ``names`` (``labels="classlabel"``), the names as strings (``"string"``), their indices as plain
    integers (``"int"``), or none (None)."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    label_types = {"classlabel": ClassLabel(names=list(names)), "string": Value("string"), "int": Value("int64")}
    feature_types = {"image": ImageFeature()} | ({"label": label_types[labels]} if labels else {})
    ids = list(range(num_samples))
    columns = {"image": [{"bytes": image_bytes(i, kind), "path": f"{i}{_suffix(kind)}"} for i, kind in
                         zip(ids, sample_kinds(num_samples, kinds))]}
    if labels:
        columns["label"] = [names[i % len(names)] if labels == "string" else i % len(names) for i in ids]
    dataset = Dataset.from_dict(columns, features=Features(feature_types))
    (directory / "data").mkdir(parents=True, exist_ok=True)
    paths = []
    for shard_index in range(num_shards):
        path = directory / "data" / f"{split}-{shard_index:05d}-of-{num_shards:05d}.parquet"
        dataset.shard(num_shards, shard_index, contiguous=True).to_parquet(str(path))
        paths.append(path)
    return paths


def make_colour_classes(directory: pathlib.Path, labels: Sequence[int], split: str = "train", seed: int = 0) -> None:
    """One HF-layout parquet shard where the class is the colour: a solid image of ``CLASS_COLOURS[label]`` with up to
    +-30 of jitter per channel, 24x20, PNG. Any working encoder, even a random one, maps the classes far apart, so a
    correct k-NN, linear probe or fine-tuning gets them right, and a broken one (wrong sign, shuffled labels) does
    not."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(seed)
    images = []
    for index, label in enumerate(labels):
        colour = tuple(int(c) for c in np.asarray(CLASS_COLOURS[label]) + rng.integers(-30, 31, 3))
        images.append({"bytes": _encode(Image.new("RGB", (24, 20), colour), "PNG"), "path": f"{index}.png"})
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASS_NAMES))})
    dataset = Dataset.from_dict({"image": images, "label": list(labels)}, features=features)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(directory / "data" / f"{split}-00000-of-00001.parquet"))


def make_webdataset(
    directory: pathlib.Path, num_samples: int, num_shards: int = 2, split: str = "train",
    kinds: dict[int, str] | None = None, string_labels: bool = False,
) -> list[pathlib.Path]:
    """Webdataset shards ``{split}-i.tar`` with ``{key}.jpg`` (any image bytes) + ``{key}.cls`` per sample, like timm's;
    with ``string_labels``, ``{key}.txt`` holds the class name instead (a column named ``txt``)."""
    directory.mkdir(parents=True, exist_ok=True)
    all_kinds = sample_kinds(num_samples, kinds)
    paths = []
    for shard_index in range(num_shards):
        path = directory / f"{split}-{shard_index:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for sample_id in range(shard_index, num_samples, num_shards):
                key = f"sample{sample_id:06d}"
                _add_tar_member(tar, f"{key}.jpg", image_bytes(sample_id, all_kinds[sample_id]))
                label = sample_id % len(CLASS_NAMES)
                _add_tar_member(tar, f"{key}.{'txt' if string_labels else 'cls'}",
                                (CLASS_NAMES[label] if string_labels else str(label)).encode())
        paths.append(path)
    return paths


def _add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_imagefolder(
    directory: pathlib.Path, num_samples: int, kinds: dict[int, str] | None = None, split: str | None = None
) -> list[pathlib.Path]:
    """An image folder tree ``[{split}/]{class_name}/{id}.{png,jpg}``; the class of sample ``i`` is
    ``CLASS_NAMES[i % 3]`` (`datasets` builds a ClassLabel from the folder names)."""
    paths = []
    for sample_id, kind in enumerate(sample_kinds(num_samples, kinds)):
        folder = directory / split if split else directory
        path = folder / CLASS_NAMES[sample_id % len(CLASS_NAMES)] / f"{sample_id:06d}{_suffix(kind)}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(sample_id, kind))
        paths.append(path)
    return paths


def truncate(path: pathlib.Path, keep: int | None = None) -> None:
    """Cut a shard as a partial copy does: keep its first ``keep`` bytes (default: half)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def corrupt_page(path: pathlib.Path) -> None:
    """Overwrite the first page header of a parquet shard: its footer stays whole (a start-up check passes), reading its
    rows fails, as a shard damaged in the middle does."""
    import pyarrow.parquet as pq

    start = pq.read_metadata(path).row_group(0).column(0).data_page_offset
    blob = bytearray(path.read_bytes())
    blob[start : start + 40] = b"\xff" * 40
    path.write_bytes(bytes(blob))


def empty_parquet(path: pathlib.Path) -> None:
    """Rewrite a parquet shard with its schema and 0 rows, as pyarrow writes an empty table: one row group of 0 rows
    (a valid file, that `datasets` alone cannot read)."""
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(path).slice(0, 0), path)


# --- Images of other channel counts (issue 22) -----------------------------------------------------------------------


def band_arrays(
    num_samples: int, num_channels: int = 4, size: tuple[int, int] = (20, 24), dtype: str = "uint16",
    channels_last: bool = False, seed: int = 0,
) -> list[np.ndarray]:
    """Random multi-band images, (C, H, W) or (H, W, C) with H, W = ``size``: integers over the dtype's range, or
    floats in [-2, 5) (arrays are kept on their own scale)."""
    rng = np.random.default_rng(seed)
    shape = (*size, num_channels) if channels_last else (num_channels, *size)
    if np.dtype(dtype).kind == "f":
        return [rng.uniform(-2, 5, shape).astype(dtype) for _ in range(num_samples)]
    return [rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype) for _ in range(num_samples)]


def single_band_png(values: np.ndarray) -> bytes:
    """A 1-channel PNG of a 2-D uint8 (mode L) or uint16 (mode I;16, a 16-bit PNG) array, values kept."""
    return _encode(Image.fromarray(values), "PNG")


def make_image_parquet(
    directory: pathlib.Path, encoded: Sequence[bytes], split: str = "train", labels: bool = True
) -> pathlib.Path:
    """One HF-layout parquet shard whose ``image`` column (an Image feature) holds the given encoded images, named
    ``{i}.png``; with ``labels``, a ClassLabel ``label`` of ``i % 3``."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    columns: dict[str, list[Any]] = {"image": [{"bytes": data, "path": f"{i}.png"} for i, data in enumerate(encoded)]}
    features = {"image": ImageFeature()}
    if labels:
        columns["label"] = [i % len(CLASS_NAMES) for i in range(len(encoded))]
        features["label"] = ClassLabel(names=list(CLASS_NAMES))
    (directory / "data").mkdir(parents=True, exist_ok=True)
    path = directory / "data" / f"{split}-00000-of-00001.parquet"
    Dataset.from_dict(columns, features=Features(features)).to_parquet(str(path))
    return path


def make_array_parquet(
    directory: pathlib.Path, arrays: Sequence[np.ndarray], split: str = "train", column: str = "bands",
    nested_lists: bool = False,
) -> pathlib.Path:
    """One HF-layout parquet shard of the arrays (all of one shape) in ``column``: an ``Array3D`` (or ``Array2D``) of
    their dtype, or, with ``nested_lists``, plain nested lists (a list feature, as `Dataset.from_dict` infers it);
    and a ClassLabel ``label`` of ``i % 3``."""
    from datasets import Array2D, Array3D, ClassLabel, Dataset, Features

    array_type = Array3D if arrays[0].ndim == 3 else Array2D
    values = [array.tolist() for array in arrays] if nested_lists else list(arrays)
    labels = [i % len(CLASS_NAMES) for i in range(len(arrays))]
    features = None if nested_lists else Features({
        column: array_type(arrays[0].shape, str(arrays[0].dtype)), "label": ClassLabel(names=list(CLASS_NAMES))})
    (directory / "data").mkdir(parents=True, exist_ok=True)
    path = directory / "data" / f"{split}-00000-of-00001.parquet"
    Dataset.from_dict({column: values, "label": labels}, features=features).to_parquet(str(path))
    return path


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def make_npy_webdataset(directory: pathlib.Path, arrays: Sequence[np.ndarray], split: str = "train") -> pathlib.Path:
    """One webdataset shard ``{split}-0000.tar`` with ``{key}.npy`` (`datasets` decodes it to an array) + ``{key}.cls``
    (``i % 3``) per sample."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{split}-0000.tar"
    with tarfile.open(path, "w") as tar:
        for index, array in enumerate(arrays):
            _add_tar_member(tar, f"sample{index:06d}.npy", _npy_bytes(array))
            _add_tar_member(tar, f"sample{index:06d}.cls", str(index % len(CLASS_NAMES)).encode())
    return path


def make_npy_imagefolder(
    directory: pathlib.Path, arrays: Sequence[np.ndarray], split: str | None = None
) -> list[pathlib.Path]:
    """An image folder of arrays ``[{split}/]{class_name}/{id}.npy``; sample ``i`` is of class ``CLASS_NAMES[i % 3]``."""
    paths = []
    for index, array in enumerate(arrays):
        folder = directory / split if split else directory
        path = folder / CLASS_NAMES[index % len(CLASS_NAMES)] / f"{index:06d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array)
        paths.append(path)
    return paths
