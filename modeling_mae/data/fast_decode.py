"""Pretraining augmentation fused with decoding: JPEG bytes -> normalised `(3, H, W)` crop, on one core.

Same distribution as `RandomResizedCrop(size, scale, bicubic) + RandomHorizontalFlip + Normalize` on a full decode,
with four savings:
- the crop is drawn from the header's size *before* decoding, so a JPEG is decoded at the smallest DCT scale
  (1/2, 1/4, 1/8, PIL `draft`) at which *this* crop still has >= the output's pixels (a worst-case bound such as
  `transforms.decode_image(min_side=...)` must assume the smallest crop, which on ImageNet-size images rules out
  any reduction); other formats are decoded whole;
- an RGB JPEG decoded at full size goes through torchvision's `decode_jpeg` (libjpeg-turbo, as PIL: the same
  pixels, ~20% faster here) straight into a tensor, and the crop's bicubic antialiased resize runs on that uint8
  tensor (`F.interpolate`, torch's vectorised port of PIL's filter: a third of PIL's time; torchvision's tensor path
  for `RandomResizedCrop`); after a reduced decode, whose crop box falls between pixels, crop + resize is one PIL
  call (`resize(box=...)`), exact to the sub-pixel;
- uint8 -> normalised float is one multiply-add in place instead of torchvision's ToImage/ToDtype/Normalize chain.

It also holds the decoding primitives every path shares, `open_image`, `to_rgb` and `has_torchvision_jpeg_decoder`:
`transforms` (the recipes, which build this fused one for pretraining) and `channels` (images of any channel count)
import them from here, and this module imports from neither.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

_DCT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes natively


def open_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode encoded image bytes in their own mode; raises on truncated or non-image bytes (the caller skips those).

    With ``min_side``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose short side stays >= min_side.
    """
    image = Image.open(io.BytesIO(data))
    if min_side is not None and image.format == "JPEG":
        image.draft(image.mode, (min_side, min_side))
    image.load()  # decoding is lazy: force it here so a truncated file fails now, not inside the transform
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (CMYK, L, P, RGBA, LA, 16-bit, ...) -> 3-channel 8-bit RGB, the model's ``num_channels=3``."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # 16/32-bit integer images: PIL's convert would clip to 255 instead of rescaling the 0-65535 range.
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the palette's transparency is only understood by the RGBA conversion
    return image.convert("RGB")


def has_torchvision_jpeg_decoder() -> bool:
    """torchvision deprecated its image decoders in 0.29 (for TorchCodec): once they are gone, PIL decodes JPEGs too."""
    return hasattr(torchvision.io, "decode_jpeg")


def sample_crop(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: random.Random | None = None,
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` on an image size: `(left, top, crop_width, crop_height)`."""
    rng = rng or random.Random()
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return rng.randint(0, width - crop_width), rng.randint(0, height - crop_height), crop_width, crop_height
    # Fallback, as torchvision: the central crop with the aspect ratio clamped to `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def dct_reduction(crop_size: tuple[int, int], output_size: tuple[int, int]) -> int:
    """Largest JPEG DCT reduction (8, 4, 2 or 1) that keeps the crop at >= the output's pixels on both axes."""
    for factor in _DCT_SCALES:
        if crop_size[0] >= factor * output_size[0] and crop_size[1] >= factor * output_size[1]:
            return factor
    return 1


class FastPretrainTransform:
    """JPEG/PNG/... bytes -> `(3, H, W)` float tensor: RandomResizedCrop (bicubic) + horizontal flip + normalise."""

    def __init__(
        self,
        image_size: int | Sequence[int],
        scale: tuple[float, float] = (0.2, 1.0),
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        flip_probability: float = 0.5,
        seed: int | None = None,
    ) -> None:
        self.height, self.width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.scale = scale
        self.flip_probability = flip_probability
        self.rng = random.Random(seed)
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std == x * multiplier + offset: one fused pass over the crop.
        self.multiplier = 1.0 / (255.0 * std_t)
        self.offset = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        """`rng`: draw this image's crop and flip from it (e.g. seeded by the stream position, for resumable
        augmentation) instead of the transform's own generator."""
        rng = rng or self.rng
        image = Image.open(io.BytesIO(data))
        left, top, crop_width, crop_height = sample_crop(*image.size, self.scale, rng=rng)  # header's size only
        factor = dct_reduction((crop_width, crop_height), (self.width, self.height)) if image.format == "JPEG" else 1
        if factor > 1:
            resized = self.reduced_crop(image, factor, (left, top, left + crop_width, top + crop_height))
        else:
            crop = decode_rgb(data, image)[:, top : top + crop_height, left : left + crop_width]  # (3, h, w), a view
            size = (self.height, self.width)
            resized = F.interpolate(crop.unsqueeze(0), size=size, mode="bicubic", antialias=True)[0]  # (3, H, W)
        if rng.random() < self.flip_probability:
            resized = resized.flip(-1)
        # Two vectorised float passes: a third of the time of one mixed uint8/float `addcmul` (measured).
        normalised = torch.empty(3, self.height, self.width).copy_(resized)  # contiguous, whatever `resized` is
        return normalised.mul_(self.multiplier).add_(self.offset)  # (3, H, W) float32

    def reduced_crop(self, image: Image.Image, factor: int, box: tuple[int, int, int, int]) -> torch.Tensor:
        """A JPEG decoded at 1/`factor` scale, then the full-resolution `box` cropped and resized in one PIL call:
        the box falls between the reduced image's pixels, and PIL's resize takes it to the sub-pixel."""
        full_width, full_height = image.size
        image.draft(image.mode, (full_width // factor, full_height // factor))
        image.load()  # a truncated file fails here, as in `transforms.decode_image`
        image = to_rgb(image)
        sx, sy = image.size[0] / full_width, image.size[1] / full_height  # the DCT scale actually used
        scaled_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        crop = image.resize((self.width, self.height), Image.Resampling.BICUBIC, box=scaled_box)
        return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W) uint8, a view


def decode_rgb(data: bytes, image: Image.Image) -> torch.Tensor:
    """`data` (opened as `image`, header read) decoded whole to a `(3, H, W)` uint8 RGB tensor."""
    if has_torchvision_jpeg_decoder() and image.format == "JPEG" and image.mode == "RGB":
        # libjpeg-turbo, as PIL: the same pixels, ~25% faster, straight into a tensor. Truncated files raise here.
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB)
    image.load()  # a truncated file fails here, as in `transforms.decode_image`
    image = to_rgb(image)  # CMYK, grayscale, palette, RGBA, 16-bit: the conversions of the PIL path
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W), a view
