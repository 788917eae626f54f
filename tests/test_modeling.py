"""The model: shapes, the official algorithm's details, Auto classes, remote code, attention backends."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from official_mae import get_2d_sincos_pos_embed
from PIL import Image
from safetensors.torch import save_file
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    ViTConfig,
    ViTMAEConfig,
    pipeline,
)

from modeling_mae import (
    MAE_PRESETS,
    MAEConfig,
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    load_config,
)
from modeling_mae.configuration_mae import ForeignConfigError
from modeling_mae.interop.conversion import to_transformers_vit
from modeling_mae.interop.model_card import finetuning_card
from modeling_mae.modeling_mae import MAEAttention, MAELayer

# ---------------------------------------------------------------------------------------------- config


def test_presets_have_the_papers_shapes() -> None:
    base, large, huge = (MAEConfig.from_preset(name) for name in ("base", "large", "huge"))
    assert (base.hidden_size, base.num_hidden_layers, base.patch_size) == (768, 12, (16, 16))
    assert (large.hidden_size, large.num_hidden_layers, large.patch_size) == (1024, 24, (16, 16))
    assert (huge.hidden_size, huge.num_hidden_layers, huge.patch_size) == (1280, 32, (14, 14))
    for config in (base, large, huge):
        assert (config.decoder_hidden_size, config.decoder_num_hidden_layers, config.layer_norm_eps) == (512, 8, 1e-6)
    assert {"tiny", "small", "tiny-32px"} <= set(MAE_PRESETS)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(image_size=30, patch_size=4), "patch_size"),
        (dict(num_attention_heads=3), "num_attention_heads"),
        (dict(decoder_num_attention_heads=5), "decoder_num_attention_heads"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=-0.1), "mask_ratio"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(layer_norm_eps=-1), "layer_norm_eps must be a positive number, got -1"),  # NaN at the first step
        (dict(layer_norm_eps=0.0), "layer_norm_eps must be a positive number, got 0.0"),
        (dict(hidden_act="swish2"), "hidden_act 'swish2' is no activation of transformers; one of gelu, "),
    ],
)
def test_invalid_config_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize("overrides", [
    {}, dict(qkv_bias=False), dict(image_size=(16, 24), patch_size=(4, 8)), dict(num_channels=1),
    dict(num_hidden_layers=3, decoder_num_hidden_layers=2, intermediate_size=48, decoder_intermediate_size=24),
])
def test_num_parameters_counts_the_pretraining_model_from_its_sizes(overrides: dict) -> None:
    """What scripts check against the machine's memory before building a model: the built model's own count."""
    config = tiny_config(**overrides)
    assert config.num_parameters() == sum(parameter.numel() for parameter in MAEForPreTraining(config).parameters())


def test_load_config_from_preset_file_and_overrides(tmp_path) -> None:
    config = load_config("tiny-32px", "mask_ratio=0.6,norm_pix_loss=true,image_size=[32,64]")
    assert (config.mask_ratio, config.norm_pix_loss, config.image_size) == (0.6, True, (32, 64))
    config.save_pretrained(tmp_path)
    assert load_config(str(tmp_path)).image_size == (32, 64)
    assert load_config(str(tmp_path / "config.json"), {"mask_ratio": 0.5}).mask_ratio == 0.5
    with pytest.raises(ValueError, match="mask_ration"):
        load_config("tiny-32px", "mask_ration=0.5")
    with pytest.raises(ValueError, match="preset"):
        load_config("no-such-preset")


@pytest.mark.parametrize("config_class", [ViTConfig, ViTMAEConfig])
def test_load_config_refuses_the_config_of_another_model_type(config_class: type, tmp_path) -> None:
    """transformers only warns, then builds an MAEConfig from a ViT's config.json: its weights would then load into
    nothing, and a run would start from random weights that claim to come from that folder."""
    config_class(image_size=16, patch_size=4, hidden_size=32, num_attention_heads=2).save_pretrained(tmp_path)
    message = f"{tmp_path} holds a '{config_class.model_type}' model, not an MAE one (model_type 'mae')"
    for source in (tmp_path, tmp_path / "config.json"):
        with pytest.raises(ForeignConfigError) as raised:
            load_config(str(source))
        assert str(raised.value) == message.replace(str(tmp_path), str(source), 1)


# ---------------------------------------------------------------------------------------------- model


def test_position_tables_are_the_official_sincos_when_built_from_config(tmp_path) -> None:
    config = tiny_config()
    model = MAEForPreTraining(config)
    encoder_table = get_2d_sincos_pos_embed(config.hidden_size, (4, 4))
    decoder_table = get_2d_sincos_pos_embed(config.decoder_hidden_size, (4, 4))
    torch.testing.assert_close(model.mae.embeddings.position_embeddings[0].double(), torch.from_numpy(encoder_table))
    torch.testing.assert_close(model.decoder.position_embeddings[0].double(), torch.from_numpy(decoder_table))
    assert not model.mae.embeddings.position_embeddings.requires_grad
    # ... and survive a save/load round trip, also into the encoder alone.
    model.save_pretrained(tmp_path)
    encoder = MAEModel.from_pretrained(tmp_path)
    torch.testing.assert_close(encoder.embeddings.position_embeddings, model.mae.embeddings.position_embeddings)


def test_non_square_position_table_is_the_official_formula_and_transformers_own() -> None:
    """A 4 x 6 grid: the official formula on a (height, width) grid, and transformers' ViTMAE table builder with the
    half swap its ViTMAE applies for the official layout ([sin_w | cos_w | sin_h | cos_h])."""
    from transformers.models.vit_mae.modeling_vit_mae import (
        build_2d_sinusoidal_position_embedding,
    )

    model = MAEModel(tiny_config(image_size=(16, 24), patch_size=4))
    table = model.embeddings.position_embeddings[0].double()  # (1 + 24, 32)
    torch.testing.assert_close(table, torch.from_numpy(get_2d_sincos_pos_embed(32, (4, 6))))
    canonical = build_2d_sinusoidal_position_embedding(height=4, width=6, embed_dim=32, cls_token=True)
    torch.testing.assert_close(table.float(), torch.cat([canonical[:, 16:], canonical[:, :16]], dim=1))


def assert_official_initialisation(model: torch.nn.Module) -> None:
    """Every parameter as the official code initialises it: xavier-uniform Linear and patch-projection weights (the
    projection as a (D, C*p*q) Linear; qkv as one (3D, D) matrix), zero Linear biases, the projection's bias as
    PyTorch's default uniform(+-1/sqrt(C*p*q)), LayerNorms 1 and 0, CLS/mask tokens normal(0.02), the head's
    weight trunc_normal(2e-5), the official sin-cos tables."""
    checked = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert module.weight.eq(1).all() and module.bias.eq(0).all(), name
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            weight = module.weight.flatten(1)  # (out, in)
            if name == "classifier":
                assert 0 < weight.std() < 1e-4 and module.bias.eq(0).all(), name  # trunc_normal(std=2e-5)
            elif isinstance(module, torch.nn.Conv2d):
                bias_bound = weight.shape[1] ** -0.5  # 1 / sqrt(fan_in)
                assert 0.5 * bias_bound < module.bias.abs().max() <= bias_bound, name
            else:
                assert module.bias.eq(0).all(), name
            if name != "classifier":
                bound = (6 / sum(weight.shape)) ** 0.5
                assert 0.8 * bound < weight.abs().max() <= bound, name
        else:
            continue
        checked.update(f"{name}.{key}" for key, _ in module.named_parameters(recurse=False))
    tokens = {name: p for name, p in model.named_parameters() if name.endswith(("cls_token", "mask_token"))}
    for name, token in tokens.items():
        assert 0.005 < token.std() < 0.04, name
    tables = {name: p for name, p in model.named_parameters() if name.endswith("position_embeddings")}
    for name, table in tables.items():
        official = get_2d_sincos_pos_embed(table.shape[-1], model.config.grid_size)
        torch.testing.assert_close(table[0].double(), torch.from_numpy(official), msg=name)
    assert checked | set(tokens) | set(tables) == {name for name, _ in model.named_parameters()}


def every_model_class(**overrides) -> list[torch.nn.Module]:
    """The three classes, the classifier with either head (global pool + fc_norm, CLS), on a tiny config."""
    return [
        MAEModel(tiny_config(**overrides)),
        MAEForPreTraining(tiny_config(**overrides)),
        MAEForImageClassification(tiny_config(num_labels=5, **overrides)),
        MAEForImageClassification(tiny_config(num_labels=5, use_mean_pooling=False, **overrides)),
    ]


def test_official_initialisation() -> None:
    for model in every_model_class():
        assert_official_initialisation(model)


@pytest.mark.parametrize("model_class", [MAEModel, MAEForPreTraining, MAEForImageClassification])
def test_meta_device_build_then_to_empty_and_init_weights(model_class) -> None:
    """What FSDP2 and big-model loading do: build without memory, materialise, initialise. Every parameter is
    written by `init_weights` (the empty memory is filled with NaN first, so one it skipped would stay NaN)."""
    config = tiny_config(num_labels=5, num_hidden_layers=3, drop_path_rate=0.3)
    with torch.device("meta"):
        model = model_class(config)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    encoder = model if model_class is MAEModel else model.mae
    rates = [layer.drop_path.rate for layer in encoder.encoder.layers]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 3).tolist())  # the official schedule
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    model.init_weights()
    assert_official_initialisation(model)
    assert not encoder.embeddings.position_embeddings.requires_grad
    outputs = model.eval()(torch.randn(2, 3, 16, 16))
    assert all(torch.isfinite(value).all() for value in outputs.values())


def test_every_tensor_is_a_parameter_or_a_buffer() -> None:
    """`to_empty` and device moves see only registered tensors: a plain tensor attribute would stay on the meta
    device (or the CPU) and break the model there."""
    for model in every_model_class():
        for name, module in model.named_modules():
            plain = [key for key, value in vars(module).items() if isinstance(value, torch.Tensor)]
            assert plain == [], f"{name or type(model).__name__}: {plain}"


def test_pretraining_shapes_and_visible_only_encoder() -> None:
    config = tiny_config()
    model = MAEForPreTraining(config).eval()
    pixel_values = torch.randn(3, 3, 16, 16)
    out = model(pixel_values)
    assert out.logits.shape == (3, 16, 4 * 4 * 3)
    assert out.mask.shape == out.ids_restore.shape == (3, 16)
    assert out.mask.sum(dim=1).tolist() == [12, 12, 12]  # 75% of 16 removed
    encoded = model.mae(pixel_values, mask_ratio=0.75)
    assert encoded.last_hidden_state.shape == (3, 1 + 4, 32)  # CLS + the 4 visible patches, no mask tokens


def test_noise_makes_masking_reproducible_and_keeps_the_smallest_noise() -> None:
    model = MAEForPreTraining(tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    first, second = model(pixel_values, noise=noise), model(pixel_values, noise=noise)
    torch.testing.assert_close(first.logits, second.logits)
    kept = noise.argsort(dim=1)[:, :4]
    expected_mask = torch.ones(2, 16).scatter(1, kept, 0.0)
    torch.testing.assert_close(first.mask, expected_mask)
    torch.testing.assert_close(first.ids_restore, noise.argsort(dim=1).argsort(dim=1))


def test_encoder_alone_is_deterministic_and_sees_all_patches() -> None:
    encoder = MAEModel(tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 16, 16)
    first, second = encoder(pixel_values), encoder(pixel_values)
    assert first.last_hidden_state.shape == (2, 17, 32) and first.mask is None
    torch.testing.assert_close(first.last_hidden_state, second.last_hidden_state)
    torch.testing.assert_close(first.pooler_output, first.last_hidden_state[:, 1:].mean(dim=1))
    assert encoder(pixel_values, mask_ratio=0.5).last_hidden_state.shape == (2, 9, 32)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_is_mse_on_masked_patches(norm_pix_loss: bool) -> None:
    model = MAEForPreTraining(tiny_config(norm_pix_loss=norm_pix_loss)).eval()
    pixel_values = torch.randn(2, 3, 16, 16)
    out = model(pixel_values)
    target = model.patchify(pixel_values)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((out.logits - target) ** 2).mean(-1)
    torch.testing.assert_close(out.loss, (per_patch * out.mask).sum() / out.mask.sum())


def test_mask_ratio_zero_gives_a_finite_loss_over_all_patches() -> None:
    model = MAEForPreTraining(tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 16, 16)
    out = model(pixel_values, mask_ratio=0.0)
    assert out.mask.sum() == 0 and torch.isfinite(out.loss)
    expected = ((out.logits - model.patchify(pixel_values)) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_masked_logits_give_the_full_forwards_predictions_loss_and_gradients(attn: str, norm_pix_loss: bool) -> None:
    """Training's `logits_to_keep="masked"` (visible patches never embedded; the decoder's last block, norm and head
    skip them) computes exactly what the full forward computes on the masked patches."""
    config = tiny_config(norm_pix_loss=norm_pix_loss, image_size=(16, 24), patch_size=(4, 8))  # 4 x 3 patches
    model = MAEForPreTraining._from_config(config, attn_implementation=attn).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    pixel_values, noise = torch.randn(3, 3, 16, 24), torch.rand(3, 12)
    full = model(pixel_values, noise=noise)
    masked = model(pixel_values, noise=noise, logits_to_keep="masked")
    assert masked.logits.shape == (3, 9, 96)  # 9 of the 12 patches masked, in ascending order:
    torch.testing.assert_close(masked.logits, full.logits[full.mask.bool()].view(3, 9, 96))
    torch.testing.assert_close(masked.loss, full.loss)
    torch.testing.assert_close(masked.mask, full.mask)
    for name, expected, actual in zip(
        [n for n, p in model.named_parameters() if p.requires_grad],
        torch.autograd.grad(full.loss, parameters),
        torch.autograd.grad(masked.loss, parameters),
        strict=True,
    ):
        assert actual.abs().sum() > 0, name
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4, msg=name)


def test_masked_logits_without_masking_are_all_logits() -> None:
    model = MAEForPreTraining(tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 16, 16)
    full, masked = model(pixel_values, mask_ratio=0.0), model(pixel_values, mask_ratio=0.0, logits_to_keep="masked")
    torch.testing.assert_close(masked.logits, full.logits)
    torch.testing.assert_close(masked.loss, full.loss)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(pixel_values, logits_to_keep="visible")
    with pytest.raises(TypeError, match="not the mask"):  # the official signature took the mask
        model.forward_loss(pixel_values, full.logits, full.mask)


def test_embedding_only_the_kept_patches_equals_embedding_all_then_keeping() -> None:
    """The encoder embeds only the visible patches (a matmul on their pixels): the convolution's result on them."""
    embeddings = MAEModel(tiny_config(image_size=(16, 24), patch_size=(4, 8))).embeddings
    pixel_values, keep = torch.randn(2, 3, 16, 24), torch.rand(2, 12).argsort(dim=1)[:, :5]
    every_patch = embeddings(pixel_values)  # (2, 1 + 12, 32), through the convolution
    expected = torch.gather(every_patch[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, 32))
    kept = embeddings(pixel_values, keep_index=keep)  # (2, 1 + 5, 32)
    torch.testing.assert_close(kept, torch.cat([every_patch[:, :1], expected], dim=1))


