"""Masked Autoencoders Are Scalable Vision Learners (He et al., 2021), as transformers models.

The algorithm, in the official implementation's steps (facebookresearch/mae, `models_mae.py`):
`patchify` the image, `random_masking` keeps 25% of the patches (here `masking_indices` draws them
before embedding, so that only those are embedded, with a fixed 2D sin-cos position), `forward_encoder`
runs the ViT on the visible patches only (no mask tokens: this is what makes pretraining ~3x cheaper),
`forward_decoder` puts learned mask tokens back in place and predicts the patches' pixels, and
`forward_loss` is the MSE on the masked patches.
Training asks for the masked patches' predictions only (`logits_to_keep="masked"`), so that the
decoder's last block and head skip the visible ones; the official code computes and discards them.

Shapes: B batch, C channels, H x W image, p x q patch, L = (H / p) * (W / q) patches,
L_vis visible patches, D encoder width, D_dec decoder width.

This file imports only `configuration_mae.py` (and torch/transformers), so both can travel with a
checkpoint as Hub remote code.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    ImageFeatureExtractionPipeline,
    PreTrainedModel,
    ViTImageProcessor,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.image_utils import PILImageResampling
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, is_vision_available
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mae import MAEConfig

if is_vision_available():  # Pillow: only the pipeline needs it (to open image files); remote code does without
    from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

NORM_PIX_EPS = 1e-6
# The channel counts whose axis transformers' image processors find by themselves (`process_image` infers (1, 3, 4)
# channels first or last); for any other count the exported processor records that arrays are channels-last.
INFERRED_CHANNEL_COUNTS = (1, 3, 4)

# Written into every saved config.json so that all four Auto classes load it as remote code.
AUTO_MAP = {
    "AutoConfig": "configuration_mae.MAEConfig",
    "AutoModel": "modeling_mae.MAEModel",
    "AutoModelForPreTraining": "modeling_mae.MAEForPreTraining",
    "AutoModelForImageClassification": "modeling_mae.MAEForImageClassification",
}


def build_image_processor(config: MAEConfig) -> ViTImageProcessor:
    """The preprocessing the model expects, `(pixel * rescale_factor - mean) / std` per channel with the config's
    statistics; `AutoImageProcessor` reloads it without custom code.

    RGB models convert any image to RGB first, as training does; other channel counts keep the image's own channels
    (a PIL "L" or "I;16" image is one channel). Arrays of a channel count transformers cannot infer the axis of
    (`INFERRED_CHANNEL_COUNTS`) are taken as channels-last (H, W, C), numpy's and PIL's layout: pass
    `input_data_format="channels_first"` for (C, H, W) ones.
    """
    height, width = config.image_size
    layout = {} if config.num_channels in INFERRED_CHANNEL_COUNTS else {"input_data_format": "channels_last"}
    return ViTImageProcessor(
        size={"height": height, "width": width},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        rescale_factor=config.rescale_factor,
        do_convert_rgb=config.num_channels == 3,
        **layout,
    )


# ----------------------------------------------------------------------------------------------
# From RGB weights to C channels
# ----------------------------------------------------------------------------------------------

RGB_CHANNELS = 3


def channels_of_rgb(num_channels: int) -> list[int]:
    """The RGB channel each of `num_channels` channels takes its weights from: cyclically, R G B R G B ..."""
    return [channel % RGB_CHANNELS for channel in range(num_channels)]


def adapt_patch_kernels(weight: torch.Tensor, num_channels: int) -> torch.Tensor:
    """RGB patch kernels `(D, 3, p, q)` -> `(D, C, p, q)` by timm's `adapt_input_conv` rules. One channel: the sum of
    the three kernels, so that a gray image gives the response its RGB copy (three equal channels) gave. More: the
    kernels repeated cyclically (`channels_of_rgb`) and scaled by 3 / C, so that the response keeps its size when the
    bands are alike. Computed in float32 (a half-precision sum loses digits), returned in the weight's dtype."""
    kernels = weight.float()
    if num_channels == 1:
        adapted = kernels.sum(dim=1, keepdim=True)
    else:
        adapted = kernels[:, channels_of_rgb(num_channels)] * (RGB_CHANNELS / num_channels)
    return adapted.to(weight.dtype)


def adapt_pixel_head(tensor: torch.Tensor, num_channels: int) -> torch.Tensor:
    """The decoder's pixel head (weight `(p * q * 3, D_dec)` or bias `(p * q * 3,)`, rows in `patchify` order, the
    channel fastest) -> `p * q * C` rows. Derived from the RGB rows, not re-initialised: the encoder adapted by
    `adapt_patch_kernels` sees a gray image as its RGB copy, and C bands as copies of R, G, B, so the head that
    reconstructed those copies goes on reconstructing them: one channel takes the mean of the R, G and B rows (the
    gray value of an RGB prediction), C channels the row of their RGB channel. Unscaled: each row predicts one
    channel's pixel, not a sum over channels. Fresh rows would predict noise and cost the first steps relearning it."""
    rows = tensor.unflatten(0, (-1, RGB_CHANNELS))  # (p * q * 3, ...) -> (p * q, 3, ...)
    if num_channels == 1:
        adapted = rows.float().mean(dim=1, keepdim=True).to(tensor.dtype)
    else:
        adapted = rows[:, channels_of_rgb(num_channels)]  # (p * q, C, ...)
    return adapted.flatten(0, 1)  # (p * q * C, ...)


