"""Images in: streamed from any `datasets` source, decoded, augmented and batched, resumably.

One code path for every source: a Hub id (``ILSVRC/imagenet-1k``, ``timm/imagenet-1k-wds``, ...), a local folder of
parquet shards, of webdataset ``.tar`` shards or an image folder tree, or, with no ``dataset_name``, the Fashion-MNIST
sample embedded in the package. The stream is shuffled with a buffer, split by process and by DataLoader worker,
resumable mid-epoch, and skips (and counts) images that cannot be decoded, images smaller than ``min_image_size`` and
records whose label is missing; whole shards that cannot be read are fatal or skipped and counted. See docs/data.md.

- `sources`: `DataArguments`, the source, its splits and columns;
- `labels`: how a label column becomes class ids;
- `shards`: shards that cannot be read, found before training or while streaming;
- `stream`: the DataLoader workers' side, records to batches;
- `loader`: the main process's side, `ImageStreamLoader` and `build_dataloader`, the entry point;
- `holdout`: a seeded, class-stratified held-out part of the train split (``--holdout_fraction``);
- `transforms`, `fast_decode`: the paper's augmentations, and JPEG decoding fused with the pretraining crop;
- `synthetic`: ImageNet-like JPEG shards for benchmarks and the GPU check.

Imports from: model, common.
"""
