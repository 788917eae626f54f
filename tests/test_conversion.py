"""Checkpoint interop: transformers' ViTMAE (v5 and v4 key names), the official layout and timm in; transformers'
ViT and timm out.

The references are the other libraries' own models: transformers' `ViTMAEForPreTraining` (its position tables from
transformers' own builder) and timm's `VisionTransformer`, with random weights. With the same weights (and the same
masking noise), our converted model must give the same features, logits and loss.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTModel,
)
from transformers.initialization import no_init_weights
from transformers.models.vit_mae.modeling_vit_mae import (
    ViTMAEDecoder,
    build_2d_sinusoidal_position_embedding,
)

from modeling_mae import (
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    build_image_processor,
)
from modeling_mae.errors import UsageError
from modeling_mae.interop.conversion import (
    VIT_POOLER_NOTE,
    export_to_vit,
    to_transformers_vit,
)
from run_scripts.convert_checkpoint import main as convert_main

REPO = pathlib.Path(__file__).resolve().parents[1]
HEADS = dict(num_attention_heads=2, decoder_num_attention_heads=2)


def transformers_sincos_table(embed_dim: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """transformers' own sin-cos table `(1, 1 + H*W, D)`: its builder, then the half swap that its
    `ViTMAEEmbeddings.initialize_weights` applies for the official layout."""
    table = build_2d_sinusoidal_position_embedding(*grid_size, embed_dim=embed_dim, cls_token=True)
    return torch.cat([table[:, embed_dim // 2:], table[:, :embed_dim // 2]], dim=1).unsqueeze(0)


def reference_model(norm_pix_loss: bool = False, image_size: tuple[int, int] = (16, 16)) -> ViTMAEForPreTraining:
    """A tiny transformers ViTMAE with random weights everywhere, its position tables transformers' sin-cos ones."""
    config = ViTMAEConfig(
        image_size=list(image_size), patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, layer_norm_eps=1e-6, norm_pix_loss=norm_pix_loss,
    )
    # transformers' own init (its decoder runs it when built) makes square tables only; every weight is drawn below.
    with no_init_weights(), mock.patch.object(ViTMAEDecoder, "initialize_weights", lambda *args: None):
        model = ViTMAEForPreTraining(config).eval()
    grid = (image_size[0] // 4, image_size[1] // 4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.2)
        # transformers leaves the decoder table zero when built from a config (real checkpoints hold it).
        model.vit.embeddings.position_embeddings.copy_(transformers_sincos_table(32, grid))
        model.decoder.decoder_pos_embed.copy_(transformers_sincos_table(16, grid))
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


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn anew (LayerNorms, tables and heads included), so that no tensor can match by accident."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.2)
    return model.eval()


def test_non_square_checkpoints_convert(tmp_path) -> None:
    """A 4 x 6 patch grid. transformers' ViTMAE runs its encoder and decoder on it (not its loss: its `patchify`
    wants square images); the official layout cannot tell the grid from its table and asks for the image size."""
    reference = reference_model(image_size=(16, 24))
    reference.save_pretrained(tmp_path / "vitmae")
    torch.save({"model": to_official_layout(reference.state_dict())}, tmp_path / "official.pth")
    convert_main(["--source", str(tmp_path / "vitmae"), "--output_dir", str(tmp_path / "from_transformers")])
    with pytest.raises(UsageError, match="image_size"):
        convert_main(["--source", str(tmp_path / "official.pth"), "--output_dir", str(tmp_path / "no")])
    convert_main(["--source", str(tmp_path / "official.pth"), "--output_dir", str(tmp_path / "from_official"),
                  "--config_overrides", "image_size=[16,24],num_attention_heads=2,decoder_num_attention_heads=2"])
    pixel_values, noise = torch.randn(2, 3, 16, 24), torch.rand(2, 24)
    with torch.no_grad():
        encoded = reference.vit(pixel_values, noise=noise)
        expected = reference.decoder(encoded.last_hidden_state, encoded.ids_restore).logits  # (2, 24, 48)
        for folder in ("from_transformers", "from_official"):
            ours = MAEForPreTraining.from_pretrained(tmp_path / folder).eval()
            assert ours.config.image_size == (16, 24)
            actual = ours(pixel_values, noise=noise)
            torch.testing.assert_close(actual.logits, expected, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(actual.mask, encoded.mask)


# ---------------------------------------------------------------------------------------------------------- timm

TIMM_SHAPE = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
TIMM_HEADS = {  # timm's create_model arguments -> the class they convert to
    "encoder": ({"num_classes": 0, "global_pool": "token"}, MAEModel),
    "classifier, global pool": ({"num_classes": 3, "global_pool": "avg"}, MAEForImageClassification),
    "classifier, CLS": ({"num_classes": 3, "global_pool": "token"}, MAEForImageClassification),
    "encoder, no qkv bias": ({"num_classes": 0, "global_pool": "token", "qkv_bias": False}, MAEModel),
}


def assert_same_as_timm(ours: torch.nn.Module, timm_model: torch.nn.Module) -> None:
    """Equal features (timm's `forward_features`: every token after the last block and norm) and equal outputs
    (timm's logits, or for an encoder its pooled pre-logits features: our `pooler_output`)."""
    pixel_values = torch.randn(2, 3, 16, 16)
    encoder = ours if isinstance(ours, MAEModel) else ours.mae
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values).last_hidden_state, timm_model.forward_features(pixel_values))
        output = ours(pixel_values)
        actual = output.logits if isinstance(ours, MAEForImageClassification) else output.pooler_output
        torch.testing.assert_close(actual, timm_model(pixel_values))


