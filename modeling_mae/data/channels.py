"""Images and arrays of any channel count -> float tensors `(C, H, W)` on the data's own scale.

RGB models (``num_channels == 3``) read encoded images through `transforms.decode_image` and `fast_decode`, which
convert every PIL mode to 8-bit RGB; this module reads everything else, and arrays whatever the channel count:

- an encoded image (PNG, JPEG, TIFF, ...) or a PIL image: single-band modes (L, 1, I;16, I, F) stay one channel; LA,
  RGB and RGBA keep their bands; palette and other colour modes (P, CMYK, YCbCr, ...) become RGB (RGBA when the
  palette has transparency);
- an array: the bytes of a ``.npy`` file (an image folder's file), a numpy array (a webdataset ``.npy`` member, which
  `datasets` decodes) or the nested lists of a parquet ``Array2D``/``Array3D`` or list column (read with the column's
  dtype). A 2-D array is one channel; a 3-D one is channels-last ``(H, W, C)`` or channels-first ``(C, H, W)``: the
  axis whose length is C, channels-last when both are.

The scale is the data's own: 8-bit values are divided by 255, wider integers (16-bit images, PIL's I;16 and I modes,
uint16 arrays) by 65535, and floats are kept as they are (`pixel_scale`). An image whose channels cannot be C raises
`ChannelMismatch`, whose message is the reason the stream gives when it skips the image.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from .fast_decode import open_image

RGB_CHANNELS = 3  # the channel count the RGB decoding path (`fast_decode.to_rgb`) serves
NPY_MAGIC = b"\x93NUMPY"
EIGHT_BIT_SCALE = 1 / 255
SIXTEEN_BIT_SCALE = 1 / 65535
_KEPT_MODES = ("L", "LA", "RGB", "RGBA", "F")


class ChannelMismatch(ValueError):
    """An image whose channels cannot be the model's: the message says why, `channels` is how many it has."""

    def __init__(self, message: str, channels: int) -> None:
        super().__init__(message)
        self.channels = channels


def is_array_source(source: Any) -> bool:
    """Whether a record's image is an array (a numpy array or ``.npy`` bytes) rather than an encoded image."""
    return isinstance(source, np.ndarray) or (isinstance(source, bytes) and source[: len(NPY_MAGIC)] == NPY_MAGIC)


def uses_rgb_path(source: Any, num_channels: int) -> bool:
    """Whether the image goes through the RGB decoding path (every PIL mode converted to 8-bit RGB), as it always
    did: an encoded or PIL image for a 3-channel model."""
    return num_channels == RGB_CHANNELS and not is_array_source(source)


def pixel_scale(dtype: np.dtype) -> float:
    """What values of `dtype` are multiplied by: 1/255 for 8-bit integers, 1/65535 for wider ones (16-bit data, also
    when PIL holds it in 32 bits), 1 for floats and booleans."""
    if dtype.kind in "ui":
        return EIGHT_BIT_SCALE if dtype.itemsize == 1 else SIXTEEN_BIT_SCALE
    return 1.0


def load_npy(data: bytes) -> np.ndarray:
    """The array of a ``.npy`` file's bytes; pickled objects are refused (a data file must not run code)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _with_channel_bands(image: Image.Image) -> Image.Image:
    """The image in a mode whose bands are its channels: single-band, LA, RGB and RGBA modes as they are."""
    if image.mode.startswith("I") or image.mode in _KEPT_MODES:  # I, I;16, I;16B, ...: 16/32-bit single band
        return image
    if image.mode == "1":
        return image.convert("L")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA")  # the palette's transparency is only understood by the RGBA conversion
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, ...: colour modes whose bands are no image's channels


def _image_channels_first(image: Image.Image, num_channels: int) -> np.ndarray:
    bands = np.asarray(_with_channel_bands(image))  # uint8, uint16, int32 or float32
    bands = bands[:, :, None] if bands.ndim == 2 else bands  # (H, W) -> (H, W, 1): PIL is always channels-last
    if bands.shape[-1] != num_channels:
        raise ChannelMismatch(f"{bands.shape[-1]} channels ({image.mode} image), the model takes {num_channels}",
                              bands.shape[-1])
    return bands.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


def _array_channels(array: np.ndarray) -> int:
    """An array's likely channel count, for messages: 1 for (H, W), else its shorter end axis."""
    return 1 if array.ndim == 2 else min(array.shape[0], array.shape[-1])


def array_channels_first(array: np.ndarray, num_channels: int) -> np.ndarray:
    """`(H, W)`, `(H, W, C)` or `(C, H, W)` -> `(C, H, W)` (channels-last when both end axes have length C)."""
    if array.ndim == 2 and num_channels == 1:
        return array[None]  # (H, W) -> (1, H, W)
    if array.ndim == 3 and array.shape[-1] == num_channels:
        return array.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    if array.ndim == 3 and array.shape[0] == num_channels:
        return array
    if array.ndim not in (2, 3):
        raise ChannelMismatch(f"array of shape {array.shape}: an image is (H, W), (H, W, C) or (C, H, W)", 0)
    raise ChannelMismatch(f"array of shape {array.shape}: no axis of length {num_channels}, the model's channel count",
                          _array_channels(array))


def read_pixels(source: bytes | Image.Image | np.ndarray, num_channels: int, min_side: int | None = None) -> np.ndarray:
    """A record's image `(C, H, W)` in its own dtype; raises `ChannelMismatch` when it has another channel count, and
    the decoder's error when it cannot be decoded."""
    if isinstance(source, bytes) and is_array_source(source):
        source = load_npy(source)
    if isinstance(source, np.ndarray):
        return array_channels_first(source, num_channels)
    image = source if isinstance(source, Image.Image) else open_image(source, min_side)
    return _image_channels_first(image, num_channels)


def to_float_tensor(pixels: np.ndarray) -> torch.Tensor:
    """`(C, H, W)` pixels of any dtype -> float32 tensor on their own scale (`pixel_scale`)."""
    scale = pixel_scale(pixels.dtype)
    tensor = torch.from_numpy(np.array(pixels, dtype=np.float32, order="C"))  # a copy: the source stays untouched
    return tensor if scale == 1.0 else tensor.mul_(scale)


def decode_channels(
    source: bytes | Image.Image | np.ndarray, num_channels: int, min_side: int | None = None
) -> torch.Tensor:
    """A record's image as a float32 tensor `(C, H, W)` on the data's own scale (see the module docstring)."""
    return to_float_tensor(read_pixels(source, num_channels, min_side))
