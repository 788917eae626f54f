"""Image decoding and the paper's augmentations, built on torchvision.transforms.v2.

Decode paths, so the speed of each can be measured on its own:
- plain: ``decode_image(data)``, full-size PIL decode, then the transform;
- fast, pretraining: ``ImageTransform.from_bytes`` (``fast_decode.FastPretrainTransform``) decodes and augments in one
  step, a JPEG at the smallest DCT scale (PIL ``draft``) that the sampled crop allows;
- fast, other transforms: ``decode_image(data, min_side=transform.min_source_side)``, JPEGs decoded at a reduced size
  when no crop can use the full resolution anyway;
- device: ``decode_images_on_device`` (nvjpeg when ``device`` is a GPU) + ``augment_on_device``; a transform that has
  such a batch-wise version carries it as ``ImageTransform.device_augment`` (the pretraining one does).

``open_image``, ``to_rgb`` and ``has_torchvision_jpeg_decoder`` come from ``fast_decode``: this module depends on it,
not the reverse.

Channels: every builder takes ``num_channels`` (C, default 3) and a mean and std of C values each. For C == 3 the
recipes work as they always did, on PIL images converted to 8-bit RGB, with the fused and device paths. For any other
C the images come decoded to float tensors ``(C, H, W)`` on the data's own scale (`channels.decode_channels`), and the
same torchvision steps run on those: random resized crop, flip, resize, center crop, normalise, random erasing; MixUp
and CutMix work on batches of any C. RandAugment's colour operations (brightness, contrast, saturation, sharpness,
autocontrast) exist in torchvision for 1 or 3 channels only, so `finetune_transform` refuses RandAugment for other
counts in one line (on 1 channel its rotations and shears interpolate bilinearly: torchvision has no bicubic for
tensors); the fused decoding (``from_bytes``) and the device version (``device_augment``) are RGB only.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from ..errors import UsageError
from .channels import RGB_CHANNELS, decode_channels
from .fast_decode import (
    FastPretrainTransform,
    has_torchvision_jpeg_decoder,
    open_image,
    to_rgb,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAIN_CROP_SCALE = (0.2, 1.0)  # MAE pretraining (He et al., appendix A.1)
FINETUNE_CROP_SCALE = (0.08, 1.0)
EVAL_CROP_FRACTION = 0.875  # resize to size / 0.875, then center crop
_WORST_CROP_ASPECT = 3 / 4  # RandomResizedCrop's default ratio range is (3/4, 4/3)
RAND_AUGMENT_CHANNELS = (1, 3)  # torchvision's brightness, contrast, saturation, sharpness, autocontrast: 1 or 3


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode encoded image bytes to RGB (`open_image`, then `to_rgb`); raises on truncated or non-image bytes.

    With ``min_side``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose short side stays >= min_side.
    """
    return to_rgb(open_image(data, min_side))


@dataclass(frozen=True)
class ImageTransform:
    """PIL image (any mode), or a float tensor (C, H, W) already decoded on the data's own scale -> normalised float
    tensor (C, H, W), C = ``num_channels`` (a PIL image is converted to RGB for 3, read by `channels` otherwise).

    ``min_source_side``: the short side below which decoding at a reduced size would lose detail in the output crop.
    ``device_augment``: the same recipe for a list of decoded uint8 tensors (3, H, W) wherever they are (e.g. the GPU)
    -> normalised batch; None when the recipe has no such version (only pretraining has one).
    ``from_bytes``: the same recipe fused with decoding, encoded bytes -> normalised tensor, drawing the crop and flip
    from the given generator; None when the recipe has no such version (only pretraining has one).
    """

    pipeline: v2.Compose
    min_source_side: int
    device_augment: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None
    from_bytes: Callable[[bytes, random.Random | None], torch.Tensor] | None = None
    num_channels: int = RGB_CHANNELS

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return self.pipeline(image)
        if self.num_channels == RGB_CHANNELS:
            return self.pipeline(to_rgb(image))
        return self.pipeline(decode_channels(image, self.num_channels))


