"""Build the embedded sample data set: a class-balanced Fashion-MNIST subset in the Hub's ImageNet layout.

    apt-get install -y dataset-fashion-mnist        # Debian package, installs the IDX files under /usr/share/datasets
    python run_scripts/make_sample_data.py          # writes modeling_mae/data/sample_data/fashion_mnist/
    python run_scripts/make_sample_data.py --full   # all 60,000/10,000 images, to outputs/fashion_mnist_full/

Output: parquet shards ``data/{train,test}-0000i-of-0000n.parquet`` with ``image`` (Image, PNG bytes) and ``label``
(ClassLabel with the 10 class names), plus README.md (provenance + split sizes) and LICENSE. Deterministic for a seed.
The full set goes to a folder outside the package (pass it as ``--dataset_name``): it is never shipped or committed.
"""

from __future__ import annotations

import argparse
import gzip
import io
import pathlib
import shutil
import subprocess
from collections.abc import Sequence

import numpy as np
from PIL import Image

from modeling_mae.errors import UsageError, exit_process, run_main

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_FILES = {"train": "train", "test": "t10k"}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "modeling_mae" / "data"
SAMPLE_SHARDS = {"train": 4, "test": 2}  # a few shards so that processes and workers can split by shard
FULL_SHARDS = {"train": 16, "test": 8}  # 3,750 and 1,250 images: whole shards for 8 loader workers
LICENSE_TEXT = """MIT License (Expat)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def read_idx(path: pathlib.Path) -> np.ndarray:
    """An IDX file (big-endian dims after a 4-byte magic whose last byte is the number of dims) as a uint8 array."""
    data = gzip.decompress(path.read_bytes())
    num_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(num_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(shape)


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` random indices of every class, kept in the original (class-mixed) order."""
    chosen = [rng.choice(np.flatnonzero(labels == label), per_class, replace=False)
              for label in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(chosen))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def idx_path(source: pathlib.Path, split: str, kind: str) -> pathlib.Path:
    path = source / f"{IDX_FILES[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
    if not path.is_file():
        raise UsageError(f"{path} not found: install the Debian package (apt-get install -y {DEBIAN_PACKAGE}) or "
                         "pass --source FOLDER holding the Fashion-MNIST IDX files")
    return path


def write_split(source: pathlib.Path, output: pathlib.Path, split: str, per_class: int | None, num_shards: int,
                rng: np.random.Generator) -> int:
    """The split's images (all of them when `per_class` is None, else a class-balanced subset) as parquet shards."""
    images = read_idx(idx_path(source, split, "images"))
    labels = read_idx(idx_path(source, split, "labels"))
    indices = np.arange(len(labels)) if per_class is None else balanced_indices(labels, per_class, rng)
    from datasets import (  # here, not on top: `--help` needs no `datasets` (a second)
        ClassLabel,
        Dataset,
        Features,
    )
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASS_NAMES))})
    dataset = Dataset.from_dict(
        {"image": [{"bytes": png_bytes(images[i]), "path": None} for i in indices],
         "label": [int(labels[i]) for i in indices]},
        features=features,
    )
    for shard in range(num_shards):
        path = output / "data" / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"
        dataset.shard(num_shards, shard, contiguous=True).to_parquet(str(path))
    return len(dataset)


def debian_package_version() -> str:
    """The installed package's version, or "unknown" (IDX files from elsewhere, or a system without dpkg)."""
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", DEBIAN_PACKAGE], capture_output=True, text=True,
                                check=False)
    except FileNotFoundError:
        return "unknown"
    return result.stdout.strip() or "unknown"