def test_non_square_patches_make_the_hand_counted_grid_and_the_official_table() -> None:
    """16 x 24 images in 4 x 8 patches: 4 rows of 3 patches (a grid that swaps the patch sides, (2, 6), has as many
    patches). Both tables are the official numpy formula on that grid, and patch 5 (row 1, column 2) is the pixels
    at rows 4-7, columns 16-23."""
    config = tiny_config(image_size=(16, 24), patch_size=(4, 8))
    assert (config.grid_size, config.num_patches) == ((4, 3), 12)
    model = MAEForPreTraining(config)
    for table, width in ((model.mae.embeddings.position_embeddings, 32), (model.decoder.position_embeddings, 16)):
        assert table.shape == (1, 1 + 12, width)
        torch.testing.assert_close(table[0].double(), torch.from_numpy(get_2d_sincos_pos_embed(width, (4, 3))))
    pixel_values = torch.randn(2, 3, 16, 24)
    expected = pixel_values[:, :, 4:8, 16:24].permute(0, 2, 3, 1).reshape(2, -1)  # (B, p * q * C), channels last
    torch.testing.assert_close(model.patchify(pixel_values)[:, 5], expected)
    assert model.mae(pixel_values).last_hidden_state.shape == (2, 1 + 12, 32)


def test_patchify_unpatchify_round_trip_non_square() -> None:
    model = MAEForPreTraining(tiny_config(image_size=(16, 24), patch_size=(4, 8)))
    pixel_values = torch.randn(2, 3, 16, 24)
    patches = model.patchify(pixel_values)
    assert patches.shape == (2, 4 * 3, 4 * 8 * 3)
    torch.testing.assert_close(model.unpatchify(patches), pixel_values)
    out = model(pixel_values)
    assert out.logits.shape == (2, 12, 96) and torch.isfinite(out.loss)


