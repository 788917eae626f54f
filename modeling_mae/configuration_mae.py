"""Configuration of the Masked Autoencoder (He et al., 2021, https://arxiv.org/abs/2111.06377).

This file and `modeling_mae.py` import only each other (and transformers/torch), so both can travel
with a checkpoint as Hub remote code.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

# The official code normalises RGB with the ImageNet statistics (not transformers' 0.5/0.5 defaults).
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
EIGHT_BIT_SCALE = 1 / 255

# The paper's models (ViT-B/16, L/16, H/14, all with the 512-wide, 8-block decoder) and small ones
# for CPUs. Every other field keeps the MAEConfig default. Defined once: scripts resolve
# `--model_config NAME` through `MAEConfig.from_preset`.
MAE_PRESETS: dict[str, dict[str, Any]] = {
    # For the embedded 32x32 sample: 8x8 patches of 4 px, a ViT-Ti-wide encoder of 6 blocks.
    "tiny-32px": dict(
        image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
        intermediate_size=768, decoder_hidden_size=128, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4, decoder_intermediate_size=512,
    ),
    "tiny": dict(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
        decoder_hidden_size=256, decoder_num_hidden_layers=4, decoder_num_attention_heads=8,
        decoder_intermediate_size=1024,
    ),
    "small": dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        decoder_hidden_size=256, decoder_num_hidden_layers=4, decoder_num_attention_heads=8,
        decoder_intermediate_size=1024,
    ),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "huge": dict(
        patch_size=14, hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120
    ),
}


def default_image_statistics(num_channels: int) -> tuple[list[float], list[float]]:
    """The mean and std pixels are normalised with when a config names none: ImageNet's for RGB (the official MAE's),
    0.5 and 0.5 per channel for any other count (no data set's statistics fit every band: compute your own)."""
    if num_channels == 3:
        return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    return [0.5] * num_channels, [0.5] * num_channels


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """`224` -> `(224, 224)`; JSON round-trips turn tuples into lists, so accept those too."""
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a (height, width) pair, got {value!r}")
    return (int(value[0]), int(value[1]))


class MAEConfig(PretrainedConfig):
    r"""Configuration of [`MAEModel`], [`MAEForPreTraining`] and [`MAEForImageClassification`].

    Field names follow transformers' `ViTMAEConfig` wherever the concept is the same; the defaults
    are the paper's ViT-B/16 with its 512-wide, 8-block decoder.

    Two differences from transformers' ViT configs, on purpose. This one is validated when it is built
    (`validate`): a `hidden_size` the heads do not divide raises here, naming the field (transformers
    5.24's `ViTConfig(hidden_size=30, num_attention_heads=4)` builds a model that silently projects to
    4 heads of 7), so a `--config_overrides` typo fails before any data is read. And
    `initializer_range` is only the std of the CLS and mask tokens: the weights get the official
    xavier init (see `MAEPreTrainedModel._init_weights`).

    Args:
        image_size (`int` or `(int, int)`): input resolution (height, width).
        patch_size (`int` or `(int, int)`): patch resolution; must divide `image_size`.
        num_channels (`int`): input channels.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: encoder shape.
        decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads,
        decoder_intermediate_size: decoder shape (pretraining only).
        hidden_act (`str`): MLP activation, a name of transformers' `ACT2FN`.
        hidden_dropout_prob, attention_probs_dropout_prob (`float`): dropout (0 in the paper).
        drop_path_rate (`float`): stochastic depth of the encoder, increasing linearly with depth
            (fine-tuning: 0.1 ViT-B, 0.2 ViT-L, 0.3 ViT-H).
        initializer_range (`float`): std of the CLS/mask tokens (not of the weights: those are xavier).
        layer_norm_eps (`float`): LayerNorm epsilon, > 0 (the official models use 1e-6).
        qkv_bias (`bool`): bias of the fused query/key/value projection.
        mask_ratio (`float`): fraction of patches removed during pretraining, in [0, 1).
        norm_pix_loss (`bool`): regress per-patch normalised pixels (the paper's better target).
        use_mean_pooling (`bool`): classify from the mean of the patch tokens + `fc_norm` (the
            paper's fine-tuning) instead of the CLS token.
        image_mean, image_std (`list[float]`, one per channel): the statistics pixels are normalised with,
            `(pixel * rescale_factor - mean) / std`; None gives `default_image_statistics(num_channels)`
            (ImageNet's for RGB). Stored resolved; every std must be > 0.
        rescale_factor (`float`): what raw pixel values are multiplied by before normalising: the data's own
            scale (1/255 for 8-bit data, 1/65535 for 16-bit, 1.0 for float arrays already in [0, 1]).
    """

    model_type = "mae"

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        decoder_hidden_size: int = 512,
        decoder_num_hidden_layers: int = 8,
        decoder_num_attention_heads: int = 16,
        decoder_intermediate_size: int = 2048,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        use_mean_pooling: bool = True,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        rescale_factor: float = EIGHT_BIT_SCALE,
        **kwargs: Any,
    ) -> None:
        self.image_size = _pair(image_size)
        self.patch_size = _pair(patch_size)
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_intermediate_size = decoder_intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.use_mean_pooling = use_mean_pooling
        default_mean, default_std = default_image_statistics(num_channels)
        self.image_mean = default_mean if image_mean is None else [float(value) for value in image_mean]
        self.image_std = default_std if image_std is None else [float(value) for value in image_std]
        self.rescale_factor = rescale_factor
        super().__init__(**kwargs)
        self.validate()

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along (height, width)."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def validate(self) -> None:
        """Raise a `ValueError` naming the first field whose value cannot build a model."""
        for name in ("num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "decoder_hidden_size", "decoder_num_hidden_layers",
                     "decoder_num_attention_heads", "decoder_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if min(self.patch_size) < 1 or any(i % p for i, p in zip(self.image_size, self.patch_size)):
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        for width, heads in (("hidden_size", "num_attention_heads"),
                             ("decoder_hidden_size", "decoder_num_attention_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{heads}={getattr(self, heads)} must divide {width}={getattr(self, width)}")
        # The 2D sin-cos table splits each width into 4 equal blocks (sin/cos of rows and columns).
        for width in ("hidden_size", "decoder_hidden_size"):
            if getattr(self, width) % 4:
                raise ValueError(f"{width} must be divisible by 4 for the 2D sin-cos position table")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        for name in ("drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        # A LayerNorm of a constant token divides by sqrt(eps): eps <= 0 makes NaN (inf/NaN never compare true).
        if not 0.0 < self.layer_norm_eps < math.inf:
            raise ValueError(f"layer_norm_eps must be a positive number, got {self.layer_norm_eps}")
        if self.hidden_act not in ACT2FN:
            known = ", ".join(ACT2FN)
            raise ValueError(f"hidden_act {self.hidden_act!r} is no activation of transformers; one of {known}")
        self.validate_image_statistics()

    def validate_image_statistics(self) -> None:
        """Raise a `ValueError` naming the first statistic that cannot normalise `num_channels` channels."""
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != self.num_channels:
                raise ValueError(f"{name} has {len(values)} values ({values}) for num_channels={self.num_channels}: "
                                 "give one per channel")
        for channel, (mean, std) in enumerate(zip(self.image_mean, self.image_std)):
            if not math.isfinite(mean):
                raise ValueError(f"image_mean of channel {channel} is {mean}: every mean must be a finite number")
            if not 0.0 < std < math.inf:  # a zero std divides by zero: every normalised pixel inf or NaN
                raise ValueError(f"image_std of channel {channel} is {std}: every std must be a positive number")
        if not 0.0 < self.rescale_factor < math.inf:
            raise ValueError(f"rescale_factor must be a positive number, got {self.rescale_factor}")

    def num_parameters(self) -> int:
        """The parameters of `MAEForPreTraining` built from this config (encoder and decoder), counted from the sizes
        alone: how big a model is, before building it allocates that much."""
        channels, (patch_height, patch_width) = self.num_channels, self.patch_size
        pixels = patch_height * patch_width * channels
        tokens = self.num_patches + 1  # the CLS token's position too

        def blocks(width: int, depth: int, intermediate: int) -> int:
            qkv = 3 * width * width + (3 * width if self.qkv_bias else 0)
            mlp = 2 * width * intermediate + intermediate + width
            return depth * (4 * width + qkv + width * width + width + mlp)  # 4 * width: the two LayerNorms

        width, decoder_width = self.hidden_size, self.decoder_hidden_size
        encoder = (pixels * width + width + width + tokens * width  # patch projection, CLS token, positions
                   + blocks(width, self.num_hidden_layers, self.intermediate_size) + 2 * width)
        decoder = (width * decoder_width + decoder_width + decoder_width + tokens * decoder_width  # embed, mask token
                   + blocks(decoder_width, self.decoder_num_hidden_layers, self.decoder_intermediate_size)
                   + 2 * decoder_width + decoder_width * pixels + pixels)  # norm, pixel head
        return encoder + decoder

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MAEConfig:
        """One of `MAE_PRESETS` (e.g. `"base"` for the paper's ViT-B/16), with fields overridden."""
        if name not in MAE_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; available: {', '.join(MAE_PRESETS)}")
        return cls(**{**MAE_PRESETS[name], **overrides})


def parse_overrides(overrides: str | dict[str, Any] | None) -> dict[str, Any]:
    """`"mask_ratio=0.6,norm_pix_loss=true,image_size=[64,48]"` -> typed dict (JSON values, else strings)."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in re.split(r",(?![^\[]*\])", overrides):  # commas inside [...] belong to a list value
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config override {item!r} is not of the form key=value")
        try:
            parsed[key.strip()] = json.loads(raw.strip().replace("True", "true").replace("False", "false"))
        except json.JSONDecodeError:
            parsed[key.strip()] = raw.strip()
    return parsed


_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".pth", ".pt", ".bin", ".safetensors")


def missing_local_path_message(name: str) -> str | None:
    """`"folder does not exist: /abs/path"` (or "file", for a file name) when `name` looks like a local path
    that does not exist, None otherwise (it exists, or may be a Hub id).

    Looks local: starts with ./ ../ / or ~, has more than one "/", its parent folder exists, or it names a
    .json/.yaml file (or a checkpoint file: .pth, .pt, .bin, .safetensors). A Hub id (`user/name`) has one "/" and
    no such parent; sending a typo'd local path to the Hub would only end in a long "not found" or "couldn't connect"
    error.
    """
    path = pathlib.Path(name).expanduser()
    if path.exists():
        return None
    is_file = path.suffix.lower() in _FILE_SUFFIXES
    looks_local = (name.startswith(("./", "../", "/", "~")) or name.count("/") > 1
                   or ("/" in name and path.parent.exists()) or is_file)
    return f"{'file' if is_file else 'folder'} does not exist: {path.absolute()}" if looks_local else None


def config_source_problem(name_or_path: str) -> str | None:
    """Why `load_config(name_or_path)` cannot work, found without asking the Hub: a missing local path, or a bare name
    that is no preset. None when it may work."""
    if name_or_path in MAE_PRESETS or os.path.exists(os.path.expanduser(name_or_path)):
        return None
    missing = missing_local_path_message(name_or_path)
    if missing is None and "/" not in name_or_path:
        return f"no such preset ({', '.join(MAE_PRESETS)}), config.json file or folder"
    return missing


class ForeignConfigError(ValueError):
    """A config of another model type than ours (`model_type` "vit", "vit_mae", ...): its weights need converting."""


def load_config(name_or_path: str, overrides: str | dict[str, Any] | None = None, **kwargs: Any) -> MAEConfig:
    """A preset name (`MAE_PRESETS`), a `config.json` path, a folder or Hub id holding one,
    with `overrides` applied. Unknown override keys raise, so a typo never passes silently.

    Raises FileNotFoundError for a local path that does not exist (see `missing_local_path_message`), ValueError for a
    bare name that is no preset, ForeignConfigError for the config of another model type (a transformers ViT).
    """
    problem = config_source_problem(name_or_path)
    if problem is not None:
        missing = missing_local_path_message(name_or_path) is not None
        raise (FileNotFoundError if missing else ValueError)(f"model config {name_or_path!r}: {problem}")
    path = os.path.expanduser(name_or_path)
    if name_or_path in MAE_PRESETS:
        config = MAEConfig.from_preset(name_or_path)
    else:  # a config.json, or a folder or Hub id holding one
        config_dict = MAEConfig._dict_from_json_file(path) if os.path.isfile(path) else \
            MAEConfig.get_config_dict(path, **kwargs)[0]
        # transformers only warns, then builds our model from another's config: a ViT's would give random weights.
        model_type = config_dict.get("model_type", MAEConfig.model_type)
        if model_type != MAEConfig.model_type:
            raise ForeignConfigError(f"{name_or_path} holds a {model_type!r} model, not an MAE one (model_type "
                                     f"{MAEConfig.model_type!r})")
        config = MAEConfig.from_dict(config_dict)
    values = parse_overrides(overrides)
    unknown = sorted(set(values) - set(config.to_dict()))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(MAEConfig().to_dict())}")
    return MAEConfig.from_dict(with_statistics_following_channels({**config.to_dict(), **values}, config, values))


def with_statistics_following_channels(
    fields: dict[str, Any], config: MAEConfig, overrides: dict[str, Any]
) -> dict[str, Any]:
    """`fields` (config's, with `overrides` applied) where a changed `num_channels` takes the new count's default
    statistics in place of the old count's defaults: `num_channels=1` on an RGB preset must not keep ImageNet's three
    means. Statistics the overrides give, or the data set's own, are kept (and refused by validation when their
    length does not fit)."""
    if fields.get("num_channels", config.num_channels) == config.num_channels:
        return fields
    old_defaults = dict(zip(("image_mean", "image_std"), default_image_statistics(config.num_channels)))
    return {**fields, **{name: None for name, default in old_defaults.items()
                         if name not in overrides and fields.get(name) == default}}
