"""Images in: streamed from any `datasets` source, decoded, augmented and batched, resumably.

One code path for every source: a Hub id (``ILSVRC/imagenet-1k``, ``timm/imagenet-1k-wds``, ...), a local folder of
parquet shards, of webdataset ``.tar`` shards, an image folder tree or a folder of ``.npy`` arrays, or, with no
``dataset_name``, the Fashion-MNIST sample embedded in the package. The stream is shuffled with a buffer, split by
process and by DataLoader worker, resumable mid-epoch, and skips (and counts) images that cannot be decoded, images
smaller than ``min_image_size``, images of another channel count than the transform's ``num_channels`` and records
whose label is missing; whole shards that cannot be read are fatal or skipped and counted. Images of any channel count
(1-channel 8/16-bit, multi-band arrays) are decoded on their own scale; RGB keeps its path. See docs/data.md.

- `sources`: `DataArguments`, the source, its splits and columns;
- `labels`: how a label column becomes class ids;
- `shards`: shards that cannot be read, found before training or while streaming;
- `stream`: the DataLoader workers' side, records to batches;
- `loader`: the main process's side, `ImageStreamLoader` and `build_dataloader`, the entry point;
- `holdout`: a seeded, class-stratified held-out part of the train split (``--holdout_fraction``);
- `transforms`, `fast_decode`: the paper's augmentations, and JPEG decoding fused with the pretraining crop;
- `channels`, `array_folder`: images and arrays of any channel count to float tensors on their own scale, and the
  builder of a folder of ``.npy`` files;
- `statistics`: the data set's per-channel mean and std (run_scripts/image_stats.py) and `check_channels`;
- `synthetic`: ImageNet-like JPEG shards for benchmarks and the GPU check.

Imports from: model, common.
"""