@pytest.mark.parametrize("head", TIMM_HEADS)
@pytest.mark.parametrize("layout", ["state dict file", "save_for_hf folder"])
def test_timm_vit_converts_to_equal_features_and_logits(head: str, layout: str, tmp_path) -> None:
    """timm's ViT state dicts are the official layout (e.g. `vit_base_patch16_224.mae`): as a bare file (the head
    count given, shapes cannot tell it) or as timm's own Hub folder (`save_for_hf`: its config.json says it)."""
    arguments, expected_class = TIMM_HEADS[head]
    timm_model = randomised(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_SHAPE, **arguments))
    if layout == "state dict file":
        save_file(timm_model.state_dict(), tmp_path / "vit.safetensors")
        source, extra = tmp_path / "vit.safetensors", ["--config_overrides", "num_attention_heads=2"]
    else:
        timm.models.save_for_hf(timm_model, tmp_path / "vit", safe_serialization=True)
        source, extra = tmp_path / "vit", []
    convert_main(["--source", str(source), "--output_dir", str(tmp_path / "ours"), *extra])
    ours = expected_class.from_pretrained(tmp_path / "ours").eval()
    assert ours.config.architectures == [expected_class.__name__]
    assert_same_as_timm(ours, timm_model)


OUR_MODELS = {
    "encoder, mean pooling": lambda: MAEModel(tiny_config()),
    "encoder, CLS": lambda: MAEModel(tiny_config(use_mean_pooling=False)),
    "classifier, global pool": lambda: MAEForImageClassification(tiny_config(num_labels=3)),
    "classifier, CLS": lambda: MAEForImageClassification(tiny_config(num_labels=3, use_mean_pooling=False)),
}


@pytest.mark.parametrize("kind", OUR_MODELS)
def test_timm_export_loads_in_timm_with_equal_features_and_logits(kind: str, tmp_path, capsys) -> None:
    """`--to_timm` writes what timm loads with no missing key, both with the `create_model` call it prints and from
    the folder alone (`local-dir:`); the export converts back to the same weights."""
    ours = randomised(OUR_MODELS[kind]())
    ours.save_pretrained(tmp_path / "ours")
    folder = tmp_path / "timm"
    convert_main(["--source", str(tmp_path / "ours"), "--output_dir", str(folder), "--to_timm"])
    printed_call = capsys.readouterr().out.strip().splitlines()[-1].strip()
    assert printed_call.startswith("timm.create_model(")
    from_call = eval(printed_call, {"timm": timm})  # exactly what a user would paste
    from_folder = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert str(tmp_path) not in (folder / "README.md").read_text()  # the card may be uploaded: no local path
    exported = load_file(folder / "model.safetensors")
    for timm_model in (from_call, from_folder):
        assert timm_model.state_dict().keys() == exported.keys()  # no missing or extra key
        assert_same_as_timm(ours, timm_model.eval())
    convert_main(["--source", str(folder), "--output_dir", str(tmp_path / "back")])
    back = type(ours).from_pretrained(tmp_path / "back")
    assert back.config.use_mean_pooling == ours.config.use_mean_pooling
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_timm_export_refuses_what_timm_cannot_build(tmp_path) -> None:
    MAEModel(tiny_config(hidden_act="relu")).save_pretrained(tmp_path / "ours")
    with pytest.raises(UsageError, match="GELU"):
        convert_main(["--source", str(tmp_path / "ours"), "--output_dir", str(tmp_path / "timm"), "--to_timm"])


# ---------------------------------------------------------------------------------------------------- transformers' ViT