def card_text(sizes: dict[str, int], per_class: dict[str, int] | None, seed: int, version: str) -> str:
    """The data card's prose: what the folder holds, where it comes from, how the images were chosen."""
    source = f"- Source: Debian package `{DEBIAN_PACKAGE}` version `{version}` (the original IDX files, unmodified)."
    if per_class is None:
        counts = ", ".join(f"{split}: {size}" for split, size in sizes.items())
        return f"""# Fashion-MNIST (full)

All of [Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist) (Zalando Research, Xiao, Rasul & Vollgraf
2017), MIT licence (see LICENSE), in the same layout as `ILSVRC/imagenet-1k` on the Hub: parquet shards with an
`image` (PNG bytes, 28x28 grayscale) and a `label` (ClassLabel, 10 classes) column. Pass this folder as
`--dataset_name` to any script.

{source}
- Images: all of them ({counts}), in the original order: train is the original training set, test the original
  test set.
- Rebuild: `apt-get install -y {DEBIAN_PACKAGE} && python run_scripts/make_sample_data.py --full`.
"""
    subset = ", ".join(f"{split}: {size} images ({per_class[split]} per class)" for split, size in sizes.items())
    return f"""# Fashion-MNIST sample (embedded)

A small, class-balanced subset of [Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist) (Zalando Research,
Xiao, Rasul & Vollgraf 2017), MIT licence (see LICENSE), in the same layout as `ILSVRC/imagenet-1k` on the Hub:
parquet shards with an `image` (PNG bytes, 28x28 grayscale) and a `label` (ClassLabel, 10 classes) column.
It is what `run_mae.py` trains on when no `--dataset_name` is given, and the default of the evaluation scripts.

{source}
- Subset: {subset};
  train is drawn from the original training set, test from the original test set, per class uniformly without
  replacement with `numpy.random.default_rng({seed})`, kept in the original order.
- Rebuild: `apt-get install -y {DEBIAN_PACKAGE} && python run_scripts/make_sample_data.py --seed {seed}`.
"""


def readme(sizes: dict[str, int], per_class: dict[str, int] | None, seed: int, version: str) -> str:
    splits_yaml = "\n".join(f"  - name: {split}\n    num_bytes: 0\n    num_examples: {size}"
                            for split, size in sizes.items())
    names_yaml = "\n".join(f"          '{index}': {name}" for index, name in enumerate(CLASS_NAMES))
    return f"""---
license: mit
task_categories:
- image-classification
dataset_info:
  features:
  - name: image
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
{names_yaml}
  splits:
{splits_yaml}
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
{card_text(sizes, per_class, seed, version)}"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=pathlib.Path, default=pathlib.Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--output", type=pathlib.Path, default=None,
                        help="Default: modeling_mae/data/sample_data/fashion_mnist, with --full "
                        "outputs/fashion_mnist_full")
    parser.add_argument("--full", action="store_true", help="Every image (60,000/10,000) instead of the subset.")
    parser.add_argument("--train_per_class", type=int, default=1000)
    parser.add_argument("--test_per_class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.output is None:
        sample = PACKAGE_DIR / "sample_data" / "fashion_mnist"
        args.output = pathlib.Path("outputs/fashion_mnist_full") if args.full else sample
    if args.full and args.output.resolve().is_relative_to(PACKAGE_DIR):
        raise UsageError(f"--output {args.output} is inside the package, which would ship the full data set with "
                         "every install: choose a folder outside modeling_mae/")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """Write the shards, data card and licence; returns the number of images per split."""
    args = parse_args(argv)
    shutil.rmtree(args.output / "data", ignore_errors=True)
    rng = np.random.default_rng(args.seed)
    per_class = None if args.full else {"train": args.train_per_class, "test": args.test_per_class}
    shards = FULL_SHARDS if args.full else SAMPLE_SHARDS
    sizes = {split: write_split(args.source, args.output, split, per_class and per_class[split], shards[split], rng)
             for split in ("train", "test")}
    (args.output / "README.md").write_text(readme(sizes, per_class, args.seed, debian_package_version()))
    (args.output / "LICENSE").write_text(LICENSE_TEXT)
    print(f"Wrote {sizes} to {args.output}")
    return sizes


if __name__ == "__main__":
    exit_process(run_main(main))