def _as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def _checked_statistics(mean: Sequence[float], std: Sequence[float], num_channels: int) -> None:
    if len(mean) != num_channels or len(std) != num_channels:
        raise UsageError(f"The images have {num_channels} channels, and the normalisation {len(mean)} mean and "
                         f"{len(std)} std values: pass one of each per channel.")


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    # On a float tensor of another channel count (already on its own scale), ToImage and ToDtype change nothing.
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def _min_side_for_random_crop(size: tuple[int, int], min_scale: float) -> int:
    # The smallest crop RandomResizedCrop can take covers min_scale of the area with aspect ratio 3/4; its short side
    # must still have at least max(size) source pixels for the output to be full resolution.
    return math.ceil(max(size) / math.sqrt(min_scale * _WORST_CROP_ASPECT))


def _random_resized_crop(size: tuple[int, int], scale: tuple[float, float]) -> list[v2.Transform]:
    return [
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
    ]


def pretrain_transform(
    image_size: int | Sequence[int], mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *,
    num_channels: int = RGB_CHANNELS,
) -> ImageTransform:
    """MAE pretraining: RandomResizedCrop(scale=(0.2, 1), bicubic) + horizontal flip + normalise; for C != 3 without
    the fused and device versions (RGB only)."""
    _checked_statistics(mean, std, num_channels)
    size = _as_size(image_size)
    pipeline = v2.Compose(_random_resized_crop(size, PRETRAIN_CROP_SCALE) + _to_normalised_tensor(mean, std))
    min_side = _min_side_for_random_crop(size, PRETRAIN_CROP_SCALE[0])
    if num_channels != RGB_CHANNELS:
        return ImageTransform(pipeline, min_side, num_channels=num_channels)
    on_device = functools.partial(augment_on_device, image_size=size, mean=tuple(mean), std=tuple(std))
    fused = FastPretrainTransform(size, scale=PRETRAIN_CROP_SCALE, mean=mean, std=std)
    return ImageTransform(pipeline, min_side, on_device, fused)


def eval_transform(
    image_size: int | Sequence[int], mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *,
    num_channels: int = RGB_CHANNELS,
) -> ImageTransform:
    """Evaluation: resize the short side to size / 0.875 (bicubic), center crop, normalise."""
    _checked_statistics(mean, std, num_channels)
    size = _as_size(image_size)
    resize_side = int(max(size) / EVAL_CROP_FRACTION)
    pipeline = v2.Compose(
        [v2.Resize(resize_side, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size)]
        + _to_normalised_tensor(mean, std)
    )
    return ImageTransform(pipeline, resize_side, num_channels=num_channels)


class RandAugmentWithMagnitudeNoise(v2.RandAugment):
    """RandAugment whose magnitude is drawn per image from N(magnitude, magnitude_std), like timm's ``mstd0.5``."""

    def __init__(self, magnitude: int = 9, magnitude_std: float = 0.5, **kwargs: object) -> None:
        super().__init__(magnitude=magnitude, **kwargs)
        self.mean_magnitude = magnitude
        self.magnitude_std = magnitude_std

    def forward(self, *inputs: object) -> object:
        noisy = round(random.gauss(self.mean_magnitude, self.magnitude_std))
        self.magnitude = min(max(noisy, 0), self.num_magnitude_bins - 1)
        return super().forward(*inputs)


