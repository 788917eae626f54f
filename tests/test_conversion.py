"""Checkpoint interop: transformers' ViTMAE (v5 and v4 key names) and the official layout in, ViT out.

transformers' own `ViTMAEForPreTraining` is the reference: with the same weights and the same
masking noise, our converted model must give the same logits and loss.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel
from modeling_mae.conversion import export_to_vit, to_transformers_vit
from modeling_mae.modeling_mae import sincos_position_table
from run_scripts.convert_checkpoint import main as convert_main

from conftest import tiny_config

HEADS = dict(num_attention_heads=2, decoder_num_attention_heads=2)


def reference_model(norm_pix_loss: bool = False) -> ViTMAEForPreTraining:
    """A tiny transformers ViTMAE with random weights everywhere, position tables included."""
    config = ViTMAEConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, layer_norm_eps=1e-6, norm_pix_loss=norm_pix_loss,
    )
    model = ViTMAEForPreTraining(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.2)
        # transformers leaves the decoder table zero when built from a config; use the real ones.
        model.vit.embeddings.position_embeddings.copy_(sincos_position_table(32, (4, 4)).unsqueeze(0))
        model.decoder.decoder_pos_embed.copy_(sincos_position_table(16, (4, 4)).unsqueeze(0))
    return model


def to_v4_names(state_dict: dict) -> dict:
    """transformers v5 key names -> the v4 ones older checkpoints (e.g. facebook/vit-mae-base) use."""
    renames = [
        (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
        (r"\.attention\.q_proj\.", ".attention.attention.query."),
        (r"\.attention\.k_proj\.", ".attention.attention.key."),
        (r"\.attention\.v_proj\.", ".attention.attention.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.mlp\.fc1\.", ".intermediate.dense."),
        (r"\.mlp\.fc2\.", ".output.dense."),
    ]
    return {_rename(key, renames): tensor for key, tensor in state_dict.items()}


def to_official_layout(state_dict: dict) -> dict:
    """transformers v5 ViTMAE -> the official `models_mae.py` state dict (timm blocks, fused qkv)."""
    renames = [
        (r"^vit\.embeddings\.cls_token$", "cls_token"),
        (r"^vit\.embeddings\.position_embeddings$", "pos_embed"),
        (r"^vit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^vit\.layers\.", "blocks."),
        (r"^vit\.layernorm\.", "norm."),
        (r"^decoder\.decoder_layers\.", "decoder_blocks."),
        (r"^decoder\.", ""),
        (r"\.layernorm_before\.", ".norm1."),
        (r"\.layernorm_after\.", ".norm2."),
        (r"\.attention\.o_proj\.", ".attn.proj."),
    ]
    official = {}
    for key, tensor in state_dict.items():
        match = re.match(r"(.*)\.attention\.([qkv])_proj\.(weight|bias)$", key)
        if match and match.group(2) == "q":
            prefix, _, kind = match.groups()
            fused = torch.cat([state_dict[f"{prefix}.attention.{n}_proj.{kind}"] for n in "qkv"])
            official[_rename(f"{prefix}.attn.qkv.{kind}", renames)] = fused
        elif not match:
            official[_rename(key, renames)] = tensor
    return official


def _rename(key: str, renames: list[tuple[str, str]]) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def assert_same_pretraining_outputs(ours: MAEForPreTraining, reference: ViTMAEForPreTraining) -> None:
    pixel_values, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        expected = reference(pixel_values, noise=noise)
        actual = ours.eval()(pixel_values, noise=noise)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual.mask, expected.mask)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_transformers_folder_converts_to_identical_outputs(tmp_path, norm_pix_loss: bool) -> None:
    reference = reference_model(norm_pix_loss)
    reference.save_pretrained(tmp_path / "vitmae")
    convert_main(["--source", str(tmp_path / "vitmae"), "--output_dir", str(tmp_path / "ours")])
    ours = MAEForPreTraining.from_pretrained(tmp_path / "ours")
    assert ours.config.norm_pix_loss is norm_pix_loss
    assert_same_pretraining_outputs(ours, reference)


def test_transformers_v4_key_names_convert_too(tmp_path) -> None:
    reference = reference_model()
    folder = tmp_path / "vitmae_v4"
    reference.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in to_v4_names(reference.state_dict()).items()}, folder / "model.safetensors")
    convert_main(["--source", str(folder), "--output_dir", str(tmp_path / "ours")])
    assert_same_pretraining_outputs(MAEForPreTraining.from_pretrained(tmp_path / "ours"), reference)


def test_official_checkpoint_converts_to_identical_outputs(tmp_path) -> None:
    reference = reference_model()
    torch.save({"model": to_official_layout(reference.state_dict()), "epoch": 799}, tmp_path / "mae_visualize.pth")
    convert_main([
        "--source", str(tmp_path / "mae_visualize.pth"), "--output_dir", str(tmp_path / "ours"),
        "--config_overrides", "num_attention_heads=2,decoder_num_attention_heads=2",
    ])
    assert_same_pretraining_outputs(MAEForPreTraining.from_pretrained(tmp_path / "ours"), reference)


def test_official_encoder_only_checkpoint_becomes_an_encoder(tmp_path) -> None:
    reference = reference_model()
    official = {k: v for k, v in to_official_layout(reference.state_dict()).items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": official}, tmp_path / "mae_pretrain.pth")
    convert_main(["--source", str(tmp_path / "mae_pretrain.pth"), "--output_dir", str(tmp_path / "ours"),
                  "--config_overrides", "num_attention_heads=2"])
    encoder = MAEModel.from_pretrained(tmp_path / "ours").eval()
    pixel_values, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        expected = reference.vit(pixel_values, noise=noise).last_hidden_state
        actual = encoder(pixel_values, noise=noise).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_export_to_transformers_vit(tmp_path) -> None:
    encoder = MAEModel(tiny_config()).eval()
    vit = to_transformers_vit(encoder)
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit(pixel_values).last_hidden_state, encoder(pixel_values).last_hidden_state)

    classifier = MAEForImageClassification(tiny_config(num_labels=3, use_mean_pooling=False)).eval()
    vit_classifier = to_transformers_vit(classifier)
    with torch.no_grad():
        torch.testing.assert_close(vit_classifier(pixel_values).logits, classifier(pixel_values).logits)

    classifier.save_pretrained(tmp_path / "ours")
    convert_main(["--source", str(tmp_path / "ours"), "--output_dir", str(tmp_path / "vit"), "--to_vit"])
    assert (tmp_path / "vit" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="mean"):
        export_to_vit(MAEForImageClassification(tiny_config(num_labels=3)))


def test_unrecognised_checkpoint_is_a_clear_error(tmp_path) -> None:
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="official"):
        convert_main(["--source", str(tmp_path / "other.pth"), "--output_dir", str(tmp_path / "out")])
