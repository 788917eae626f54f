"""Build the embedded sample data set: a class-balanced Fashion-MNIST subset in the Hub's ImageNet layout.

    apt-get install -y dataset-fashion-mnist        # Debian package, installs the IDX files under /usr/share/datasets
    python run_scripts/make_sample_data.py          # writes modeling_mae/sample_data/fashion_mnist/

Output: parquet shards ``data/{train,test}-0000i-of-0000n.parquet`` with ``image`` (Image, PNG bytes) and ``label``
(ClassLabel with the 10 class names), plus README.md (provenance + split sizes) and LICENSE. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import gzip
import io
import pathlib
import shutil
import subprocess

import numpy as np
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_FILES = {"train": "train", "test": "t10k"}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
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
    chosen = [rng.choice(np.flatnonzero(labels == label), per_class, replace=False) for label in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(chosen))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_split(source: pathlib.Path, output: pathlib.Path, split: str, per_class: int, num_shards: int,
                rng: np.random.Generator) -> int:
    images = read_idx(source / f"{IDX_FILES[split]}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{IDX_FILES[split]}-labels-idx1-ubyte.gz")
    indices = balanced_indices(labels, per_class, rng)
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
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", DEBIAN_PACKAGE], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def readme(sizes: dict[str, int], per_class: dict[str, int], seed: int, version: str) -> str:
    splits_yaml = "\n".join(f"  - name: {split}\n    num_bytes: 0\n    num_examples: {size}" for split, size in sizes.items())
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
# Fashion-MNIST sample (embedded)

A small, class-balanced subset of [Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist) (Zalando Research,
Xiao, Rasul & Vollgraf 2017), MIT licence (see LICENSE), in the same layout as `ILSVRC/imagenet-1k` on the Hub:
parquet shards with an `image` (PNG bytes, 28x28 grayscale) and a `label` (ClassLabel, 10 classes) column.
It is what `run_mae.py` trains on when no `--dataset_name` is given, and the default of the evaluation scripts.

- Source: Debian package `{DEBIAN_PACKAGE}` version `{version}` (the original IDX files, unmodified).
- Subset: {', '.join(f'{split}: {size} images ({per_class[split]} per class)' for split, size in sizes.items())};
  train is drawn from the original training set, test from the original test set, per class uniformly without
  replacement with `numpy.random.default_rng({seed})`, kept in the original order.
- Rebuild: `apt-get install -y {DEBIAN_PACKAGE} && python run_scripts/make_sample_data.py --seed {seed}`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=pathlib.Path, default=pathlib.Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--output", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parents[1] / "modeling_mae/sample_data/fashion_mnist")
    parser.add_argument("--train_per_class", type=int, default=1000)
    parser.add_argument("--test_per_class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shutil.rmtree(args.output / "data", ignore_errors=True)
    rng = np.random.default_rng(args.seed)
    per_class = {"train": args.train_per_class, "test": args.test_per_class}
    shards = {"train": 4, "test": 2}  # a few shards so that processes and workers can split by shard
    sizes = {split: write_split(args.source, args.output, split, per_class[split], shards[split], rng)
             for split in ("train", "test")}
    (args.output / "README.md").write_text(readme(sizes, per_class, args.seed, debian_package_version()))
    (args.output / "LICENSE").write_text(LICENSE_TEXT)
    print(f"Wrote {sizes} to {args.output}")


if __name__ == "__main__":
    main()