def test_export_to_transformers_vit(tmp_path, capsys) -> None:
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
    assert "warning" not in capsys.readouterr().err  # a classifier has no pooler to warn about
    with pytest.raises(UsageError, match="mean"):
        export_to_vit(MAEForImageClassification(tiny_config(num_labels=3)))


def test_vit_export_folder_has_our_preprocessing_and_says_the_pooler_is_random(tmp_path, capsys) -> None:
    """`AutoImageProcessor` works on the folder and preprocesses as ours does; `ViTModel.from_pretrained` adds a
    pooler the weights do not hold: one warning line at export, and the same note in the folder's model card."""
    encoder = randomised(MAEModel(tiny_config()))
    encoder.save_pretrained(tmp_path / "ours")
    folder = tmp_path / "vit"
    convert_main(["--source", str(tmp_path / "ours"), "--output_dir", str(folder), "--to_vit"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {VIT_POOLER_NOTE}"]
    card = (folder / "README.md").read_text()
    assert VIT_POOLER_NOTE in card and str(tmp_path) not in card  # the card may be uploaded: no local path
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    processed = AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt").pixel_values
    expected_pixels = build_image_processor(encoder.config)(image, return_tensors="pt").pixel_values
    torch.testing.assert_close(processed, expected_pixels)
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = encoder(pixel_values).last_hidden_state
        with_pooler = ViTModel.from_pretrained(folder).eval()  # what a user gets by default
        assert with_pooler.pooler is not None
        torch.testing.assert_close(with_pooler(pixel_values).last_hidden_state, expected)
        without = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
        torch.testing.assert_close(without(pixel_values).last_hidden_state, expected)


def tiny_vit_config(**overrides) -> ViTConfig:
    return ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, **overrides)


def test_a_plain_transformers_vit_converts_to_the_same_features(tmp_path, caplog) -> None:
    """What `ViTModel(config).save_pretrained` writes (keys without `vit.`, a pooler, LayerNorm eps 1e-12): the
    folder that scripts refuse, pointing here. The converted encoder gives transformers' own features."""
    vit = randomised(ViTModel(tiny_vit_config()))
    vit.save_pretrained(tmp_path / "vit")
    convert_main(["--source", str(tmp_path / "vit"), "--output_dir", str(tmp_path / "mae")])
    assert "Leaving out the ViTModel pooler (pooler.dense.bias, pooler.dense.weight)" in caplog.text
    encoder = MAEModel.from_pretrained(tmp_path / "mae").eval()
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values).last_hidden_state, vit(pixel_values).last_hidden_state)


def test_a_transformers_vit_classifier_converts_to_the_same_logits(tmp_path) -> None:
    """transformers' ViT classifies the CLS token after its final LayerNorm: `use_mean_pooling=False`."""
    vit = randomised(ViTForImageClassification(tiny_vit_config(num_labels=3)))
    vit.save_pretrained(tmp_path / "vit")
    convert_main(["--source", str(tmp_path / "vit"), "--output_dir", str(tmp_path / "mae")])
    classifier = MAEForImageClassification.from_pretrained(tmp_path / "mae").eval()
    assert not classifier.config.use_mean_pooling
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(classifier(pixel_values).logits, vit(pixel_values).logits)


class PicklePayload:
    def __reduce__(self) -> tuple:
        return os.system, ("true",)  # what would run on unpickling, were the file loaded without weights_only


def test_a_checkpoint_with_a_pickle_payload_is_one_line_and_never_runs(tmp_path) -> None:
    torch.save({"model": {"cls_token": PicklePayload()}}, tmp_path / "mae.pth")
    with pytest.raises(UsageError) as raised:
        convert_main(["--source", str(tmp_path / "mae.pth"), "--output_dir", str(tmp_path / "out")])
    assert str(raised.value).startswith(f"{tmp_path / 'mae.pth'} holds pickled code ({os.system.__module__}.system), "
                                        "which is never run here: nothing was loaded.")


def test_unrecognised_checkpoint_is_a_clear_error(tmp_path) -> None:
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(UsageError, match="official"):
        convert_main(["--source", str(tmp_path / "other.pth"), "--output_dir", str(tmp_path / "out")])


