"""Weights in and out of this project's models.

In: official facebookresearch/mae checkpoints, timm ViTs (the same layout: the official models are timm's blocks;
a state dict file, a `save_for_hf` folder or a Hub id such as `timm/vit_base_patch16_224.mae`) and transformers'
ViTMAE (v4 and v5 key names), into `MAEForPreTraining`, `MAEModel` or `MAEForImageClassification`.
Out: our encoder or classifier as transformers' `ViTModel`/`ViTForImageClassification` (`to_transformers_vit`) or as
timm's `VisionTransformer` (`export_to_timm`).

Every mapping is a list of (regex, replacement) renames applied to each key, plus the one real
change of layout: transformers keeps query/key/value apart where we (and the official code) fuse
them into one `qkv` matrix.

RGB weights convert to another channel count (`convert_checkpoint(..., num_channels=C)`) by the model's own
`adapted_to_channels`, the rules of timm's `adapt_input_conv`: what `from_pretrained(..., num_channels=C)` does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from ..configuration_mae import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    MAEConfig,
    parse_overrides,
)
from ..data.transforms import EVAL_CROP_FRACTION
from ..errors import UsageError, describe
from ..modeling_mae import (
    PATCH_KERNELS_SUFFIX,
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    MAEPreTrainedModel,
    build_image_processor,
    name_the_cpu_for_deepspeed,
)
from .hub import with_default_mode, with_default_modes
from .model_card import (
    FEATURE_EXTRACTION,
    IMAGE_CLASSIFICATION,
    USAGE_PLACEHOLDER,
    render_model_card,
    write_model_card,
)

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
Renames = list[tuple[str, str]]

# The encoder's and the classifier's names, (official and timm, ours); "{}" is a block's index. The official blocks
# are timm's (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2): only `attn` is `attention` here.
ENCODER_NAMES = [
    ("cls_token", "mae.embeddings.cls_token"),
    ("pos_embed", "mae.embeddings.position_embeddings"),
    ("patch_embed.proj.", "mae.embeddings.patch_embeddings.projection."),
    ("blocks.{}.", "mae.encoder.layers.{}."),
    ("norm.", "mae.layernorm."),
    ("fc_norm.", "fc_norm."),  # fine-tuned checkpoints (global pooling)
    ("head.", "classifier."),
]


def prefix_renames(pairs: Iterable[tuple[str, str]]) -> Renames:
    """(old, new) key prefixes as renames: anchored at the key's start, "{}" matching and keeping a block index."""
    return [("^" + re.escape(old).replace(r"\{\}", r"(\d+)"), new.replace("{}", r"\1")) for old, new in pairs]


OFFICIAL_RENAMES: Renames = [
    *prefix_renames(ENCODER_NAMES),
    (r"^mask_token$", "decoder.mask_token"),
    (r"^decoder_pos_embed$", "decoder.position_embeddings"),
    (r"^decoder_embed\.", "decoder.decoder_embed."),
    (r"^decoder_blocks\.(\d+)\.", r"decoder.transformer.layers.\1."),
    (r"^decoder_norm\.", "decoder.norm."),
    (r"^decoder_pred\.", "decoder.pred."),
    (r"\.attn\.", ".attention."),
]

# Ours -> the official (and timm) layout, for the encoder and a classifier's fc_norm and head.
TO_OFFICIAL_RENAMES: Renames = [
    *prefix_renames((ours, official) for official, ours in ENCODER_NAMES),
    (r"\.attention\.", ".attn."),
]