def test_logits_to_pixels_inverts_norm_pix_targets() -> None:
    model = MAEForPreTraining(tiny_config(norm_pix_loss=True))
    pixel_values = torch.randn(2, 3, 16, 16)
    normalised, _, _ = model.normalize_targets(pixel_values)
    torch.testing.assert_close(model.logits_to_pixels(normalised, pixel_values), pixel_values, atol=1e-4, rtol=1e-4)


def test_interpolate_pos_encoding_accepts_another_resolution() -> None:
    model = MAEForPreTraining(tiny_config()).eval()
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(torch.randn(1, 3, 24, 24))
    out = model(torch.randn(1, 3, 24, 24), interpolate_pos_encoding=True)
    assert out.logits.shape == (1, 36, 48) and torch.isfinite(out.loss)


@pytest.mark.parametrize("model_class", [MAEForPreTraining, MAEForImageClassification])
def test_gradients_reach_every_trainable_parameter(model_class) -> None:
    model = model_class(tiny_config(num_labels=3)).train()
    kwargs = {"labels": torch.tensor([0, 2])} if model_class is MAEForImageClassification else {}
    model(torch.randn(2, 3, 16, 16), **kwargs).loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert "position_embeddings" in name, name


def parameters_used_outside_their_modules_forward(model: torch.nn.Module, *args, **kwargs) -> set[tuple[str, str]]:
    """(owning module, op) of every op that reads a parameter's values while its owning module's `forward` is not
    running. Module hooks bracket each `forward`; a torch-function mode sees every op and its arguments."""
    owners = {id(p): name.rpartition(".")[0] for name, p in model.named_parameters()}
    module_names = {module: name for name, module in model.named_modules()}
    running: list[str | None] = []
    misuses: set[tuple[str, str]] = set()

    class WatchParameters(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", str(func))
            for value in tree_leaves((args, kwargs)):
                owner = owners.get(id(value))
                if owner is not None and owner not in running and name != "__get__":  # metadata (.dtype) is fine
                    misuses.add((owner, name))
            return func(*args, **kwargs)

    def enter(module: torch.nn.Module, args: tuple) -> None:
        running.append(module_names.get(module))

    def leave(module: torch.nn.Module, args: tuple, output: object) -> None:  # returns None: keeps the output
        running.pop()

    before, after = register_module_forward_pre_hook(enter), register_module_forward_hook(leave)
    try:
        with WatchParameters():
            model(*args, **kwargs)
    finally:
        before.remove()
        after.remove()
    return misuses


@pytest.mark.parametrize("logits_to_keep", ["all", "masked"])
def test_weights_are_used_only_inside_their_modules_forward(logits_to_keep: str) -> None:
    """FSDP2 gathers a module's sharded weights in that module's forward pre-hook (Accelerate makes the patch
    embedding, each block and the final norm separate units), and adapters hook `forward` too: a weight read outside
    its module's forward is a sharded DTensor under FSDP ("got mixed torch.Tensor and DTensor")."""
    pretraining = MAEForPreTraining(tiny_config()).train()
    pixel_values = torch.randn(2, 3, 16, 16)
    misuses = parameters_used_outside_their_modules_forward(pretraining, pixel_values, logits_to_keep=logits_to_keep)
    assert misuses == set()
    classifier = MAEForImageClassification(tiny_config(num_labels=3)).train()
    assert parameters_used_outside_their_modules_forward(classifier, pixel_values) == set()


def checkpointed_training_step(checkpointing: bool) -> tuple[list[str], list[str], int, dict[str, torch.Tensor]]:
    """One training step of a fresh model: the blocks run in the forward, those run again in the backward, the bytes
    autograd saved for the backward, the gradients. A block's run is seen at its first op (`norm1`): the backward
    recomputes the block's `forward` inside the checkpoint, where hooks on the block itself do not fire."""
    torch.manual_seed(0)
    model = MAEForPreTraining(tiny_config()).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    runs: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, MAELayer):
            module.norm1.register_forward_pre_hook(lambda *_, name=name: runs.append(name))
    saved_bytes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    pixel_values, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(pixel_values, noise=noise, logits_to_keep="masked").loss  # as training runs it
    forward_runs = list(runs)
    loss.backward()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return forward_runs, runs[len(forward_runs):], sum(saved_bytes), gradients