def adapt_statistics(values: list[float], num_channels: int) -> list[float]:
    """RGB normalisation statistics for the adapted channels, by the kernels' rule: their mean for one channel (the
    sum of the kernels assumes one normalisation for the three copies), the RGB channel's own for C channels."""
    if num_channels == 1:
        return [sum(values) / len(values)]
    return [values[rgb] for rgb in channels_of_rgb(num_channels)]


def channel_adaptation_rule(num_channels: int) -> str:
    """What `adapt_channels` does for `num_channels`, in words for the log."""
    if num_channels == 1:
        return ("RGB -> 1 channel: patch kernels summed (timm's adapt_input_conv), decoder pixel rows and "
                "normalisation statistics averaged over R, G, B")
    return (f"RGB -> {num_channels} channels: patch kernels repeated cyclically and scaled by 3/{num_channels} "
            "(timm's adapt_input_conv), decoder pixel rows and normalisation statistics copied cyclically (R, G, B, "
            "R, ...)")


PATCH_KERNELS_SUFFIX = "embeddings.patch_embeddings.projection.weight"
PIXEL_HEAD_KEYS = ("decoder.pred.weight", "decoder.pred.bias")


def adapt_channels(
    state_dict: dict[str, torch.Tensor], config: MAEConfig, num_channels: int, **config_fields: Any
) -> tuple[dict[str, torch.Tensor], MAEConfig]:
    """A 3-channel (RGB) model's weights and config, for `num_channels` input channels: the patch kernels
    (`adapt_patch_kernels`), the decoder's pixel head when there is one (`adapt_pixel_head`) and the config's
    `num_channels`, `image_mean` and `image_std` (`adapt_statistics`), unless `config_fields` give them (the data
    set's own). The state dict's keys may have the `mae.` prefix of the full models or not (`MAEModel`'s).
    `channel_adaptation_rule` says what was done."""
    if config.num_channels != RGB_CHANNELS:
        raise ValueError(f"only RGB (3-channel) weights adapt to another channel count; these have "
                         f"{config.num_channels} channels")
    fields = {**config.to_dict(), "num_channels": num_channels,
              "image_mean": adapt_statistics(config.image_mean, num_channels),
              "image_std": adapt_statistics(config.image_std, num_channels), **config_fields}
    adapted_config = MAEConfig.from_dict(fields)  # validated first: a channel count < 1 stops here
    adapted = dict(state_dict)
    for key, tensor in state_dict.items():
        if key.endswith(PATCH_KERNELS_SUFFIX):
            adapted[key] = adapt_patch_kernels(tensor, num_channels)
        elif key in PIXEL_HEAD_KEYS:
            adapted[key] = adapt_pixel_head(tensor, num_channels)
    return adapted, adapted_config


class MAEImageFeatureExtractionPipeline(ImageFeatureExtractionPipeline):
    """transformers' `image-feature-extraction` pipeline for models of any channel count.

    transformers' own opens every input with `load_image`, which takes a PIL image or a path/URL only and converts it
    to RGB: a gray or 16-bit image reaches a 1-channel model as 3 channels (8-bit), and arrays (e.g. 4 bands) are
    refused. For other than 3 channels this one hands PIL images of any mode, numpy arrays and tensors to the image
    processor as they are (it normalises them with the model's statistics, `build_image_processor`) and opens a file
    path as it is stored. RGB models keep transformers' behaviour. The folders that `save_pretrained` writes for
    other channel counts name it in config.json (`custom_pipelines`), so that
    `pipeline("image-feature-extraction", model=folder, trust_remote_code=True)` builds it.
    """

    def preprocess(self, image: Any, timeout: float | None = None, **image_processor_kwargs: Any) -> Any:
        if self.model.config.num_channels == RGB_CHANNELS:
            return super().preprocess(image, timeout=timeout, **image_processor_kwargs)
        if isinstance(image, (str, os.PathLike)):  # upright, as `load_image` makes it, in the file's own mode
            image = ImageOps.exif_transpose(Image.open(image))
        return self.image_processor(image, return_tensors="pt", **image_processor_kwargs).to(self.dtype)


# config.json's entry for models of other than 3 channels: the pipeline task resolves to the class above.
CUSTOM_PIPELINES = {
    "image-feature-extraction": {"impl": "modeling_mae.MAEImageFeatureExtractionPipeline", "pt": ["AutoModel"]},
}


