"""The benchmark runs end to end at a toy size, and its fast paths compute what the plain ones do.

(Our model against transformers' ViTMAE on converted weights and eager against SDPA attention are guarded in
test_conversion.py and test_modeling.py.)
"""

from __future__ import annotations

import importlib.util
import io
import json
import pathlib
import random
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from modeling_mae import MAEConfig, MAEForPreTraining
from modeling_mae.data.fast_decode import (
    FastPretrainTransform,
    dct_reduction,
    sample_crop,
)
from modeling_mae.interop.conversion import (
    convert_transformers_state_dict,
    export_to_vit,
)
from modeling_mae.studies.benchmark import (
    encode_all_patches,
    kernel_time_shares,
    mask_token_loss,
    pretraining_flops,
    vitmae_config,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _load_benchmark():
    path = pathlib.Path(__file__).resolve().parents[1] / "run_scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load_benchmark()


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, quality=95) if fmt == "JPEG" else Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth content, so a reduced-size decode and a full decode + resize agree closely."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC))


def _reference(image: Image.Image, seed: int, size: int) -> torch.Tensor:
    """The plain path with the crop and flip that `FastPretrainTransform(seed=seed)` draws: crop, resize, normalise."""
    rng = random.Random(seed)
    left, top, width, height = sample_crop(*image.size, (0.2, 1.0), rng=rng)
    crop = image.convert("RGB").crop((left, top, left + width, top + height))
    crop = crop.resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255
    return (pixels - MEAN) / STD


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the benchmark sets its own count


def test_benchmark_runs_and_writes_json_and_markdown(tmp_path, keep_threads) -> None:
    results = benchmark.main([
        "--device", "cpu", "--sizes", "tiny-32px", "--attn", "sdpa", "--threads", "1", "--batch_size", "2",
        "--iterations", "1", "--warmup", "0", "--jpeg_sizes", "64x48", "--data_images", "2", "--data_rounds", "1",
        "--profile", "--sdpa_backends", "flash_attention,math", "--output_dir", str(tmp_path),
    ])
    assert results["errors"] == [] and results["meta"]["sdpa_backends"] == "flash_attention,math"
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    train, asymmetric, data = saved["train"][0], saved["asymmetric"][0], saved["data"][0]
    assert {"transformers", "ours"} <= set(train["variants"])
    variants = train["variants"]
    assert_speedup_of_the_timings(train["speedup"]["ours"], variants["transformers"], variants["ours"])
    assert saved["attention"][0]["backends"]["decoder"]["ms"]["MATH"] > 0  # math runs on every device
    step = asymmetric["step"]
    assert_speedup_of_the_timings(asymmetric["speedup_step"], step["mask_tokens"], step["visible_only"])
    encoder_rates = asymmetric["encoder_images_per_s"]  # batch / median: the speedup is the ratio of the rates
    assert asymmetric["speedup_encoder"]["of_medians"] == pytest.approx(
        encoder_rates["visible_only"] / encoder_rates["mask_tokens"])
    assert asymmetric["flops_ratio_step"] > 1
    assert data["speedup"]["plain PIL + torchvision"] == pytest.approx(1.0)
    table = (tmp_path / "benchmark.md").read_text()
    assert "| tiny-32px | sdpa | 2 |" in table and "## Data path" in table
    assert "aten::" in (tmp_path / "profile_tiny-32px_sdpa_ours.txt").read_text()  # the ops of our step, by time