def test_gradient_checkpointing_recomputes_every_block_saves_less_and_gives_the_same_gradients() -> None:
    forward, recomputed_without, saved_without, expected = checkpointed_training_step(checkpointing=False)
    _, recomputed, saved, gradients = checkpointed_training_step(checkpointing=True)
    assert forward == ["mae.encoder.layers.0", "mae.encoder.layers.1", "decoder.transformer.layers.0"]
    assert recomputed_without == [] and recomputed == forward[::-1]  # each block again, last first
    assert saved < saved_without / 3  # only the blocks' inputs are kept for the backward
    assert gradients.keys() == expected.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(gradients[name], gradient, msg=name)


def test_run_mae_gradient_checkpointing_recomputes_through_the_current_api(data_dir, model_config, tmp_path) -> None:
    """`run_mae.py --gradient_checkpointing` checkpoints every block (each runs twice per training step: forward,
    then again in the backward) through transformers' current API, with no deprecation warning."""
    from test_training import run_args, run_main

    training_runs: list[str] = []

    def count(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, MAEAttention) and module.training and torch.is_grad_enabled():
            training_runs.append(type(module).__name__)

    hook = register_module_forward_pre_hook(count)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = run_main(run_args(data_dir, model_config, tmp_path, "--max_train_steps", "2",
                                        "--gradient_checkpointing"))
    finally:
        hook.remove()
    blocks = 2 + 1  # tiny_config: 2 encoder blocks, 1 decoder block
    assert results["train_steps"] == 2 and len(training_runs) == 2 * blocks * 2
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []


def test_eager_and_sdpa_attention_agree() -> None:
    config = tiny_config()
    eager = MAEForPreTraining._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    sdpa = MAEForPreTraining._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    pixel_values, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    torch.testing.assert_close(
        eager(pixel_values, noise=noise).logits, sdpa(pixel_values, noise=noise).logits, atol=1e-5, rtol=1e-5
    )
    attentions = eager.mae(pixel_values, output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 17, 17)


def test_drop_path_is_stochastic_in_training_only() -> None:
    model = MAEForImageClassification(tiny_config(drop_path_rate=0.5, num_labels=3))
    pixel_values = torch.randn(4, 3, 16, 16)
    model.train()
    torch.manual_seed(1)
    first = model(pixel_values).logits
    second = model(pixel_values).logits
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(model(pixel_values).logits, model(pixel_values).logits)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation() -> None:
    """Stochastic depth: a sample's branch is zeroed with probability p, else scaled by 1 / (1 - p)."""
    last_block = MAEForImageClassification(tiny_config(drop_path_rate=0.5, num_labels=3)).mae.encoder.layers[-1]
    drop_path = last_block.drop_path.train()  # rate 0.5: the deepest block drops the most
    torch.manual_seed(0)
    out = drop_path(torch.ones(400, 3, 2))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0} and (per_sample == per_sample[:, :1]).all()
    assert 0.4 < (per_sample[:, 0] == 0).float().mean() < 0.6


def test_a_wrong_noise_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 16\), got \(2, 5\)"):
        MAEForPreTraining(tiny_config())(torch.randn(2, 3, 16, 16), noise=torch.rand(2, 5))


def test_an_encoder_with_a_trained_position_table_is_transformers_vit() -> None:
    """After fine-tuning, the position table (its CLS row too) is no sin-cos table any more: the encoder still
    equals transformers' ViT on the exported weights."""
    model = MAEModel(tiny_config()).eval()
    model.embeddings.position_embeddings.data.normal_()
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = to_transformers_vit(model)(pixel_values).last_hidden_state
        torch.testing.assert_close(model(pixel_values).last_hidden_state, expected, atol=1e-5, rtol=1e-4)


def test_every_model_interpolates_its_position_table_only_when_asked() -> None:
    pixel_values = torch.randn(1, 3, 24, 24)
    for model in (MAEModel(tiny_config()).eval(), MAEForImageClassification(tiny_config(num_labels=3)).eval()):
        with pytest.raises(ValueError, match="interpolate_pos_encoding"):
            model(pixel_values)
        output = model(pixel_values, interpolate_pos_encoding=True)
        assert (output.logits if isinstance(model, MAEForImageClassification) else output.pooler_output).shape[0] == 1


def test_classifier_heads() -> None:
    cls_model = MAEForImageClassification(tiny_config(num_labels=3, use_mean_pooling=False))
    assert cls_model.fc_norm is None and isinstance(cls_model.mae.layernorm, torch.nn.LayerNorm)