SAVE_A_MODEL = """
import sys
from modeling_mae import MAEConfig, MAEModel
MAEModel(MAEConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64)).save_pretrained(sys.argv[1])
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the warning is DeepSpeed's")
def test_saving_and_converting_print_no_deepspeed_accelerator_warning(tmp_path: pathlib.Path) -> None:
    """Accelerate imports DeepSpeed (when installed) to unwrap a model that transformers saves; on a machine without
    a GPU, DeepSpeed then warned "Setting accelerator to CPU" from a plain save_pretrained and from the script."""
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    ours, vit = tmp_path / "ours", tmp_path / "vit"
    commands = ([sys.executable, "-c", SAVE_A_MODEL, str(ours)],
                [sys.executable, str(REPO / "run_scripts" / "convert_checkpoint.py"), "--source", str(ours),
                 "--output_dir", str(vit), "--to_vit"])
    for command in commands:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Setting accelerator" not in done.stdout + done.stderr
    assert (vit / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------- RGB -> C channels


@pytest.mark.parametrize("num_channels", [1, 4])
def test_num_channels_adapts_an_official_rgb_checkpoint_as_written_out(num_channels: int, tmp_path, caplog) -> None:
    """`--num_channels C` on an official RGB checkpoint: the patch kernels are R+G+B for 1 channel and R, G, B, R
    times 3/4 for 4 (written out here, and timm's own `adapt_input_conv`), the pixel head's rows per patch pixel the
    mean of R, G, B, or R, G, B, R copied; the statistics follow the same rule; the log says which rule."""
    official = to_official_layout(reference_model().state_dict())
    torch.save({"model": official}, tmp_path / "mae_visualize.pth")
    with caplog.at_level("WARNING"):
        convert_main(["--source", str(tmp_path / "mae_visualize.pth"), "--output_dir", str(tmp_path / "ours"),
                      "--config_overrides", "num_attention_heads=2,decoder_num_attention_heads=2",
                      "--num_channels", str(num_channels)])
    assert ("kernels summed" if num_channels == 1 else "scaled by 3/4") in caplog.text
    ours = MAEForPreTraining.from_pretrained(tmp_path / "ours")
    kernels, head = official["patch_embed.proj.weight"], official["decoder_pred.weight"]  # (32, 3, 4, 4), (48, 16)
    red, green, blue = kernels[:, :1], kernels[:, 1:2], kernels[:, 2:]
    rows = head.view(16, 3, 16)  # (p * q, RGB, D_dec)
    if num_channels == 1:
        expected_kernels, expected_rows = red + green + blue, (rows[:, :1] + rows[:, 1:2] + rows[:, 2:]) / 3
        expected_mean, expected_std = [(0.485 + 0.456 + 0.406) / 3], [(0.229 + 0.224 + 0.225) / 3]
    else:
        expected_kernels, expected_rows = torch.cat([red, green, blue, red], dim=1) * 0.75, rows[:, [0, 1, 2, 0]]
        expected_mean, expected_std = [0.485, 0.456, 0.406, 0.485], [0.229, 0.224, 0.225, 0.229]
    actual_kernels = ours.mae.embeddings.patch_embeddings.projection.weight
    torch.testing.assert_close(actual_kernels, expected_kernels)
    torch.testing.assert_close(actual_kernels, timm.models.adapt_input_conv(num_channels, kernels))
    torch.testing.assert_close(ours.decoder.pred.weight, expected_rows.reshape(16 * num_channels, 16))
    assert ours.config.image_mean == pytest.approx(expected_mean)
    assert ours.config.image_std == pytest.approx(expected_std)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "ours")
    assert list(processor.image_mean) == pytest.approx(expected_mean)


def test_num_channels_takes_the_new_channels_statistics_and_a_mismatch_without_it_is_one_line(tmp_path) -> None:
    """The statistics `--config_overrides` gives with `--num_channels` are the adapted channels'; a config of 1
    channel for RGB weights, without `--num_channels`, is one line that names both counts and the flag."""
    torch.save({"model": to_official_layout(reference_model().state_dict())}, tmp_path / "mae.pth")
    heads = "num_attention_heads=2,decoder_num_attention_heads=2"
    convert_main(["--source", str(tmp_path / "mae.pth"), "--output_dir", str(tmp_path / "gray"), "--num_channels", "1",
                  "--config_overrides", f"{heads},image_mean=[0.3],image_std=[0.2],rescale_factor=1.5259e-05"])
    config = MAEForPreTraining.from_pretrained(tmp_path / "gray").config
    assert (config.num_channels, config.image_mean, config.image_std, config.rescale_factor) == (1, [0.3], [0.2],
                                                                                               1.5259e-05)
    with pytest.raises(UsageError, match=r"^the checkpoint has 3 input channels, the config 1: pass --num_channels 1 "):
        convert_main(["--source", str(tmp_path / "mae.pth"), "--output_dir", str(tmp_path / "no"),
                      "--config_overrides", f"{heads},num_channels=1"])