def name_the_cpu_for_deepspeed() -> None:
    """`DS_ACCELERATOR=cpu` (unless set) on a machine without an accelerator: Accelerate imports DeepSpeed whenever it
    is installed (transformers' `save_pretrained` unwraps the model with it), and DeepSpeed then warns that it fell
    back to the CPU, which is what it would pick anyway."""
    if not torch.accelerator.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class MAEModelOutput(ModelOutput):
    r"""Output of [`MAEModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, 1 + L_vis, D)`): final-norm encoder
            output, CLS first. `L_vis = L` when no masking was asked for.
        pooler_output (`torch.FloatTensor` of shape `(B, D)`): mean of the patch tokens
            (`config.use_mean_pooling`) or the CLS token.
        mask (`torch.FloatTensor` of shape `(B, L)`, *optional*): 1 for removed patches, 0 for kept
            ones; `None` without masking.
        ids_restore (`torch.LongTensor` of shape `(B, L)`, *optional*): inverse of the shuffle,
            used by the decoder to put tokens back in place; `None` without masking.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states=True`, the
            input of every layer plus the last layer's output (before the final norm), each `(B, 1 + L_vis, D)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*): with `output_attentions=True` and eager attention
            (the fused kernels return no weights), each layer's `(B, heads, 1 + L_vis, 1 + L_vis)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MAEForPreTrainingOutput(ModelOutput):
    r"""Output of [`MAEForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): MSE on the masked patches (on all patches when
            `mask_ratio=0`), against per-patch normalised pixels when `config.norm_pix_loss`.
        logits (`torch.FloatTensor` of shape `(B, L, p * q * C)`): predicted pixels of every patch,
            in `patchify` order; `(B, L - L_vis, p * q * C)`, the masked patches only in ascending
            order, with `logits_to_keep="masked"`.
        mask (`torch.FloatTensor` of shape `(B, L)`): 1 for removed patches, 0 for kept ones.
        ids_restore (`torch.LongTensor` of shape `(B, L)`): inverse of the shuffle.
        hidden_states, attentions: of the encoder, as in [`MAEModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------
# Position tables and masking
# ----------------------------------------------------------------------------------------------


def sincos_position_table(embed_dim: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """The official fixed 2D sin-cos table, `(1 + H*W, embed_dim)`, zero row first for CLS.

    Each row is `[sin(w * omega) | cos(w * omega) | sin(h * omega) | cos(h * omega)]` for the
    patch at row h, column w (row-major), with `omega_k = 10000 ** (-k / (embed_dim / 4))`.
    Computed in float64 like the official numpy code, then cast.
    """
    grid_h, grid_w = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )  # each (H, W)
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega  # (H*W, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (H*W, D/2)

    table = torch.cat([encode(cols), encode(rows)], dim=1)  # (H*W, D)
    return torch.cat([table.new_zeros(1, embed_dim), table]).float()  # (1 + H*W, D)


def resize_position_table(
    table: torch.Tensor, grid_size: tuple[int, int], new_grid_size: tuple[int, int]
) -> torch.Tensor:
    """Bicubic resize of a `(1, 1 + H*W, D)` table to another grid (as the official fine-tuning
    code does for a new resolution); the CLS row is kept."""
    if tuple(new_grid_size) == tuple(grid_size):
        return table
    dim = table.shape[-1]
    cls_row, patch_rows = table[:, :1], table[:, 1:]
    patch_rows = patch_rows.reshape(1, *grid_size, dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    patch_rows = F.interpolate(patch_rows.float(), size=tuple(new_grid_size), mode="bicubic", align_corners=False)
    patch_rows = patch_rows.to(table.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)  # (1, H'*W', D)
    return torch.cat([cls_row, patch_rows], dim=1)


def masking_indices(
    batch_size: int, seq_len: int, mask_ratio: float, noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting noise: the patches with the smallest noise are kept.

    Args:
        mask_ratio: fraction of the `seq_len` patches to remove.
        noise: `(B, L)` in [0, 1); pass it for reproducible masks, otherwise drawn uniformly.

    Returns:
        ids_keep `(B, L_vis)` (the kept patches, in shuffled order), mask `(B, L)` (1 = removed, float)
        and ids_restore `(B, L)` (the inverse of the shuffle).
    """
    len_keep = int(seq_len * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch_size, seq_len, device=device)
    elif noise.shape != (batch_size, seq_len):
        raise ValueError(f"noise must have shape {(batch_size, seq_len)}, got {tuple(noise.shape)}")

    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch_size, seq_len, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original patch order
    return ids_shuffle[:, :len_keep], mask, ids_restore


def gather_tokens(sequence: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`(B, N, D)` tokens, `(B, K)` indices -> `(B, K, D)`."""
    return torch.gather(sequence, 1, index.unsqueeze(-1).expand(-1, -1, sequence.shape[-1]))


def random_masking(
    sequence: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`masking_indices` applied to `(B, L, D)` tokens: kept `(B, L_vis, D)`, mask `(B, L)`, ids_restore `(B, L)`."""
    batch_size, seq_len, _ = sequence.shape
    ids_keep, mask, ids_restore = masking_indices(batch_size, seq_len, mask_ratio, noise, sequence.device)
    return gather_tokens(sequence, ids_keep), mask.to(sequence.dtype), ids_restore


def loss_patch_index(mask: torch.Tensor, num_masked: int) -> torch.Tensor:
    """The patches the loss is taken on, ascending: the `num_masked` removed ones of each sample `(B, K)`, or all
    `(B, L)` when none was removed (`mask_ratio=0`). Sorting the mask keeps the GPU free of a host sync."""
    batch_size, seq_len = mask.shape
    if num_masked == 0:
        return torch.arange(seq_len, device=mask.device).expand(batch_size, -1)
    return mask.argsort(dim=1, descending=True, stable=True)[:, :num_masked]


def patch_grid(pixel_values: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """`(B, C, H, W)` -> a view `(B, H/p, W/q, p, q, C)` (no copy): patch (i, j) is `[:, i, j]`."""
    batch_size, channels, height, width = pixel_values.shape
    patch_height, patch_width = patch_size
    grid_height, grid_width = height // patch_height, width // patch_width
    grid = pixel_values.view(batch_size, channels, grid_height, patch_height, grid_width, patch_width)
    return grid.permute(0, 2, 4, 3, 5, 1)


def patchify(pixel_values: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B, L, p * q * C)`, each patch flattened row by row, channels last."""
    grid = patch_grid(pixel_values, patch_size)  # (B, H/p, W/q, p, q, C)
    return grid.reshape(grid.shape[0], grid.shape[1] * grid.shape[2], -1)


def gather_patches(pixel_values: torch.Tensor, patch_size: tuple[int, int], index: torch.Tensor) -> torch.Tensor:
    """`patchify(pixel_values)` of the patches `index` `(B, K)` only, the others not copied: `(B, K, p * q * C)`."""
    grid = patch_grid(pixel_values, patch_size)  # (B, H/p, W/q, p, q, C)
    grid_width = grid.shape[2]
    batch = torch.arange(grid.shape[0], device=index.device).unsqueeze(1)  # (B, 1), broadcast against (B, K)
    return grid[batch, index // grid_width, index % grid_width].flatten(2)  # (B, K, p, q, C) -> (B, K, p * q * C)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class PatchProjection(nn.Conv2d):
    """The strided convolution that projects p x q patches to the model width. It also takes the pixels of selected
    patches, patchified, and projects them as one matmul with the same weights: how the encoder embeds only the
    visible patches. Both paths run in `forward`, so that hooks on this module (FSDP gathering its shards, adapters)
    see every use of its weights."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` images -> `(B, D, H/p, W/q)`; `(B, K, p * q * C)` patches (`patchify`'s layout) ->
        `(B, K, D)`."""
        if pixels.dim() == 4:
            return super().forward(pixels)
        weight = self.weight.permute(0, 2, 3, 1).flatten(1)  # (D, C, p, q) -> (D, p * q * C), patchify's order
        return F.linear(pixels, weight, self.bias)


class MAEPatchEmbeddings(nn.Module):
    """Non-overlapping p x q patches projected to the model width."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        self.projection = PatchProjection(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def grid_size(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> tuple[int, int]:
        """The `(H/p, W/q)` patch grid of `(B, C, H, W)` images, after checking that the model takes them."""
        _, channels, height, width = pixel_values.shape
        if channels != self.config.num_channels:
            raise ValueError(f"expected {self.config.num_channels} channels, got {channels}")
        if not interpolate_pos_encoding and (height, width) != tuple(self.config.image_size):
            raise ValueError(
                f"input image size ({height}x{width}) doesn't match the model ({self.config.image_size[0]}x"
                f"{self.config.image_size[1]}); pass interpolate_pos_encoding=True to use another resolution"
            )
        patch_height, patch_width = self.config.patch_size
        if height % patch_height or width % patch_width:
            raise ValueError(f"image size ({height}x{width}) must be a multiple of patch_size {self.config.patch_size}")
        return height // patch_height, width // patch_width

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, keep_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B, L, D)`, or with `keep_index` `(B, K)` those patches' only, `(B, K, D)`: a matmul on
        their pixels, a quarter of the convolution's work at mask ratio 0.75."""
        self.grid_size(pixel_values, interpolate_pos_encoding)
        if keep_index is None:
            return self.projection(pixel_values).flatten(2).transpose(1, 2)  # (B, D, H/p, W/q) -> (B, L, D)
        return self.projection(gather_patches(pixel_values, self.config.patch_size, keep_index))


class MAEEmbeddings(nn.Module):
    """Patch embeddings plus the fixed (frozen) sin-cos positions, and the learned CLS token."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embeddings = MAEPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, config.num_patches + 1, config.hidden_size), requires_grad=False
        )

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, keep_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(B, C, H, W)` -> the CLS token and the patch tokens with their positions, `(B, 1 + L, D)`; with
        `keep_index` `(B, K)`, only those patches, `(B, 1 + K, D)`: the others are never embedded."""
        grid = self.patch_embeddings.grid_size(pixel_values, interpolate_pos_encoding)
        positions = resize_position_table(self.position_embeddings, self.config.grid_size, grid)[:, 1:]  # (1, L, D)
        if keep_index is not None:
            positions = gather_tokens(positions.expand(keep_index.shape[0], -1, -1), keep_index)  # (B, K, D)
        patch_tokens = self.patch_embeddings(pixel_values, interpolate_pos_encoding, keep_index) + positions
        cls_token = (self.cls_token + self.position_embeddings[:, :1]).expand(patch_tokens.shape[0], -1, -1)
        return torch.cat([cls_token, patch_tokens], dim=1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling) v on `(B, heads, N, head_dim)`; returns `(B, N, heads, head_dim)`
    and the weights, the layout of transformers' attention interface."""
    # Scaling q (N x head_dim) rather than the scores (N x N) saves a pass over the largest tensor, both ways.
    weights = torch.matmul(query * scaling, key.transpose(2, 3))  # (B, heads, N, N)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class MAEAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (one GEMM instead of three, and the
    official parameter layout), dispatched through transformers' attention interface."""

    def __init__(self, config: MAEConfig, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # read by the sdpa/flash interfaces
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, query_index: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, N, D)` -> `(B, N, D)`; with `query_index` `(B, K)` only those tokens' outputs `(B, K, D)`
        (they still attend to all N)."""
        batch_size, seq_len, width = hidden_states.shape
        # (B, N, 3 * D) -> (B, N, 3, heads, head_dim) -> 3 x (B, heads, N, head_dim). Split before transposing: the
        # backward then stacks the three gradients straight into qkv's layout, one copy instead of two.
        qkv = self.qkv(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = (projection.transpose(1, 2) for projection in qkv.unbind(2))
        if query_index is not None:  # (B, heads, N, head_dim) -> (B, heads, K, head_dim)
            query = torch.gather(query, 2, query_index[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim))
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        # (B, N or K, heads, head_dim) -> (B, N or K, D)
        return self.proj(attn_output.reshape(batch_size, query.shape[2], width)), attn_weights


class MAEMLP(nn.Module):
    def __init__(self, config: MAEConfig, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability `rate`."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return hidden_states
        keep = 1.0 - self.rate
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)  # one draw per sample
        return hidden_states * hidden_states.new_empty(shape).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class MAELayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self, config: MAEConfig, hidden_size: int, num_heads: int, intermediate_size: int, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = MAEAttention(config, hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = MAEMLP(config, hidden_size, intermediate_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, hidden_states: torch.Tensor, query_index: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, N, D)` -> `(B, N, D)`, or only the tokens `query_index` `(B, K)`: `(B, K, D)`."""
        attn_output, attn_weights = self.attention(self.norm1(hidden_states), query_index, **kwargs)
        if query_index is not None:
            hidden_states = gather_tokens(hidden_states, query_index)  # the residual of the kept tokens
        hidden_states = hidden_states + self.drop_path(self.dropout(attn_output))
        hidden_states = hidden_states + self.drop_path(self.dropout(self.mlp(self.norm2(hidden_states))))
        return hidden_states, attn_weights


class MAEClassifierHead(nn.Linear):
    """The classification layer; its own type so it gets the official tiny init, not xavier."""


class MAETransformer(nn.Module):
    """A stack of `MAELayer`s; the encoder and the decoder each own one."""

    def __init__(
        self,
        config: MAEConfig,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        # Deeper layers drop more, linearly from 0 (the official `torch.linspace(0, rate, depth)`). Plain floats, not a
        # tensor: a tensor has no values to read when the model is built on the meta device.
        rates = [drop_path_rate * depth / max(num_layers - 1, 1) for depth in range(num_layers)]
        self.layers = nn.ModuleList(
            MAELayer(config, hidden_size, num_heads, intermediate_size, rate) for rate in rates
        )

    def forward(self, hidden_states: torch.Tensor, output_index: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, N, D)` -> `(B, N, D)`; with `output_index` `(B, K)` the last layer computes only those tokens'
        outputs, `(B, K, D)`: the others would feed nothing. Hidden states and attention weights are recorded by hooks
        on the layers (`MAEModel._can_record_outputs`), not collected here."""
        last = len(self.layers) - 1
        for depth, layer in enumerate(self.layers):
            hidden_states, _ = layer(hidden_states, output_index if depth == last else None)
        return hidden_states


class MAEDecoder(nn.Module):
    """The light decoder: latent tokens plus learned mask tokens, unshuffled, back to pixels."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        width = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, width), requires_grad=False)
        self.transformer = MAETransformer(
            config, width, config.decoder_num_hidden_layers, config.decoder_num_attention_heads,
            config.decoder_intermediate_size,
        )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        patch_height, patch_width = config.patch_size
        self.pred = nn.Linear(width, patch_height * patch_width * config.num_channels)

    def forward(
        self,
        latent: torch.Tensor,
        ids_restore: torch.Tensor,
        grid_size: tuple[int, int],
        patch_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`(B, 1 + L_vis, D)` encoder output -> `(B, L, p * q * C)` predicted pixels, or those of the patches
        `patch_index` `(B, K)` only, `(B, K, p * q * C)`: the last block, norm and head then skip the others."""
        tokens = self.decoder_embed(latent)  # (B, 1 + L_vis, D_dec)
        batch_size, num_tokens, width = tokens.shape
        num_patches = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(batch_size, num_patches + 1 - num_tokens, -1)  # (B, L - L_vis, D_dec)
        patches = torch.cat([tokens[:, 1:], mask_tokens], dim=1)  # (B, L, D_dec), shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, width))  # unshuffle
        tokens = torch.cat([tokens[:, :1], patches], dim=1)  # (B, 1 + L, D_dec)
        tokens = tokens + resize_position_table(self.position_embeddings, self.config.grid_size, grid_size)
        if patch_index is None:
            tokens = self.transformer(tokens)
            return self.pred(self.norm(tokens[:, 1:]))  # CLS dropped before the head, not after: (B, L, p * q * C)
        tokens = self.transformer(tokens, output_index=patch_index + 1)  # + 1: CLS first; (B, K, D_dec)
        return self.pred(self.norm(tokens))  # (B, K, p * q * C)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class MAEPreTrainedModel(PreTrainedModel):
    """Shared settings and the official initialisation.

    Every tensor is a parameter (the frozen sin-cos tables too: they travel with checkpoints) and `_init_weights`
    writes all of them, so a model built on the meta device (`with torch.device("meta")`, what FSDP2 and big-model
    loading do) becomes a usable one with `model.to_empty(device=...)` then `model.init_weights()`.
    """

    config_class = MAEConfig
    config: MAEConfig
    base_model_prefix = "mae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MAEEmbeddings", "MAELayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Our losses are means over the batch and ignore `num_items_in_batch`; a forward with `**kwargs` would otherwise
    # tell transformers' `Trainer` that they are normalised by it, and it would skip dividing by the gradient
    # accumulation steps (gradients `gradient_accumulation_steps` times too large).
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The official initialisation (`MaskedAutoencoderViT.initialize_weights` and the fine-tuning head's).

        On purpose unlike transformers' ViT models: Linear and patch-projection weights are xavier-uniform, as in the
        official code, not normal(0, `config.initializer_range`); `initializer_range` is only the CLS and mask tokens'
        std (0.02 in both). The patch projection's bias keeps PyTorch's default, uniform(+-1/sqrt(C * p * q)), which
        the official code never overwrites; it is drawn here so that a model materialised from the meta device gets it.
        The `init` functions skip a tensor already loaded by `from_pretrained` (its `_is_hf_initialized` flag).
        """
        if isinstance(module, MAEClassifierHead):
            init.trunc_normal_(module.weight, std=2e-5)  # the official fine-tuning's head init
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)  # qkv is one (3D, D) matrix: its bound is the official one
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # the patch projection
            if not getattr(module.weight, "_is_hf_initialized", False):  # a view drops the flag `init` checks
                nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))  # a Linear on flat patches
            bound = 1 / math.sqrt(math.prod(module.weight.shape[1:]))  # fan_in = C * p * q: PyTorch's default
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, MAEEmbeddings):
            init.normal_(module.cls_token, std=self.config.initializer_range)
            table = sincos_position_table(self.config.hidden_size, self.config.grid_size)
            init.copy_(module.position_embeddings, table.unsqueeze(0))
        elif isinstance(module, MAEDecoder):
            init.normal_(module.mask_token, std=self.config.initializer_range)
            table = sincos_position_table(self.config.decoder_hidden_size, self.config.grid_size)
            init.copy_(module.position_embeddings, table.unsqueeze(0))

    @classmethod
    def from_pretrained(cls, *args: Any, num_channels: int | None = None, **kwargs: Any) -> Any:
        """transformers' `from_pretrained`, then the fixed sin-cos position tables frozen again.

        transformers (5.17 to 5.24) puts every loaded weight in a new `nn.Parameter`, trainable: without this, a loaded
        model would train the tables that the paper (and a freshly built model) keeps fixed.

        `num_channels` other than the checkpoint's adapts RGB weights to that many input channels (`adapt_channels`:
        timm's rules, summed kernels for 1 channel, repeated and rescaled ones for more) and logs the rule. Without
        it, a config of another channel count than the checkpoint's stays transformers' size-mismatch error.
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # `output_loading_info=True` adds a dict
        if num_channels is not None and num_channels != model.config.num_channels:
            model = model.adapted_to_channels(num_channels)
            loaded = (model, *loaded[1:]) if isinstance(loaded, tuple) else model
        for module in model.modules():
            if isinstance(module, (MAEEmbeddings, MAEDecoder)):
                module.position_embeddings.requires_grad_(False)
        return loaded

    def adapted_to_channels(self, num_channels: int, **config_fields: Any) -> MAEPreTrainedModel:
        """This RGB model as a new one of the same class for `num_channels` input channels (`adapt_channels`, with
        `config_fields` set), on the same device and dtype, in the same train/eval mode."""
        state_dict, config = adapt_channels(self.state_dict(), self.config, num_channels, **config_fields)
        logger.warning("adapting the pretrained weights: %s", channel_adaptation_rule(num_channels))
        config._attn_implementation = self.config._attn_implementation  # a runtime choice, not in the config's dict
        with torch.device(self.device):
            adapted = type(self)(config)
        adapted.load_state_dict(state_dict)
        return adapted.to(self.dtype).train(self.training)

    def save_pretrained(self, save_directory: str | Any, *args: Any, **kwargs: Any) -> None:
        """Also writes the code files, an `auto_map` for all four Auto classes and the image processor; for other than
        3 channels, the pipeline that takes such images (`MAEImageFeatureExtractionPipeline`)."""
        name_the_cpu_for_deepspeed()
        self.config.auto_map = dict(AUTO_MAP)
        if self.config.num_channels != RGB_CHANNELS:
            self.config.custom_pipelines = dict(CUSTOM_PIPELINES)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            build_image_processor(self.config).save_pretrained(save_directory)


class MAEModel(MAEPreTrainedModel):
    """The MAE ViT encoder (what `AutoModel` returns).

    Without `mask_ratio`/`noise` it encodes all patches and is deterministic: a feature extractor.
    It masks only when asked.

    `output_hidden_states` and `output_attentions` are recorded by transformers' output capturing
    (`_can_record_outputs`, `capture_outputs`): hooks on the encoder's layers, as transformers' own ViT does, the same
    API from transformers 5.17 on, remote code included. The decoder's layers are outside this model, so they are
    never recorded.
    """

    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^fc_norm\.", r"^classifier\."]
    _can_record_outputs: ClassVar[dict[str, Any]] = {
        "hidden_states": MAELayer, "attentions": OutputRecorder(MAEAttention, index=1)
    }

    def __init__(self, config: MAEConfig, add_final_layernorm: bool = True) -> None:
        super().__init__(config)
        self.embeddings = MAEEmbeddings(config)
        self.encoder = MAETransformer(
            config, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.drop_path_rate,
        )
        # Global-pool classifiers normalise the pooled features instead (`fc_norm`), as the paper does.
        self.layernorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if add_final_layernorm else nn.Identity()
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @capture_outputs(tie_last_hidden_states=False)  # hidden_states[-1] is the last layer's output, before the norm
    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> MAEModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): normalised images.
            noise (`torch.FloatTensor` of shape `(B, L)`, *optional*): masking noise; implies masking
                with `mask_ratio` (or `config.mask_ratio`).
            mask_ratio (`float`, *optional*): mask this fraction of patches.
            interpolate_pos_encoding (`bool`): accept a resolution other than `config.image_size`.
            output_hidden_states, output_attentions, return_dict (`bool`, *optional*, keyword only): as in every
                transformers model; default to the config's.
        """
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        ids_keep = mask = ids_restore = None
        if noise is not None or mask_ratio is not None:
            grid_height, grid_width = self.embeddings.patch_embeddings.grid_size(pixel_values, interpolate_pos_encoding)
            ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
            ids_keep, mask, ids_restore = masking_indices(
                pixel_values.shape[0], grid_height * grid_width, ratio, noise, pixel_values.device
            )
            mask = mask.to(pixel_values.dtype)
        # Masking comes first, so that only the kept patches are embedded: (B, 1 + L_vis, D), (B, 1 + L, D) unmasked.
        tokens = self.embeddings(pixel_values, interpolate_pos_encoding, ids_keep)
        sequence_output = self.layernorm(self.encoder(tokens))
        pooled = sequence_output[:, 1:].mean(dim=1) if self.config.use_mean_pooling else sequence_output[:, 0]
        return MAEModelOutput(
            last_hidden_state=sequence_output, pooler_output=pooled, mask=mask, ids_restore=ids_restore
        )


class MAEForPreTraining(MAEPreTrainedModel):
    """The paper's asymmetric encoder-decoder with the masked-patch reconstruction loss."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__(config)
        self.mae = MAEModel(config)
        self.decoder = MAEDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.mae.get_input_embeddings()

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B, L, p * q * C)`, each patch flattened row by row, channels last."""
        return patchify(pixel_values, self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """`(B, L, p * q * C)` -> `(B, C, H, W)`; `image_size` defaults to the config's."""
        height, width = image_size or self.config.image_size
        patch_height, patch_width = self.config.patch_size
        grid_height, grid_width = height // patch_height, width // patch_width
        batch_size, num_patches, _ = patches.shape
        if num_patches != grid_height * grid_width:
            raise ValueError(f"{num_patches} patches don't tile a {height}x{width} image; pass image_size")
        patches = patches.reshape(batch_size, grid_height, grid_width, patch_height, patch_width, -1)
        images = torch.einsum("nhwpqc->nchpwq", patches)  # (B, C, H/p, p, W/q, q)
        return images.reshape(batch_size, -1, height, width)

    def normalize_patches(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target patches `(B, K, p * q * C)` and their per-patch mean and std `(B, K, 1)`; the targets
        are normalised with them when `config.norm_pix_loss`."""
        if not self.config.norm_pix_loss:
            return patches, torch.zeros_like(patches[..., :1]), torch.ones_like(patches[..., :1])
        var, mean = torch.var_mean(patches, dim=-1, keepdim=True)  # unbiased variance, as the official code
        std = (var + NORM_PIX_EPS) ** 0.5
        return (patches - mean) / std, mean, std

    def normalize_targets(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`normalize_patches` of every patch of `(B, C, H, W)` images: `(B, L, p * q * C)`, `(B, L, 1)` twice."""
        return self.normalize_patches(self.patchify(pixel_values))

    def forward_loss(self, pixel_values: torch.Tensor, logits: torch.Tensor, patch_index: torch.Tensor) -> torch.Tensor:
        """Mean squared error between `logits` `(B, K, p * q * C)` and the (normalised) pixels of the
        patches `patch_index` `(B, K)` (see `loss_patch_index`). Only those patches are cut out and
        normalised, the visible ones never."""
        if patch_index.is_floating_point():  # the official forward_loss(imgs, pred, mask) took the float mask
            raise TypeError("forward_loss takes the loss's patch indices (see `loss_patch_index(mask, num_masked)`), "
                            "not the mask")
        target, _, _ = self.normalize_patches(gather_patches(pixel_values, self.config.patch_size, patch_index))
        return F.mse_loss(logits.float(), target.float())  # the mean over patches and pixels; a one-op backward

    def logits_to_pixels(self, logits: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Predictions `(B, L, p * q * C)` -> images `(B, C, H, W)` in the input's normalised space.

        With `norm_pix_loss` the model predicts per-patch normalised pixels; they are mapped back
        with each target patch's own mean and std, as the paper's visualisations do.
        """
        _, mean, std = self.normalize_targets(pixel_values)
        return self.unpatchify(logits * std + mean, tuple(pixel_values.shape[-2:]))

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        interpolate_pos_encoding: bool = False,
        logits_to_keep: str = "all",
        **kwargs: Any,
    ) -> MAEForPreTrainingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): normalised images.
            noise (`torch.FloatTensor` of shape `(B, L)`, *optional*): masking noise, for reproducible masks.
            mask_ratio (`float`, *optional*): overrides `config.mask_ratio` for this call.
            interpolate_pos_encoding (`bool`): accept a resolution other than `config.image_size`.
            logits_to_keep (`str`): `"all"` (default) predicts every patch; `"masked"` only the patches the
                loss is taken on (the removed ones; all when `mask_ratio=0`), in ascending patch order, so
                that `logits == full_logits[mask.bool()].view(B, -1, p * q * C)`: the decoder's last block,
                norm and head skip the visible patches. Same loss, for less work: what training uses.
            output_hidden_states, output_attentions, return_dict (`bool`, *optional*, keyword only): as in
                [`MAEModel`]; the hidden states and attentions are the encoder's.
        """
        if logits_to_keep not in ("all", "masked"):
            raise ValueError(f'logits_to_keep must be "all" or "masked", got {logits_to_keep!r}')
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        encoded = self.mae(
            pixel_values, noise=noise, mask_ratio=ratio, interpolate_pos_encoding=interpolate_pos_encoding,
            **{**kwargs, "return_dict": True},
        )
        patch_height, patch_width = self.config.patch_size
        grid = (pixel_values.shape[-2] // patch_height, pixel_values.shape[-1] // patch_width)
        latent = encoded.last_hidden_state  # (B, 1 + L_vis, D)
        patch_index = loss_patch_index(encoded.mask, num_masked=grid[0] * grid[1] + 1 - latent.shape[1])  # (B, K)
        if logits_to_keep == "masked":
            logits = self.decoder(latent, encoded.ids_restore, grid, patch_index)  # (B, K, p * q * C)
            loss_logits = logits
        else:
            logits = self.decoder(latent, encoded.ids_restore, grid)  # (B, L, p * q * C)
            loss_logits = gather_tokens(logits, patch_index)  # (B, K, p * q * C)
        loss = self.forward_loss(pixel_values.to(logits.dtype), loss_logits, patch_index)
        return MAEForPreTrainingOutput(
            loss=loss,
            logits=logits,
            mask=encoded.mask,
            ids_restore=encoded.ids_restore,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )


class MAEForImageClassification(MAEPreTrainedModel):
    """The encoder (no masking) with a linear head on the mean-pooled patch tokens + `fc_norm`
    (`config.use_mean_pooling`, the paper's fine-tuning) or on the normalised CLS token.

    The loss follows `config.problem_type`, as in every transformers classifier (see `classification_loss`).
    """

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: MAEConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mae = MAEModel(config, add_final_layernorm=not config.use_mean_pooling)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.use_mean_pooling else None
        self.classifier = (
            MAEClassifierHead(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.mae.get_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): normalised images.
            labels (`torch.Tensor`, *optional*): by `config.problem_type`, class indices `(B,)` or soft targets
                `(B, num_labels)` (MixUp/CutMix, label smoothing) for `"single_label_classification"`, multi-hot
                `(B, num_labels)` for `"multi_label_classification"`, values `(B, num_labels)` (or `(B,)` when
                `num_labels == 1`) for `"regression"`.
            output_hidden_states, output_attentions, return_dict (`bool`, *optional*, keyword only): as in
                [`MAEModel`].
        """
        encoded = self.mae(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **{**kwargs, "return_dict": True}
        )
        if self.fc_norm is not None:
            pooled = self.fc_norm(encoded.last_hidden_state[:, 1:].mean(dim=1))  # (B, D)
        else:
            pooled = encoded.last_hidden_state[:, 0]
        logits = self.classifier(pooled)  # (B, num_labels)
        loss = None if labels is None else classification_loss(logits, labels, self.config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """transformers' rule for an unset `config.problem_type`: one output is a regression, integer labels are
    single-label classes, anything else (float multi-hot labels) is multi-label."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: MAEConfig) -> torch.Tensor:
    """The loss of `config.problem_type`, set from the first labels when unset (transformers does the same, so that a
    saved model records it and pipelines pick softmax or sigmoid): MSE for `"regression"`, cross-entropy for
    `"single_label_classification"` (class indices, or soft targets `(B, num_labels)`: give MixUp/CutMix targets this
    problem type explicitly, float labels would otherwise be taken for multi-label), BCE-with-logits for
    `"multi_label_classification"`. Computed in float32."""
    if config.problem_type is None:
        config.problem_type = infer_problem_type(config.num_labels, labels)
    logits, labels = logits.float(), labels.to(logits.device)
    if config.problem_type == "regression":
        return F.mse_loss(logits, labels.float().reshape(logits.shape))  # (B,) labels for a single output too
    if config.problem_type == "single_label_classification":
        if labels.shape == logits.shape and labels.is_floating_point():  # soft targets
            return F.cross_entropy(logits, labels.float())
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    raise ValueError(f"config.problem_type must be one of {PROBLEM_TYPES}, got {config.problem_type!r}")


MAEConfig.register_for_auto_class()
MAEModel.register_for_auto_class("AutoModel")
MAEForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MAEForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "MAEModel",
    "MAEForPreTraining",
    "MAEForImageClassification",
    "MAEPreTrainedModel",
    "MAEModelOutput",
    "MAEForPreTrainingOutput",
    "adapt_channels",
    "build_image_processor",
    "gather_patches",
    "loss_patch_index",
    "masking_indices",
    "patchify",
    "random_masking",
    "sincos_position_table",
]