@pytest.mark.parametrize("use_mean_pooling", [True, False])
def test_the_classifier_pools_as_the_official_head_written_out(use_mean_pooling: bool) -> None:
    """Global pooling (the paper's fine-tuning): the mean of the 16 patch tokens, never the CLS token, then fc_norm
    and the head; else the CLS token after the encoder's final norm. Written out with torch's functional ops on the
    last block's output; the CLS token is made large, so that letting it into the mean shows."""
    model = MAEForImageClassification(tiny_config(num_labels=3, use_mean_pooling=use_mean_pooling)).eval()
    with torch.no_grad():
        model.mae.embeddings.cls_token.normal_(std=10.0)
        norms = model.fc_norm if use_mean_pooling else model.mae.layernorm
        for parameter in (*model.classifier.parameters(), *norms.parameters()):
            parameter.normal_()
        pixel_values = torch.randn(2, 3, 16, 16)
        last_block = model.mae(pixel_values, output_hidden_states=True).hidden_states[-1]  # (B, 1 + 16, D)
        pooled = last_block[:, 1:17].sum(dim=1) / 16 if use_mean_pooling else last_block[:, 0]
        normalised = F.layer_norm(pooled, (32,), norms.weight, norms.bias, eps=model.config.layer_norm_eps)
        expected = normalised @ model.classifier.weight.T + model.classifier.bias
        torch.testing.assert_close(model(pixel_values).logits, expected, atol=1e-5, rtol=1e-5)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