def assert_speedup_of_the_timings(speedup: dict[str, float], slow: dict, fast: dict) -> None:
    """A reported speedup of `fast` over `slow` is what their recorded step times say: the ratio of the medians and
    the median of the round-by-round ratios (> 1 when `fast` is faster)."""
    assert speedup["of_medians"] == pytest.approx(statistics.median(slow["samples_s"]) /
                                                  statistics.median(fast["samples_s"]))
    assert speedup["of_medians"] == pytest.approx(fast["images_per_s"] / slow["images_per_s"])
    paired = [s / f for s, f in zip(slow["samples_s"], fast["samples_s"])]
    assert speedup["paired_median"] == pytest.approx(statistics.median(paired))
    assert speedup["cpu_time"] == pytest.approx(slow["median_cpu_s"] / fast["median_cpu_s"])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_timed_training_steps_compute_the_same_loss_and_gradients(attn: str) -> None:
    """The benchmark compares equal results: on the same weights, images and mask, our training step and transformers'
    give the same loss and the same gradients (their q/k/v gradients are the rows of our fused qkv's)."""
    from transformers import ViTMAEForPreTraining

    config = MAEConfig.from_preset("tiny-32px", num_hidden_layers=2)
    reference = ViTMAEForPreTraining._from_config(vitmae_config(config), attn_implementation=attn).train()
    reference.vit.embeddings.position_embeddings.data.normal_()  # a fresh ViTMAE's tables are zeros
    reference.decoder.decoder_pos_embed.data.normal_()
    ours = MAEForPreTraining._from_config(config, attn_implementation=attn).train()
    ours.load_state_dict(convert_transformers_state_dict(reference.state_dict()))
    pixel_values, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    expected = reference(pixel_values, noise=noise).loss
    actual = ours(pixel_values, noise=noise, logits_to_keep="masked").loss  # as the benchmark times it
    expected.backward()
    actual.backward()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    reference_grads = {k: p.grad for k, p in reference.named_parameters() if p.grad is not None}
    our_grads = convert_transformers_state_dict(reference_grads)
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, our_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_training_flops_count_the_visible_encoder_and_the_full_decoder() -> None:
    config = MAEConfig.from_preset("large")
    visible, all_patches = pretraining_flops(config, 1), pretraining_flops(config, 1, False)
    assert visible == pytest.approx(3 * 41.5e9, rel=0.01)  # ViT-L/16 + 8-block decoder, 49 of 196 patches kept
    assert 3.0 < all_patches / visible < 3.5  # the paper's 3.3x FLOPs (Table 2c)


def test_mask_token_baseline_without_masking_is_the_plain_encoder() -> None:
    """The asymmetric comparison's baseline shares the model's modules: with nothing masked it is the encoder."""
    config = MAEConfig.from_preset("tiny-32px", mask_ratio=0.0)
    model = MAEForPreTraining(config).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    latent, mask = encode_all_patches(model, torch.nn.Parameter(torch.randn(1, 1, 192)), pixel_values)
    assert mask.sum() == 0
    torch.testing.assert_close(latent, model.mae(pixel_values).last_hidden_state)
    loss = mask_token_loss(model, torch.nn.Parameter(torch.zeros(1, 1, 192)), pixel_values)
    assert torch.isfinite(loss)


