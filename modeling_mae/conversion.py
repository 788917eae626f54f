"""Weights in and out: official facebookresearch/mae checkpoints and transformers' ViTMAE (v4 and
v5 key names) into `MAEForPreTraining`/`MAEModel`, and our encoder out to transformers' `ViTModel`.

Every mapping is a list of (regex, replacement) renames applied to each key, plus the one real
change of layout: transformers keeps query/key/value apart where we (and the official code) fuse
them into one `qkv` matrix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from .configuration_mae import MAEConfig, parse_overrides
from .modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel, MAEPreTrainedModel

StateDict = dict[str, torch.Tensor]
Renames = list[tuple[str, str]]

# The official blocks are timm's: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2.
_OFFICIAL_BLOCK = [(r"\.attn\.", ".attention.")]
OFFICIAL_RENAMES: Renames = [
    (r"^cls_token$", "mae.embeddings.cls_token"),
    (r"^pos_embed$", "mae.embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "mae.embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.", r"mae.encoder.layers.\1."),
    (r"^norm\.", "mae.layernorm."),
    (r"^fc_norm\.", "fc_norm."),  # fine-tuned checkpoints (global pooling)
    (r"^head\.", "classifier."),
    (r"^mask_token$", "decoder.mask_token"),
    (r"^decoder_pos_embed$", "decoder.position_embeddings"),
    (r"^decoder_embed\.", "decoder.decoder_embed."),
    (r"^decoder_blocks\.(\d+)\.", r"decoder.transformer.layers.\1."),
    (r"^decoder_norm\.", "decoder.norm."),
    (r"^decoder_pred\.", "decoder.pred."),
    *_OFFICIAL_BLOCK,
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
    raise ValueError(
        "unrecognised checkpoint: expected the official MAE layout (cls_token, blocks.N...) or a "
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


def mae_config_from_official(state_dict: StateDict, **overrides: Any) -> MAEConfig:
    """Shapes tell everything but the head counts: the paper uses 64-wide heads in the encoder
    (ViT-H: 80) and 16 heads in the decoder; pass overrides for anything else."""
    hidden_size = state_dict["cls_token"].shape[-1]
    patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
    grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    values: dict[str, Any] = dict(
        image_size=grid * patch_size,
        patch_size=patch_size,
        num_channels=state_dict["patch_embed.proj.weight"].shape[1],
        hidden_size=hidden_size,
        num_hidden_layers=_count_blocks(state_dict, r"blocks\.(\d+)\."),
        num_attention_heads=16 if hidden_size == 1280 else max(1, hidden_size // 64),
        intermediate_size=state_dict["blocks.0.mlp.fc1.weight"].shape[0],
    )
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


def mae_config_from_transformers(config: dict[str, Any], **overrides: Any) -> MAEConfig:
    """A transformers `ViTMAEConfig` dict -> `MAEConfig` (the field names are the same)."""
    fields = set(MAEConfig().to_dict()) - {"model_type", "transformers_version", "architectures", "auto_map"}
    values = {key: value for key, value in config.items() if key in fields}
    return MAEConfig(**{**values, **overrides})


def _read_weights(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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
    if path.is_file():  # an official .pth
        state_dict = _read_weights(path)
        if detect_format(state_dict) != "official":
            raise ValueError(f"{path} is a single file but not an official MAE checkpoint")
        return mae_config_from_official(state_dict, **values), convert_official_state_dict(state_dict)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weights or not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds no config.json + weights (*.safetensors or *.bin)")
    state_dict = {key: tensor for file in weights for key, tensor in _read_weights(file).items()}
    config = mae_config_from_transformers(json.loads((path / "config.json").read_text()), **values)
    return config, convert_transformers_state_dict(state_dict)


def build_converted_model(config: MAEConfig, state_dict: StateDict) -> MAEPreTrainedModel:
    """A pretraining model when the decoder is there, else the encoder (`mae_pretrain_vit_*`)."""
    has_decoder = any(key.startswith("decoder.") for key in state_dict)
    has_head = "classifier.weight" in state_dict
    model_class = MAEForPreTraining if has_decoder else MAEForImageClassification if has_head else MAEModel
    model = model_class(config)
    if model_class is MAEModel:
        state_dict = {key.removeprefix("mae."): tensor for key, tensor in state_dict.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [key for key in missing if "position_embeddings" not in key]:
        raise ValueError(f"checkpoint does not fit {model_class.__name__}: missing {missing}, unexpected {unexpected}")
    return model.eval()


def convert_checkpoint(
    source: str, output_dir: str | None = None, overrides: str | dict[str, Any] | None = None
) -> MAEPreTrainedModel:
    """Convert `source` (official .pth, transformers folder or Hub id) and optionally save it."""
    model = build_converted_model(*load_checkpoint(source, overrides))
    if output_dir:
        model.save_pretrained(output_dir)
    return model


def export_to_vit(model: MAEPreTrainedModel) -> tuple[ViTConfig, StateDict]:
    """Our encoder (and a CLS-token classifier's head) in transformers' `ViTModel` /
    `ViTForImageClassification` layout and config. A mean-pooling head has no ViT equivalent."""
    if isinstance(model, MAEForImageClassification) and model.config.use_mean_pooling:
        raise ValueError("transformers' ViT classifies from the CLS token; use_mean_pooling=True has no ViT equivalent")
    config = model.config
    encoder = model if isinstance(model, MAEModel) else model.mae
    state_dict = {f"mae.{key}": tensor for key, tensor in encoder.state_dict().items()}
    if isinstance(model, MAEForImageClassification):
        state_dict.update({key: tensor for key, tensor in model.state_dict().items() if key.startswith("classifier.")})
    inverse = [
        (r"^mae\.encoder\.layers\.(\d+)\.", r"vit.layers.\1."),
        (r"^mae\.", "vit."),
        (r"\.norm1\.", ".layernorm_before."),
        (r"\.norm2\.", ".layernorm_after."),
        (r"\.attention\.proj\.", ".attention.o_proj."),
    ]
    vit_config = ViTConfig(
        image_size=list(config.image_size),
        patch_size=list(config.patch_size),
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
    return vit_config, split_qkv(rename_keys(state_dict, inverse))


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


def load_ours(source: str) -> MAEPreTrainedModel:
    """One of our saved models, as the class it was saved as (the encoder of a pretraining model)."""
    architectures = MAEConfig.from_pretrained(source).architectures or []
    model_class = MAEForImageClassification if "MAEForImageClassification" in architectures else MAEModel
    return model_class.from_pretrained(source)