MIXED_TARGETS = torch.tensor([[0.8, 0.2, 0.0], [0.1, 0.1, 0.8], [0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
MULTI_HOT = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
PROBLEMS = {  # problem_type, num_labels, labels of 4 images, the loss computed here with torch's own functions
    "regression, one output": ("regression", 1, torch.randn(4), lambda x, y: torch.nn.MSELoss()(x.squeeze(-1), y)),
    "regression, three outputs": ("regression", 3, torch.randn(4, 3), torch.nn.MSELoss()),
    "single label": ("single_label_classification", 3, torch.tensor([0, 2, 1, 2]), torch.nn.CrossEntropyLoss()),
    "single label, MixUp targets": ("single_label_classification", 3, MIXED_TARGETS, soft_cross_entropy),
    "multi label": ("multi_label_classification", 3, MULTI_HOT, torch.nn.BCEWithLogitsLoss()),
}
INFERRED = ["regression, one output", "single label", "multi label"]  # unset: what transformers' rule picks


@pytest.mark.parametrize("case", PROBLEMS)
def test_each_problem_type_computes_torchs_loss(case: str) -> None:
    problem_type, num_labels, labels, reference = PROBLEMS[case]
    model = MAEForImageClassification(tiny_config(num_labels=num_labels, problem_type=problem_type)).eval()
    out = model(torch.randn(4, 3, 16, 16), labels=labels)
    torch.testing.assert_close(out.loss, reference(out.logits, labels))


@pytest.mark.parametrize("case", INFERRED)
def test_unset_problem_type_is_inferred_from_num_labels_and_label_dtype_and_recorded(case: str, tmp_path) -> None:
    """As in transformers: one output is a regression, integer labels single-label, float labels multi-label. The
    type is written into the config, so a saved model keeps it (pipelines pick softmax or sigmoid by it)."""
    problem_type, num_labels, labels, reference = PROBLEMS[case]
    model = MAEForImageClassification(tiny_config(num_labels=num_labels)).eval()
    assert model.config.problem_type is None
    out = model(torch.randn(4, 3, 16, 16), labels=labels)
    torch.testing.assert_close(out.loss, reference(out.logits, labels))
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).problem_type == problem_type


def test_finetuning_classifier_takes_mixup_targets_as_single_label() -> None:
    """run_finetune's MixUp/CutMix targets are float: its classifier says single-label, so they get cross-entropy,
    not the multi-label BCE that transformers' rule would infer."""
    from modeling_mae.evaluation.arguments import FinetuneModelArguments
    from modeling_mae.loops.finetuning_setup import build_classifier

    model = build_classifier(FinetuneModelArguments(model_config="tiny-32px"), ["cat", "dog", "fox"], {}).eval()
    out = model(torch.randn(4, 3, 32, 32), labels=MIXED_TARGETS)
    torch.testing.assert_close(out.loss, soft_cross_entropy(out.logits, MIXED_TARGETS))


def test_trainer_with_gradient_accumulation_makes_the_full_batch_update(tmp_path) -> None:
    """transformers' `Trainer` reads a forward with `**kwargs` as a loss normalised by `num_items_in_batch` and then
    skips dividing by the accumulation steps: our mean losses must say they are not (`accepts_loss_kwargs`).
    One SGD step on 4 images: a batch of 4 and 2 accumulated batches of 2 move the weights the same."""
    from transformers import Trainer, TrainingArguments

    model = MAEForImageClassification(tiny_config(num_labels=3))
    data = [{"pixel_values": torch.randn(3, 16, 16), "labels": torch.tensor(index % 3)} for index in range(4)]

    def update(batch_size: int, accumulation: int) -> torch.Tensor:
        trained = copy.deepcopy(model)
        args = TrainingArguments(
            str(tmp_path / f"run{accumulation}"), per_device_train_batch_size=batch_size, max_steps=1,
            gradient_accumulation_steps=accumulation, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=0.0, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        )
        Trainer(model=trained, args=args, train_dataset=data).train()
        return trained.classifier.weight.detach() - model.classifier.weight.detach()

    whole, accumulated = update(4, 1), update(2, 2)
    assert whole.abs().sum() > 0
    torch.testing.assert_close(accumulated, whole)


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("index", range(4), ids=["MAEModel", "MAEForPreTraining", "classifier-avg", "classifier-cls"])
def test_save_and_load_round_trip_keeps_every_weight(index: int, tmp_path) -> None:
    """`from_pretrained` loads every tensor as saved and initialises none of them again: the weights are drawn far
    from any initialisation (LayerNorms not 1, tables not sin-cos), so a re-initialised one would show."""
    model = every_model_class()[index].eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    assert reloaded.config.to_diff_dict() == model.config.to_diff_dict()
    inputs = {"noise": torch.rand(2, 16)} if isinstance(model, MAEForPreTraining) else {}
    pixel_values = torch.randn(2, 3, 16, 16)
    for key, value in model(pixel_values, **inputs).items():
        torch.testing.assert_close(reloaded(pixel_values, **inputs)[key], value, msg=key)


@pytest.mark.parametrize("index", range(4), ids=["MAEModel", "MAEForPreTraining", "classifier-avg", "classifier-cls"])
def test_a_loaded_model_trains_what_a_fresh_one_trains(index: int, tmp_path) -> None:
    """The sin-cos tables stay frozen through `from_pretrained` (transformers makes every loaded weight trainable),
    also through the Auto classes and with `output_loading_info`."""
    model = every_model_class()[index]
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert frozen and all(name.endswith("position_embeddings") for name in frozen)
    model.save_pretrained(tmp_path)
    reloaded, _ = type(model).from_pretrained(tmp_path, output_loading_info=True)
    auto = AutoModelForPreTraining.from_pretrained(tmp_path) if index == 1 else None
    for loaded in filter(None, (reloaded, auto)):
        assert {name for name, parameter in loaded.named_parameters() if not parameter.requires_grad} == frozen


MISSING_FROM_CHECKPOINT = [  # one tensor of each module whose other tensors are loaded
    "mae.embeddings.cls_token",  # the module's position table is loaded
    "mae.embeddings.patch_embeddings.projection.bias",  # the convolution's weight is loaded
    "decoder.mask_token",  # the decoder's position table is loaded
    "mae.encoder.layers.0.attention.qkv.bias",
    "mae.encoder.layers.1.norm2.weight",
]


def test_from_pretrained_initialises_the_missing_tensors_only(tmp_path) -> None:
    """A checkpoint that lacks some tensors: those get the official init, the loaded ones next to them in the same
    module stay as saved (transformers skips only whole modules whose tensors all loaded, so `_init_weights` must
    leave loaded tensors alone)."""
    model = MAEForPreTraining(tiny_config())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    model.save_pretrained(tmp_path)
    saved = {name: tensor for name, tensor in model.state_dict().items() if name not in MISSING_FROM_CHECKPOINT}
    save_file({name: tensor.contiguous() for name, tensor in saved.items()}, tmp_path / "model.safetensors")
    reloaded = MAEForPreTraining.from_pretrained(tmp_path)
    state = reloaded.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert 0.005 < state["mae.embeddings.cls_token"].std() < 0.04 and 0.005 < state["decoder.mask_token"].std() < 0.04
    assert state["mae.embeddings.patch_embeddings.projection.bias"].abs().max() <= (3 * 4 * 4) ** -0.5
    assert state["mae.encoder.layers.0.attention.qkv.bias"].eq(0).all()
    assert state["mae.encoder.layers.1.norm2.weight"].eq(1).all()


def test_a_pretrained_encoder_loads_into_the_classifier_with_a_new_official_head(tmp_path) -> None:
    pretraining = MAEForPreTraining(tiny_config())
    with torch.no_grad():
        for parameter in pretraining.parameters():
            parameter.normal_()
    pretraining.save_pretrained(tmp_path)
    classifier = MAEForImageClassification.from_pretrained(tmp_path, num_labels=4, use_mean_pooling=False)
    for name, tensor in pretraining.mae.state_dict().items():
        assert torch.equal(classifier.mae.state_dict()[name], tensor), name
    assert 0 < classifier.classifier.weight.std() < 1e-4 and classifier.classifier.bias.eq(0).all()
    encoder = MAEModel.from_pretrained(tmp_path)
    for name, tensor in pretraining.mae.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor), name


# ---------------------------------------------------------------------------------------------- hidden states, export


def attention_weights(layer: torch.nn.Module, hidden_states: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) of a block on its input `(B, N, D)`, from its weights: `(B, heads, N, N)`."""
    normed = torch.nn.functional.layer_norm(
        hidden_states, hidden_states.shape[-1:], layer.norm1.weight, layer.norm1.bias, layer.norm1.eps
    )
    qkv = torch.nn.functional.linear(normed, layer.attention.qkv.weight, layer.attention.qkv.bias)
    query, key, _ = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, head_dim)
    return torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1)


@pytest.mark.parametrize("model_class", [MAEModel, MAEForPreTraining, MAEForImageClassification])
def test_hidden_states_and_attentions_of_each_class(model_class) -> None:
    """One hidden state per encoder layer input plus the last output (before the final norm), one attention map per
    encoder layer; the decoder's layers are not recorded (3 encoder layers, 1 decoder layer here). Values: the
    embeddings, then each layer applied to the one before; the attention maps computed from the layers' weights."""
    config = tiny_config(num_labels=3, num_hidden_layers=3)
    model = model_class._from_config(config, attn_implementation="eager").eval()
    encoder = model if model_class is MAEModel else model.mae
    pixel_values, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    masking = {"noise": noise} if model_class is MAEForPreTraining else {}
    out = model(pixel_values, output_hidden_states=True, output_attentions=True, **masking)
    keep = noise.argsort(dim=1)[:, :4] if masking else None  # the 4 patches of least noise
    tokens = 1 + (4 if masking else 16)
    assert len(out.hidden_states) == 4 and len(out.attentions) == 3
    assert {h.shape for h in out.hidden_states} == {(2, tokens, 32)}
    assert {a.shape for a in out.attentions} == {(2, 2, tokens, tokens)}
    torch.testing.assert_close(out.hidden_states[0], encoder.embeddings(pixel_values, keep_index=keep))
    for depth, layer in enumerate(encoder.encoder.layers):
        torch.testing.assert_close(out.hidden_states[depth + 1], layer(out.hidden_states[depth])[0])
        torch.testing.assert_close(out.attentions[depth], attention_weights(layer, out.hidden_states[depth], 2))
    if model_class is MAEModel:
        torch.testing.assert_close(out.last_hidden_state, encoder.layernorm(out.hidden_states[-1]))
    # Off by default; on through the config too; in the tuple when return_dict=False, after the loss and logits.
    plain = model(pixel_values, **masking)
    assert plain.hidden_states is None and plain.attentions is None
    model.config.output_hidden_states = True
    torch.testing.assert_close(model(pixel_values, **masking).hidden_states, out.hidden_states)
    as_tuple = model(pixel_values, return_dict=False, **masking)
    torch.testing.assert_close(as_tuple[-1], out.hidden_states)


@pytest.mark.parametrize("model_class", [MAEModel, MAEForPreTraining, MAEForImageClassification])
def test_torch_export_equals_eager(model_class) -> None:
    """`torch.export` (ExecuTorch, AOTInductor, serving) traces each class to one graph, which gives the eager
    outputs, also on inputs other than the traced ones."""
    model = model_class(tiny_config(num_labels=3)).eval()

    def inputs() -> tuple[torch.Tensor, ...]:
        pixel_values = torch.randn(2, 3, 16, 16)
        return (pixel_values, torch.rand(2, 16)) if model_class is MAEForPreTraining else (pixel_values,)

    exported = torch.export.export(model, inputs()).module()
    for args in (inputs(), inputs()):
        expected, actual = model(*args), exported(*args)
        assert actual.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], msg=key)


# ---------------------------------------------------------------------------------------------- hub