def finetune_transform(
    image_size: int | Sequence[int], mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *,
    crop_scale: tuple[float, float] = FINETUNE_CROP_SCALE, rand_augment: bool = True, erasing: float = 0.25,
    num_channels: int = RGB_CHANNELS,
) -> ImageTransform:
    """The paper's fine-tuning recipe by default: RandomResizedCrop(0.08-1) + flip + RandAugment(m9, mstd0.5) + random
    erasing 0.25; the small-image recipe keeps larger crops and drops RandAugment and erasing. RandAugment is refused
    for other than 1 or 3 channels (torchvision's colour operations)."""
    _checked_statistics(mean, std, num_channels)
    if rand_augment and num_channels not in RAND_AUGMENT_CHANNELS:
        raise UsageError(f"RandAugment's colour operations work on 1 or 3 channels, and the images have {num_channels}:"
                         " pass --no_rand_augment.")
    size = _as_size(image_size)
    # timm fills RandAugment's empty pixels with the mean colour: in 0-255 for RGB (PIL images), on the tensor's own
    # scale for other counts, whose geometric operations interpolate bilinearly (torchvision's tensor kernels have no
    # bicubic).
    rgb = num_channels == RGB_CHANNELS
    fill = [round(channel * 255) for channel in mean] if rgb else list(mean)
    interpolation = v2.InterpolationMode.BICUBIC if rgb else v2.InterpolationMode.BILINEAR
    augment = [RandAugmentWithMagnitudeNoise(
        magnitude=9, magnitude_std=0.5, interpolation=interpolation, fill=fill
    )] if rand_augment else []
    erase = [v2.RandomErasing(p=erasing, value="random")] if erasing else []  # timm's re_mode="pixel": normal noise
    pipeline = v2.Compose(_random_resized_crop(size, crop_scale) + augment + _to_normalised_tensor(mean, std) + erase)
    return ImageTransform(pipeline, _min_side_for_random_crop(size, crop_scale[0]), num_channels=num_channels)


def mixup_cutmix(
    num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, label_smoothing: float = 0.1
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Batch-level MixUp or CutMix (one of those with alpha > 0, drawn per batch, as in the paper) ->
    (pixel_values, soft targets with label smoothing); with both alphas 0, label smoothing alone."""
    mixers = [
        mixer(alpha=alpha, num_classes=num_classes)
        for mixer, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
        if alpha > 0
    ]
    choice = v2.RandomChoice(mixers) if mixers else None

    def mix(pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if choice is None:
            targets = torch.nn.functional.one_hot(labels, num_classes).float()
        else:
            pixel_values, targets = choice(pixel_values, labels)
        return pixel_values, targets * (1.0 - label_smoothing) + label_smoothing / num_classes

    return mix


def decode_image_tensor(data: bytes) -> torch.Tensor:
    """``decode_image`` as a uint8 RGB tensor (3, H, W): the CPU decoder, with the mode conversions of the PIL path."""
    return v2.functional.pil_to_tensor(decode_image(data))


def decode_images_on_device(encoded: Sequence[bytes], device: str | torch.device = "cuda") -> list[torch.Tensor]:
    """Decode to uint8 RGB tensors (3, H, W) on ``device``: JPEGs with torchvision (nvjpeg on a GPU), other formats
    with PIL on the CPU.

    Raises when any image cannot be decoded (one bad JPEG fails the whole batched call).
    """
    device = torch.device(device)
    has_decoder = has_torchvision_jpeg_decoder()
    is_jpeg = [has_decoder and data[:2] == b"\xff\xd8" for data in encoded]
    jpegs = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data, jpeg in zip(encoded, is_jpeg) if jpeg]
    if jpegs and device.type == "cuda":
        # nvjpeg writes its outputs from its own stream into blocks the caching allocator may have just recycled from
        # tensors that kernels queued on the caller's stream still read (pytorch/vision#9606): let those finish first.
        torch.cuda.current_stream(device).synchronize()
    decoded_jpegs = iter(
        torchvision.io.decode_jpeg(jpegs, mode=torchvision.io.ImageReadMode.RGB, device=device) if jpegs else []
    )
    # Other formats go through PIL, like in the workers: torchvision's decode_image keeps 16-bit PNGs as uint16.
    return [
        next(decoded_jpegs) if jpeg else decode_image_tensor(data).to(device) for data, jpeg in zip(encoded, is_jpeg)
    ]


def augment_on_device(
    images: Sequence[torch.Tensor],
    image_size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Pretraining augmentation of decoded uint8 images where they are (e.g. the GPU) -> normalised batch (B, 3, H, W)."""
    crop = v2.Compose(_random_resized_crop(_as_size(image_size), PRETRAIN_CROP_SCALE))
    batch = torch.stack([crop(image) for image in images])
    return v2.Normalize(mean=list(mean), std=list(std))(v2.ToDtype(torch.float32, scale=True)(batch))