# transformers v4 names -> v5 names (what transformers' own conversion mapping does at load time).
TRANSFORMERS_V4_TO_V5: Renames = [
    # "vit.encoder.layer.N." -> "vit.layers.N."; transformers 5 also saves its decoder layers as
    # "decoder.decoder_encoder.layer.N." (the inverse of its own renaming), so no leading dot here.
    (r"encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]

TRANSFORMERS_V5_RENAMES: Renames = [
    (r"^vit\.", "mae."),
    (r"^mae\.layers\.(\d+)\.", r"mae.encoder.layers.\1."),
    (r"^decoder\.decoder_layers\.(\d+)\.", r"decoder.transformer.layers.\1."),
    (r"^decoder\.decoder_pos_embed$", "decoder.position_embeddings"),
    (r"^decoder\.decoder_norm\.", "decoder.norm."),
    (r"^decoder\.decoder_pred\.", "decoder.pred."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.o_proj\.", ".attention.proj."),
]


def rename_keys(state_dict: StateDict, renames: Renames) -> StateDict:
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    return renamed


def fuse_qkv(state_dict: StateDict) -> StateDict:
    """`...attention.{q,k,v}_proj.{weight,bias}` -> one `...attention.qkv.{weight,bias}` (rows q|k|v)."""
    fused = {}
    for key, tensor in state_dict.items():
        match = re.match(r"(.*\.attention\.)q_proj\.(weight|bias)$", key)
        if match:
            prefix, kind = match.groups()
            parts = [state_dict[f"{prefix}{name}_proj.{kind}"] for name in "qkv"]
            fused[f"{prefix}qkv.{kind}"] = torch.cat(parts, dim=0)
        elif not re.match(r".*\.attention\.[kv]_proj\.", key):
            fused[key] = tensor
    return fused


def split_qkv(state_dict: StateDict) -> StateDict:
    """The inverse of `fuse_qkv`."""
    split = {}
    for key, tensor in state_dict.items():
        match = re.match(r"(.*\.attention\.)qkv\.(weight|bias)$", key)
        if match:
            prefix, kind = match.groups()
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                split[f"{prefix}{name}_proj.{kind}"] = part
        else:
            split[key] = tensor
    return split


def detect_format(state_dict: StateDict) -> str:
    """`"official"` (timm-style `blocks.N.attn.qkv`) or `"transformers"` (`vit.` prefix)."""
    if "cls_token" in state_dict or any(key.startswith("blocks.") for key in state_dict):
        return "official"
    if any(key.startswith("vit.") for key in state_dict):
        return "transformers"
    raise UsageError(
        "unrecognised checkpoint: expected the official MAE / timm ViT layout (cls_token, blocks.N...) or a "
        f"transformers ViTMAE one (vit....); first keys: {sorted(state_dict)[:5]}"
    )


def convert_official_state_dict(state_dict: StateDict) -> StateDict:
    return rename_keys(state_dict, OFFICIAL_RENAMES)


def convert_transformers_state_dict(state_dict: StateDict) -> StateDict:
    """transformers' ViTMAE (v4 or v5 key names) -> ours."""
    return fuse_qkv(rename_keys(state_dict, TRANSFORMERS_V4_TO_V5 + TRANSFORMERS_V5_RENAMES))


def _count_blocks(keys: Iterable[str], pattern: str) -> int:
    indices = {int(m.group(1)) for key in keys if (m := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


OFFICIAL_REQUIRED_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")


def mae_config_from_official(state_dict: StateDict, **overrides: Any) -> MAEConfig:
    """Shapes tell everything but the head counts: the paper uses 64-wide heads in the encoder
    (ViT-H: 80) and 16 heads in the decoder; pass overrides for anything else. The image size is
    read off the position table when its grid is square; pass `image_size` otherwise."""
    missing = [key for key in OFFICIAL_REQUIRED_KEYS if key not in state_dict]
    if missing:
        raise UsageError(f"checkpoint has no {missing}: only ViTs with a class token and a position table convert")
    hidden_size = state_dict["cls_token"].shape[-1]
    patch_height, patch_width = state_dict["patch_embed.proj.weight"].shape[-2:]
    values: dict[str, Any] = {
        "patch_size": (patch_height, patch_width),
        "num_channels": state_dict["patch_embed.proj.weight"].shape[1],
        "hidden_size": hidden_size,
        "num_hidden_layers": _count_blocks(state_dict, r"blocks\.(\d+)\."),
        "num_attention_heads": 16 if hidden_size == 1280 else max(1, hidden_size // 64),
        "intermediate_size": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
    }
    if "image_size" not in overrides:
        num_patches = state_dict["pos_embed"].shape[1] - 1
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise UsageError(f"the position table has {num_patches} patches, not a square grid: pass "
                             '--config_overrides "image_size=[height,width]"')
        values["image_size"] = (grid * patch_height, grid * patch_width)
    if "decoder_embed.weight" in state_dict:
        values.update(
            decoder_hidden_size=state_dict["decoder_embed.weight"].shape[0],
            decoder_num_hidden_layers=_count_blocks(state_dict, r"decoder_blocks\.(\d+)\."),
            decoder_num_attention_heads=16,
            decoder_intermediate_size=state_dict["decoder_blocks.0.mlp.fc1.weight"].shape[0],
        )
    if "head.weight" in state_dict:
        values["num_labels"] = state_dict["head.weight"].shape[0]
    values["use_mean_pooling"] = "fc_norm.weight" in state_dict or "norm.weight" not in state_dict
    return MAEConfig(**{**values, **overrides})


def mae_config_from_timm(state_dict: StateDict, timm_config: dict[str, Any], **overrides: Any) -> MAEConfig:
    """As `mae_config_from_official`, with what timm's `config.json` says: the input size
    (`pretrained_cfg.input_size`), the pooling (`global_pool`) and, when timm's factory recorded it, the head count
    (`model_args.num_heads`)."""
    model_args = timm_config.get("model_args", {})
    pretrained_cfg = timm_config.get("pretrained_cfg", {})
    values: dict[str, Any] = {}
    if pretrained_cfg.get("input_size"):
        values["image_size"] = tuple(pretrained_cfg["input_size"][1:])  # (C, H, W)
    if "num_heads" in model_args:
        values["num_attention_heads"] = model_args["num_heads"]
    global_pool = model_args.get("global_pool", timm_config.get("global_pool"))
    if global_pool in ("avg", "token"):
        values["use_mean_pooling"] = global_pool == "avg"
    # The statistics the weights were trained with (timm's defaults are ImageNet's too): the config carries them into
    # the converted model's preprocessor_config.json.
    values["image_mean"] = list(pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN))
    values["image_std"] = list(pretrained_cfg.get("std", IMAGENET_DEFAULT_STD))
    return mae_config_from_official(state_dict, **{**values, **overrides})


def mae_config_from_transformers(config: dict[str, Any], **overrides: Any) -> MAEConfig:
    """A transformers `ViTMAEConfig` or `ViTConfig` dict -> `MAEConfig` (the field names are the same)."""
    fields = set(MAEConfig().to_dict()) - {"model_type", "transformers_version", "architectures", "auto_map"}
    values = {key: value for key, value in config.items() if key in fields}
    if config.get("model_type") == "vit":  # transformers' ViT classifies its CLS token, after the final LayerNorm
        values["use_mean_pooling"] = False
    return MAEConfig(**{**values, **overrides})


def with_vit_prefix(state_dict: StateDict) -> StateDict:
    """A transformers base model (`ViTModel`, `ViTMAEModel`) saves its keys without the `vit.` of the models with a
    head. A `ViTModel`'s pooler (dense + tanh on the CLS token) has no MAE counterpart: it is left out."""
    if any(key.startswith("vit.") for key in state_dict):
        return state_dict
    pooler = sorted(key for key in state_dict if key.startswith("pooler."))
    if pooler:
        logger.warning("Leaving out the ViTModel pooler (%s): MAE models have none", ", ".join(pooler))
    return {f"vit.{key}": tensor for key, tensor in state_dict.items() if key not in pooler}


def unreadable_weights_error(file: str | os.PathLike[str], error: Exception) -> UsageError:
    """One line for a weights file that does not load: a pickle holding more than tensors (torch's weights-only
    loader refuses it, so nothing of it runs), or a damaged safetensors file."""
    if isinstance(error, pickle.UnpicklingError):
        refused = re.search(r"GLOBAL (\S+)", str(error))
        what = f"pickled code ({refused.group(1)})" if refused else "pickled objects other than tensors"
        return UsageError(
            f"{file} holds {what}, which is never run here: nothing was loaded. Only if you trust where it comes "
            "from, load it with torch.load(..., weights_only=False) and save the model again with save_pretrained "
            "(safetensors)"
        )
    return UsageError(f"{file} cannot be read as weights ({describe(error)}): save or download the model again")


def _read_weights(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise unreadable_weights_error(path, error) from error
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise unreadable_weights_error(path, error) from error
    # The official files wrap the weights: {"model": state_dict, ...}.
    return checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint


def _resolve_source(source: str) -> Path:
    """A local file or folder as is; anything else is a Hub id, downloaded (weights + config only)."""
    if os.path.exists(source):
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.bin"]))


def load_checkpoint(source: str, overrides: str | dict[str, Any] | None = None) -> tuple[MAEConfig, StateDict]:
    """Any supported checkpoint -> (our config, our state dict)."""
    path = _resolve_source(source)
    values = parse_overrides(overrides)
    if path.is_file():  # an official .pth, or a timm state dict (.pth, .safetensors)
        state_dict = _read_weights(path)
        if detect_format(state_dict) != "official":
            raise UsageError(f"{path} is a single file but not in the official MAE / timm ViT layout")
        return mae_config_from_official(state_dict, **values), convert_official_state_dict(state_dict)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weights or not (path / "config.json").exists():
        raise UsageError(f"{path} holds no config.json + weights (*.safetensors or *.bin)")
    state_dict = {key: tensor for file in weights for key, tensor in _read_weights(file).items()}
    config = json.loads((path / "config.json").read_text())
    if "architecture" in config:  # timm's folder layout (`save_for_hf`, the Hub's timm/...): official key names
        return mae_config_from_timm(state_dict, config, **values), convert_official_state_dict(state_dict)
    return mae_config_from_transformers(config, **values), convert_transformers_state_dict(with_vit_prefix(state_dict))


def build_converted_model(config: MAEConfig, state_dict: StateDict) -> MAEPreTrainedModel:
    """A pretraining model when the decoder is there, else the encoder (`mae_pretrain_vit_*`)."""
    kernels = next(tensor for key, tensor in state_dict.items() if key.endswith(PATCH_KERNELS_SUFFIX))
    if kernels.shape[1] != config.num_channels:
        raise UsageError(f"the checkpoint has {kernels.shape[1]} input channels, the config {config.num_channels}: "
                         f"pass --num_channels {config.num_channels} to adapt RGB weights to them")
    has_decoder = any(key.startswith("decoder.") for key in state_dict)
    has_head = "classifier.weight" in state_dict
    model_class = MAEForPreTraining if has_decoder else MAEForImageClassification if has_head else MAEModel
    model = model_class(config)
    if model_class is MAEModel:
        state_dict = {key.removeprefix("mae."): tensor for key, tensor in state_dict.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [key for key in missing if "position_embeddings" not in key]:
        raise UsageError(f"checkpoint does not fit {model_class.__name__}: missing {missing}, unexpected {unexpected}")
    return model.eval()


# With `num_channels`, the statistics the overrides give are those of the adapted channels, set after adapting.
ADAPTED_CHANNEL_FIELDS = ("image_mean", "image_std", "rescale_factor")


def convert_checkpoint(
    source: str,
    output_dir: str | None = None,
    overrides: str | dict[str, Any] | None = None,
    num_channels: int | None = None,
) -> MAEPreTrainedModel:
    """Convert `source` (official .pth, transformers folder or Hub id) and optionally save it. `num_channels` other
    than the checkpoint's adapts RGB weights to that many input channels (`MAEPreTrainedModel.adapted_to_channels`,
    which logs the rule); the adapted channels' statistics are the RGB ones by the same rule unless `overrides` give
    `image_mean`/`image_std`."""
    values = parse_overrides(overrides)
    adapted_fields = {name: values.pop(name) for name in ADAPTED_CHANNEL_FIELDS if num_channels and name in values}
    model = build_converted_model(*load_checkpoint(source, values))
    if num_channels is not None and num_channels != model.config.num_channels:
        try:
            model = model.adapted_to_channels(num_channels, **adapted_fields)
        except ValueError as error:  # not RGB weights, or statistics that do not fit the channels
            raise UsageError(f"--num_channels {num_channels}: {error}") from error
    if output_dir:
        model.save_pretrained(output_dir)
        with_default_modes(output_dir)
    return model


def encoder_and_head_state_dict(model: MAEPreTrainedModel) -> StateDict:
    """The encoder's weights (`mae.` keys, as in our full models) and a classifier's `fc_norm` and `classifier`."""
    encoder = model if isinstance(model, MAEModel) else model.mae
    state_dict = {f"mae.{key}": tensor for key, tensor in encoder.state_dict().items()}
    if isinstance(model, MAEForImageClassification):
        head = ("fc_norm.", "classifier.")
        state_dict.update({key: tensor for key, tensor in model.state_dict().items() if key.startswith(head)})
    return state_dict


def _square_or_pair(size: tuple[int, int]) -> int | list[int]:
    return size[0] if size[0] == size[1] else list(size)


def export_to_vit(model: MAEPreTrainedModel) -> tuple[ViTConfig, StateDict]:
    """Our encoder (and a CLS-token classifier's head) in transformers' `ViTModel` /
    `ViTForImageClassification` layout and config. A mean-pooling head has no ViT equivalent."""
    if isinstance(model, MAEForImageClassification) and model.config.use_mean_pooling:
        raise UsageError("transformers' ViT classifies from the CLS token; use_mean_pooling=True has no ViT equivalent "
                         "(export it with --to_timm)")
    config = model.config
    inverse = [
        (r"^mae\.encoder\.layers\.(\d+)\.", r"vit.layers.\1."),
        (r"^mae\.", "vit."),
        (r"\.norm1\.", ".layernorm_before."),
        (r"\.norm2\.", ".layernorm_after."),
        (r"\.attention\.proj\.", ".attention.o_proj."),
    ]
    vit_config = ViTConfig(  # ints when square: ViT's `interpolate_pos_encoding` divides by patch_size
        image_size=_square_or_pair(config.image_size),
        patch_size=_square_or_pair(config.patch_size),
        num_channels=config.num_channels,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        qkv_bias=config.qkv_bias,
        id2label=config.id2label,
        label2id=config.label2id,
    )
    return vit_config, split_qkv(rename_keys(encoder_and_head_state_dict(model), inverse))


def to_transformers_vit(model: MAEPreTrainedModel) -> ViTModel | ViTForImageClassification:
    """Our encoder as a transformers `ViTModel` (or a CLS-token classifier as `ViTForImageClassification`)."""
    vit_config, state_dict = export_to_vit(model)
    if isinstance(model, MAEForImageClassification):
        vit: ViTModel | ViTForImageClassification = ViTForImageClassification(vit_config)
    else:
        vit = ViTModel(vit_config, add_pooling_layer=False)
        state_dict = {key.removeprefix("vit."): tensor for key, tensor in state_dict.items()}
    vit.load_state_dict(state_dict, strict=True)
    return vit.eval()


VIT_POOLER_NOTE = (
    "ViTModel.from_pretrained (and AutoModel) add a pooler (dense + tanh) that is not in these weights: it is "
    "randomly initialised, so pooler_output is noise. Use last_hidden_state (CLS token or mean of the patch tokens), "
    "or load with ViTModel.from_pretrained(folder, add_pooling_layer=False)."
)


def save_vit_folder(
    model: MAEPreTrainedModel, output_dir: str | os.PathLike[str]
) -> ViTModel | ViTForImageClassification:
    """`to_transformers_vit(model)` saved with our preprocessing (`preprocessor_config.json`, so that
    `AutoImageProcessor` works on the folder) and a model card that says what a bare `ViTModel` gets wrong."""
    vit = to_transformers_vit(model)
    name_the_cpu_for_deepspeed()  # transformers' ViT saves like ours, without our save_pretrained
    vit.save_pretrained(output_dir)
    with_default_modes(output_dir)
    build_image_processor(model.config).save_pretrained(output_dir)
    is_encoder = isinstance(vit, ViTModel)
    load = "ViTModel.from_pretrained(folder, add_pooling_layer=False)" if is_encoder else \
        "ViTForImageClassification.from_pretrained(folder)"
    usage = (f"from transformers import AutoImageProcessor, {load.split('.')[0]}\n\n"
             f'folder = "{USAGE_PLACEHOLDER}"  # this folder, or its Hub repository once pushed\n'
             f"processor = AutoImageProcessor.from_pretrained(folder)\nmodel = {load}")
    description = "An MAE (He et al., 2021) ViT in transformers' own ViT layout: no custom code needed."
    if is_encoder:
        description += f"\n\n**Note.** {VIT_POOLER_NOTE}"
    card = render_model_card(f"MAE {type(vit).__name__}", description, {}, tags=["vit", "mae"], usage=usage,
                             pipeline_tag=FEATURE_EXTRACTION if is_encoder else IMAGE_CLASSIFICATION)
    write_model_card(output_dir, card)
    return vit


# timm ViT architectures by (width, depth, heads, patch): a config that matches one exports under its name, with the
# fewest create_model arguments; any other under the base one, its shape given as arguments.
TIMM_ARCHITECTURES = {
    "vit_tiny_patch16_224": {"embed_dim": 192, "depth": 12, "num_heads": 3, "patch_size": 16},
    "vit_small_patch16_224": {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16},
    "vit_base_patch16_224": {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16},
    "vit_large_patch16_224": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 16},
    "vit_huge_patch14_224": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "patch_size": 14},
}
TIMM_FALLBACK_ARCHITECTURE = "vit_base_patch16_224"
TIMM_VIT_DEFAULTS = {"img_size": 224, "in_chans": 3, "mlp_ratio": 4.0, "qkv_bias": True}


@dataclass
class TimmSpec:
    """How timm builds our model: `timm.create_model(architecture, **model_args)`, and the weights' preprocessing and
    classes (`pretrained_cfg`)."""

    architecture: str
    model_args: dict[str, Any]
    pretrained_cfg: dict[str, Any]

    def create_model_call(self, weights_file: str | os.PathLike[str]) -> str:
        """The exact `timm.create_model` call that loads `weights_file` (any timm version with
        `pretrained_cfg_overlay`)."""
        overlay = {"file": str(weights_file), **self.pretrained_cfg}
        overlay.pop("label_names", None)  # in config.json; too long for a command line
        arguments = [repr(self.architecture), "pretrained=True", f"pretrained_cfg_overlay=dict({_kwargs(overlay)})"]
        return f"timm.create_model({', '.join(arguments)}, {_kwargs(self.model_args)})"


def _kwargs(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in values.items())


def timm_spec(model: MAEPreTrainedModel) -> TimmSpec:
    """The timm `VisionTransformer` equal to our encoder or classifier. timm's blocks are the official ones; it has
    no other activation or LayerNorm epsilon than the official GELU and 1e-6."""
    config = model.config
    if config.hidden_act != "gelu" or config.layer_norm_eps != 1e-6:
        raise UsageError(f"timm's ViT has GELU and LayerNorm eps 1e-6, not {config.hidden_act} and "
                         f"{config.layer_norm_eps}")
    mlp_ratio = config.intermediate_size / config.hidden_size
    if int(config.hidden_size * mlp_ratio) != config.intermediate_size:
        raise UsageError(f"timm cannot express intermediate_size={config.intermediate_size} as a ratio of the width")
    shape = {"embed_dim": config.hidden_size, "depth": config.num_hidden_layers,
             "num_heads": config.num_attention_heads, "patch_size": _square_or_pair(config.patch_size)}
    architecture = next((name for name, defaults in TIMM_ARCHITECTURES.items() if defaults == shape),
                        TIMM_FALLBACK_ARCHITECTURE)
    defaults = {**TIMM_VIT_DEFAULTS, **TIMM_ARCHITECTURES[architecture]}
    wanted = {**shape, "img_size": _square_or_pair(config.image_size), "in_chans": config.num_channels,
              "mlp_ratio": mlp_ratio, "qkv_bias": config.qkv_bias}
    model_args = {key: value for key, value in wanted.items() if value != defaults[key]}
    is_classifier = isinstance(model, MAEForImageClassification)
    num_classes = config.num_labels if is_classifier else 0
    model_args.update(num_classes=num_classes, global_pool="avg" if config.use_mean_pooling else "token")
    if config.use_mean_pooling and not is_classifier:
        model_args["fc_norm"] = False  # our encoder normalises every token, then pools: timm's `norm`, not `fc_norm`
    pretrained_cfg: dict[str, Any] = {
        "num_classes": num_classes, "input_size": [config.num_channels, *config.image_size],
        "mean": tuple(config.image_mean), "std": tuple(config.image_std), "interpolation": "bicubic",
        "crop_pct": EVAL_CROP_FRACTION,
    }
    if is_classifier:
        pretrained_cfg["label_names"] = [config.id2label[index] for index in range(num_classes)]
    return TimmSpec(architecture, model_args, pretrained_cfg)


def export_to_timm(model: MAEPreTrainedModel, output_dir: str | os.PathLike[str]) -> TimmSpec:
    """Our encoder (or classifier, with its global-pool `fc_norm` and head) as a timm folder: the weights in the
    official layout (`model.safetensors`), timm's `config.json` (so that `timm.create_model("local-dir:<folder>",
    pretrained=True)` needs no arguments) and a model card with the explicit `create_model` call."""
    spec = timm_spec(model)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = rename_keys(encoder_and_head_state_dict(model), TO_OFFICIAL_RENAMES)
    save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, folder / "model.safetensors")
    with_default_mode(folder / "model.safetensors")
    timm_config = {
        "architecture": spec.architecture,
        "num_classes": spec.pretrained_cfg["num_classes"],
        "num_features": model.config.hidden_size,
        "global_pool": spec.model_args["global_pool"],
        "model_args": spec.model_args,
        "pretrained_cfg": spec.pretrained_cfg,
    }
    (folder / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
    spelled_out = spec.create_model_call("model.safetensors")  # the folder's weights file
    usage = (f'import timm\n\n# the folder:\nmodel = timm.create_model("local-dir:{USAGE_PLACEHOLDER}", pretrained=True)\n'
             f"# or, spelled out:\nmodel = {spelled_out}")
    description = f"An MAE (He et al., 2021) {type(model).__name__} in timm's `{spec.architecture}` layout."
    pipeline_tag = IMAGE_CLASSIFICATION if spec.pretrained_cfg["num_classes"] else FEATURE_EXTRACTION
    card = render_model_card(f"MAE {spec.architecture}", description, {}, tags=["timm", "vit", "mae"], usage=usage,
                             library_name="timm", pipeline_tag=pipeline_tag)
    write_model_card(folder, card)
    return spec


def load_ours(source: str) -> MAEPreTrainedModel:
    """One of our saved models, as the class it was saved as (the encoder of a pretraining model)."""
    architectures = MAEConfig.from_pretrained(source).architectures or []
    model_class = MAEForImageClassification if "MAEForImageClassification" in architectures else MAEModel
    return model_class.from_pretrained(source)