def test_save_pretrained_writes_a_self_contained_folder(tmp_path) -> None:
    model = MAEForPreTraining(tiny_config())
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_mae.py", "modeling_mae.py",
            "preprocessor_config.json"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForImageClassification"}
    processor = AutoImageProcessor.from_pretrained(tmp_path)  # no custom code needed
    assert processor.size == {"height": 16, "width": 16} and list(processor.image_mean) == [0.485, 0.456, 0.406]


def test_auto_classes_load_the_right_models(tmp_path) -> None:
    pretraining = MAEForPreTraining(tiny_config()).eval()
    pretraining.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is MAEConfig
    assert type(AutoModelForPreTraining.from_pretrained(tmp_path)) is MAEForPreTraining
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(encoder) is MAEModel
    pixel_values = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(
        encoder(pixel_values).last_hidden_state, pretraining.mae(pixel_values).last_hidden_state
    )
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=4)
    assert type(classifier) is MAEForImageClassification and classifier.classifier.out_features == 4


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.modules["modeling_mae"] = None  # this process cannot import the package: remote code only
    from transformers import AutoModel, AutoModelForPreTraining
    folder, noise_file, out_file = sys.argv[1:]
    model = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = torch.load(noise_file)
    with torch.no_grad():
        out = model(inputs["pixel_values"], noise=inputs["noise"])
        features = encoder(inputs["pixel_values"]).last_hidden_state
    torch.save({"logits": out.logits, "loss": out.loss, "features": features}, out_file)
    """
)


def test_remote_code_in_a_process_without_the_package(tmp_path, hf_home) -> None:
    model = MAEForPreTraining(tiny_config(norm_pix_loss=True)).eval()
    model.save_pretrained(tmp_path / "model")
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16), "noise": torch.rand(2, 16)}
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    remote = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        local = model(inputs["pixel_values"], noise=inputs["noise"])
        features = model.mae(inputs["pixel_values"]).last_hidden_state
    torch.testing.assert_close(remote["logits"], local.logits)
    torch.testing.assert_close(remote["loss"], local.loss)
    torch.testing.assert_close(remote["features"], features)


def test_image_classification_pipeline(tmp_path) -> None:
    config = tiny_config(num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"}, label2id={"cat": 0, "dog": 1, "fox": 2})
    MAEForImageClassification(config).save_pretrained(tmp_path)
    classify = pipeline("image-classification", model=str(tmp_path))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    predictions = classify(image, top_k=3)
    assert {p["label"] for p in predictions} == {"cat", "dog", "fox"}
    assert abs(sum(p["score"] for p in predictions) - 1) < 1e-4


# ---------------------------------------------------------------------------------------------- channels, statistics


def test_image_statistics_default_by_channel_count_follow_overrides_and_are_validated() -> None:
    """ImageNet's statistics for RGB, 0.5/0.5 per channel otherwise; `num_channels=1` on an RGB preset takes the new
    count's defaults (not ImageNet's three means), statistics given for it are kept; wrong lengths and zero stds are
    one line naming the field and the channel."""
    assert (MAEConfig().image_mean, MAEConfig().image_std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert (tiny_config(num_channels=4).image_mean, tiny_config(num_channels=4).image_std) == ([0.5] * 4, [0.5] * 4)
    assert MAEConfig().rescale_factor == 1 / 255
    gray = load_config("tiny-32px", "num_channels=1")
    assert (gray.num_channels, gray.image_mean, gray.image_std) == (1, [0.5], [0.5])
    assert load_config("tiny-32px", "num_channels=2,image_std=[0.1,0.2]").image_std == [0.1, 0.2]
    with pytest.raises(ValueError, match=r"^image_mean has 3 values \(\[0.1, 0.2, 0.3\]\) for num_channels=1: give"):
        tiny_config(num_channels=1, image_mean=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"^image_std of channel 1 is 0.0: every std must be a positive number$"):
        tiny_config(image_std=[0.2, 0.0, 0.2])
    with pytest.raises(ValueError, match="rescale_factor must be a positive number, got 0"):
        tiny_config(rescale_factor=0)


def gray_pixels(values: np.ndarray, config: MAEConfig) -> torch.Tensor:
    """numpy's `(value * rescale_factor - mean) / std` of a (H, W) image at the model's size: `(1, 1, H, W)`."""
    normalised = (values.astype(np.float64) * config.rescale_factor - config.image_mean[0]) / config.image_std[0]
    return torch.from_numpy(normalised).float()[None, None]


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_exported_processor_prepares_gray_images_with_the_configs_statistics(backend: str, tmp_path) -> None:
    """transformers' own processor, reloaded from the folder, keeps a PIL "L" image and an (H, W, 1) array as one
    channel, normalised with the config's mean, std and rescale factor (numpy on the same values). 16-bit images
    take the torchvision backend, transformers' default: the PIL one resizes through 8-bit PIL images and refuses
    them."""
    config = tiny_config(num_channels=1, image_mean=[0.3], image_std=[0.2])
    MAEModel(config).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
    values = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    for image in (Image.fromarray(values), values[..., None]):
        torch.testing.assert_close(processor(image, return_tensors="pt").pixel_values, gray_pixels(values, config))
    deep = tiny_config(num_channels=1, image_mean=[0.3], image_std=[0.2], rescale_factor=1 / 65535)
    MAEModel(deep).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
    values = np.random.default_rng(1).integers(0, 65536, (16, 16), dtype=np.uint16)
    if backend == "pil":
        with pytest.raises(ValueError, match="outside the range"):
            processor(Image.fromarray(values), return_tensors="pt")
        return
    for image in (Image.fromarray(values), values[..., None]):  # PIL mode "I;16"
        torch.testing.assert_close(processor(image, return_tensors="pt").pixel_values, gray_pixels(values, deep))


@pytest.mark.parametrize("num_channels", [4, 5])
def test_exported_processor_prepares_multiband_arrays_channels_last_and_first(num_channels: int, tmp_path) -> None:
    """transformers finds the channel axis of 1, 3 or 4 channels itself; for 5 the folder records channels-last,
    and a (C, H, W) array says `input_data_format="channels_first"`. Each band normalised with its own statistics."""
    mean, std = [0.1 * (band + 1) for band in range(num_channels)], [0.5 + 0.1 * band for band in range(num_channels)]
    MAEModel(tiny_config(num_channels=num_channels, image_mean=mean, image_std=std)).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    values = np.random.default_rng(0).integers(0, 256, (16, 16, num_channels), dtype=np.uint8)
    normalised = (values.transpose(2, 0, 1) / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    expected = torch.from_numpy(normalised).float()[None]  # (1, C, H, W)
    channels_first = {"input_data_format": "channels_first"} if num_channels == 5 else {}
    for image, layout in ((values, {}), (np.ascontiguousarray(values.transpose(2, 0, 1)), channels_first)):
        torch.testing.assert_close(processor(image, return_tensors="pt", **layout).pixel_values, expected)


def test_feature_extraction_pipeline_takes_16_bit_gray_images_and_four_band_arrays(tmp_path, hf_home) -> None:
    """transformers' own pipeline converts every input to 8-bit RGB and refuses arrays; the folder of a 1- or
    4-channel model names our pipeline, which gives the features of the pixels numpy normalises from the same file,
    PIL image or array."""
    config = tiny_config(num_channels=1, image_mean=[0.4], image_std=[0.25], rescale_factor=1 / 65535)
    encoder = MAEModel(config).eval()
    encoder.save_pretrained(tmp_path / "gray")
    values = np.random.default_rng(0).integers(0, 65536, (16, 16), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "scan.png")
    extract = pipeline("image-feature-extraction", model=str(tmp_path / "gray"), trust_remote_code=True)
    with torch.no_grad():
        expected = encoder(gray_pixels(values, config)).last_hidden_state
    for image in (str(tmp_path / "scan.png"), Image.open(tmp_path / "scan.png"), values[..., None]):
        torch.testing.assert_close(extract(image, return_tensors=True), expected)
    bands = tiny_config(num_channels=4, image_mean=[0.5] * 4, image_std=[0.25] * 4)
    encoder = MAEModel(bands).eval()
    encoder.save_pretrained(tmp_path / "bands")
    values = np.random.default_rng(1).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    extract = pipeline("image-feature-extraction", model=str(tmp_path / "bands"), trust_remote_code=True)
    with torch.no_grad():
        pixels = torch.from_numpy((values.transpose(2, 0, 1) / 255 - 0.5) / 0.25).float()[None]
        torch.testing.assert_close(extract(values, return_tensors=True), encoder(pixels).last_hidden_state)


def rgb_kernels_written_out(kernels: torch.Tensor, num_channels: int) -> torch.Tensor:
    """timm's rules by hand, for the channel counts the tests use: R+G+B for 1 channel; R, G, B, R, ... times 3/C."""
    red, green, blue = kernels[:, 0:1], kernels[:, 1:2], kernels[:, 2:3]
    if num_channels == 1:
        return red + green + blue
    cycle = {4: [red, green, blue, red], 6: [red, green, blue, red, green, blue]}[num_channels]
    return torch.cat(cycle, dim=1) * 3 / num_channels


