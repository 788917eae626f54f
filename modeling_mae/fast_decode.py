"""Pretraining augmentation fused with decoding: JPEG bytes -> normalised `(3, H, W)` crop, on one core.

Same distribution as `RandomResizedCrop(size, scale, bicubic) + RandomHorizontalFlip + Normalize` on a full decode,
with three savings:
- the crop is drawn from the header's size *before* decoding, so a JPEG is decoded at the smallest DCT scale
  (1/2, 1/4, 1/8, PIL `draft`) at which *this* crop still has >= the output's pixels (a worst-case bound such as
  `transforms.decode_image(min_side=...)` must assume the smallest crop, which on ImageNet-size images rules out
  any reduction); other formats are decoded whole;
- crop + bicubic resize is one PIL call (`resize(box=...)`), without the intermediate crop copy;
- uint8 -> normalised float is one fused op instead of torchvision's ToImage/ToDtype/Normalize chain.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .transforms import to_rgb

_DCT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes natively


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
        full_width, full_height = image.size  # from the header; nothing decoded yet
        left, top, crop_width, crop_height = sample_crop(full_width, full_height, self.scale, rng=rng)
        if image.format == "JPEG":
            factor = dct_reduction((crop_width, crop_height), (self.width, self.height))
            if factor > 1:
                image.draft(image.mode, (full_width // factor, full_height // factor))
        image.load()  # a truncated file fails here, as in `transforms.decode_image`
        image = to_rgb(image)  # CMYK, grayscale, palette, RGBA, 16-bit: the conversions of the PIL path
        sx, sy = image.size[0] / full_width, image.size[1] / full_height  # the DCT scale actually used
        box = (left * sx, top * sy, (left + crop_width) * sx, (top + crop_height) * sy)
        crop = image.resize((self.width, self.height), Image.Resampling.BICUBIC, box=box)
        if rng.random() < self.flip_probability:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # (H, W, 3) -> contiguous (3, H, W) uint8 in one numpy copy, so the float result is contiguous too.
        pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(crop).transpose(2, 0, 1)))
        return torch.addcmul(self.offset, pixels, self.multiplier)  # (3, H, W) float32