def test_mask_token_baseline_is_a_vit_with_mask_tokens_and_the_vitmae_decoder() -> None:
    """The asymmetric comparison's baseline against transformers on the same weights and mask: its encoder is
    `ViTModel(use_mask_token=True)` given the masked positions (mask token + position, every patch encoded), its loss
    ViTMAE's decoder over all those tokens (no mask token left to add) and ViTMAE's masked-patch loss."""
    from transformers import ViTMAEForPreTraining, ViTModel

    config = MAEConfig.from_preset("tiny-32px", num_hidden_layers=2, norm_pix_loss=True)
    reference = ViTMAEForPreTraining(vitmae_config(config)).eval()
    # Position tables that matter (a fresh ViTMAE's are zeros): the mask tokens must carry theirs.
    reference.vit.embeddings.position_embeddings.data.normal_()
    reference.decoder.decoder_pos_embed.data.normal_()
    model = MAEForPreTraining(config).eval()
    model.load_state_dict(convert_transformers_state_dict(reference.state_dict()))
    vit_config, vit_weights = export_to_vit(model)
    vit = ViTModel(vit_config, add_pooling_layer=False, use_mask_token=True).eval()
    assert vit.load_state_dict({k.removeprefix("vit."): v for k, v in vit_weights.items()}, strict=False).missing_keys \
        == ["embeddings.mask_token"]
    mask_token = torch.nn.Parameter(torch.randn(1, 1, config.hidden_size))
    vit.embeddings.mask_token.data.copy_(mask_token.data)
    pixel_values = torch.randn(2, 3, 32, 32)

    torch.manual_seed(1)
    latent, mask = encode_all_patches(model, mask_token, pixel_values)
    assert mask.sum(1).tolist() == [48, 48]  # 75% of 64 patches
    with torch.no_grad():
        expected_latent = vit(pixel_values, bool_masked_pos=mask.bool()).last_hidden_state
        torch.testing.assert_close(latent, expected_latent, atol=1e-5, rtol=1e-4)
        logits = reference.decoder(expected_latent, ids_restore=torch.arange(64).expand(2, 64)).logits
        target = reference.patchify(pixel_values)  # the official norm_pix_loss target and masked mean, as ViTMAE's
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        expected_loss = (((logits - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.manual_seed(1)  # the same mask
    torch.testing.assert_close(mask_token_loss(model, mask_token, pixel_values), expected_loss, atol=1e-5,
                               rtol=1e-4)


def test_sample_crop_draws_torchvision_crops() -> None:
    rng = random.Random(0)
    for _ in range(200):
        left, top, width, height = sample_crop(500, 375, (0.2, 1.0), rng=rng)
        assert 0 <= left <= 500 - width and 0 <= top <= 375 - height
        assert 0.2 * 500 * 375 * 0.9 <= width * height <= 500 * 375
        assert 3 / 4 * 0.95 <= width / height <= 4 / 3 * 1.05


def test_dct_reduction_keeps_at_least_the_output_resolution() -> None:
    assert dct_reduction((433, 375), (224, 224)) == 1  # ImageNet-size crops are never reduced
    assert dct_reduction((900, 700), (224, 224)) == 2
    assert dct_reduction((1800, 1792), (224, 224)) == 8


# torch's antialiased bicubic (the fast path's) is a port of PIL's filter (the reference's): they round apart by at
# most 2 grey levels, 2 / 255 / std in normalised units (the smallest std: 0.224).
RESIZE_ATOL = 2 / 255 / 0.224 + 1e-4


@pytest.mark.parametrize("torchvision_decoder", [True, False])  # False: a torchvision without its deprecated decoders
@pytest.mark.parametrize("fmt, image_size, output_size", [("PNG", (320, 240), 64), ("JPEG", (500, 375), 224)])
def test_fast_path_equals_crop_resize_normalise_at_full_resolution(
    fmt, image_size, output_size, torchvision_decoder, monkeypatch
) -> None:
    """A PNG is decoded by PIL, an RGB JPEG by torchvision (a 500x375 photo is never DCT-reduced for 224 px), or by
    PIL where torchvision has no decoder: all give the plain path's crop, resize and normalisation."""
    if not torchvision_decoder:
        monkeypatch.delattr(torchvision.io, "decode_jpeg")
    data = _encoded(_photo(*image_size), fmt)
    for seed in range(4):
        actual = FastPretrainTransform(output_size, seed=seed)(data)
        expected = _reference(Image.open(io.BytesIO(data)), seed=seed, size=output_size)
        assert actual.shape == (3, output_size, output_size) and actual.is_contiguous()
        torch.testing.assert_close(actual, expected, atol=RESIZE_ATOL, rtol=0)
        assert (actual - expected).abs().mean() < 0.002
    per_image = FastPretrainTransform(output_size)(data, rng=random.Random(3))  # a generator per image
    torch.testing.assert_close(per_image, FastPretrainTransform(output_size, seed=3)(data))


def test_reduced_size_jpeg_decode_stays_close_to_the_full_decode() -> None:
    data = _encoded(_photo(2048, 1536), "JPEG")
    seed = next(s for s in range(100) if dct_reduction(sample_crop(2048, 1536, (0.2, 1.0), rng=random.Random(s))[2:],
                                                       (224, 224)) > 1)
    actual = FastPretrainTransform(224, seed=seed)(data)
    expected = _reference(Image.open(io.BytesIO(data)), seed=seed, size=224)
    assert (actual - expected).abs().mean() < 0.03  # ~1.5 grey levels: DCT scaling vs a bicubic downscale


def test_kernel_time_shares_sort_gpu_kernels_by_kind() -> None:
    def event(key: str, microseconds: float, device_type=torch.autograd.DeviceType.CUDA,
              is_user_annotation: bool = False) -> SimpleNamespace:
        return SimpleNamespace(key=key, self_device_time_total=microseconds, device_type=device_type,
                               is_user_annotation=is_user_annotation)

    shares = kernel_time_shares([
        event("sm90_xmma_gemm_bf16bf16_bf16f32", 50), event("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 10),
        event("void pytorch_flash::flash_fwd_kernel<...>", 10),
        event("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_7_64x64x64", 10),
        event("triton_per_fused_native_layer_norm_0", 10),
        event("void at::native::(anonymous namespace)::fused_adam_kernel", 5), event("elementwise_kernel", 5),
        event("aten::mm", 1000, device_type=torch.autograd.DeviceType.CPU),  # a CPU op: not a kernel
        event("Optimizer.step#AdamW.step", 5, is_user_annotation=True),  # spans the Adam kernel: not a kernel
    ])
    assert shares == pytest.approx({"matmul": 0.6, "attention": 0.2, "optimizer": 0.05,
                                    "compiled element-wise": 0.1, "other": 0.05})