@pytest.mark.parametrize("num_channels", [1, 4, 6])
def test_from_pretrained_num_channels_adapts_rgb_weights_by_timms_rules(num_channels: int, tmp_path, caplog) -> None:
    """`from_pretrained(folder, num_channels=C)`: the patch kernels written out by hand (summed; repeated and scaled
    by 3/C), the decoder's pixel rows derived (the mean of R, G, B for gray; R, G, B, R, ... copied), the statistics
    by the same rule, and the rule in the log. So a gray image, or six bands that are two copies of an RGB image,
    give the RGB model's features; for gray, its predictions' gray."""
    rgb = MAEForPreTraining(tiny_config()).eval()
    rgb.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        adapted = MAEForPreTraining.from_pretrained(tmp_path, num_channels=num_channels)
    assert ("summed" if num_channels == 1 else f"scaled by 3/{num_channels}") in caplog.text
    kernels = rgb.mae.embeddings.patch_embeddings.projection.weight.detach()  # (32, 3, 4, 4)
    torch.testing.assert_close(adapted.mae.embeddings.patch_embeddings.projection.weight,
                               rgb_kernels_written_out(kernels, num_channels))
    rows = rgb.decoder.pred.weight.detach().view(16, 3, 16)  # (p * q, RGB, D_dec): patchify's order
    expected_rows = rows.mean(dim=1, keepdim=True) if num_channels == 1 else rows[:, [0, 1, 2, 0, 1, 2][:num_channels]]
    torch.testing.assert_close(adapted.decoder.pred.weight, expected_rows.reshape(16 * num_channels, 16))
    if num_channels == 1:
        assert adapted.config.image_mean == pytest.approx([0.449])
        assert adapted.config.image_std == pytest.approx([0.226])
    else:
        assert adapted.config.image_mean == [0.485, 0.456, 0.406, 0.485, 0.456, 0.406][:num_channels]
    gray = torch.randn(2, 1, 16, 16)
    inputs = gray if num_channels == 1 else torch.randn(2, 3, 16, 16)
    rgb_inputs = gray.expand(-1, 3, -1, -1) if num_channels == 1 else inputs
    if num_channels == 6:
        inputs = torch.cat([inputs, inputs], dim=1)
    if num_channels != 4:
        noise = torch.rand(2, 16)
        with torch.no_grad():
            out, rgb_out = adapted(inputs, noise=noise), rgb(rgb_inputs, noise=noise)
        torch.testing.assert_close(adapted.mae(inputs).last_hidden_state, rgb.mae(rgb_inputs).last_hidden_state)
        rgb_logits = rgb_out.logits.view(2, 16, 16, 3)
        expected = rgb_logits.mean(dim=-1) if num_channels == 1 else torch.cat([rgb_logits, rgb_logits], dim=-1)
        torch.testing.assert_close(out.logits, expected.reshape(2, 16, -1))


def test_another_channel_count_without_num_channels_stays_an_error(tmp_path) -> None:
    """A config of 1 channel for RGB weights is transformers' size-mismatch error (nothing silently re-initialised);
    only RGB weights adapt."""
    MAEForPreTraining(tiny_config()).save_pretrained(tmp_path / "rgb")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        MAEForPreTraining.from_pretrained(tmp_path / "rgb", config=tiny_config(num_channels=1))
    MAEModel(tiny_config(num_channels=1)).save_pretrained(tmp_path / "gray")
    with pytest.raises(ValueError, match=r"^only RGB \(3-channel\) weights adapt to another .*; these have 1 channels$"):
        MAEModel.from_pretrained(tmp_path / "gray", num_channels=4)


def test_the_model_card_states_the_channels_statistics_and_rescale_factor() -> None:
    config = tiny_config(num_channels=1, num_labels=2, image_mean=[0.449], image_std=[0.226], rescale_factor=1 / 65535)
    card = finetuning_card(config, model_name_or_path=None, model_config=None, seed=0, dataset_name=None,
                           layer_decay=0.75, mixup=0.0, cutmix=0.0, label_smoothing=0.1, results={})
    assert "| input | 1 channel, pixel values x 1/65535, normalised with mean [0.449], std [0.226] |" in card
