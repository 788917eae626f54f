"""Every recipe flag of every script lands in what the script builds: the optimizer's parameter groups (peak lr and
layer-decay scale, weight decay, betas, eps), the schedule, the model (mask ratio, norm_pix_loss, drop path, pooling,
resolution), the loss (label smoothing, MixUp/CutMix) and the evaluation (k, temperature, pooling).

The checks read the built objects (each script's `setup`/builder, or what a real tiny run passes on), never the parsed
arguments, and compute what the paper's recipe expects independently of `modeling_mae`.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from test_training import ARGUMENT_TYPES, paper_learning_rate, run_args

from modeling_mae.arguments import parse_arguments
from modeling_mae.data.sources import DataArguments
from modeling_mae.evaluation import features
from modeling_mae.evaluation.arguments import (
    AugmentationArguments,
    FinetuneModelArguments,
    FinetuneOptimizationArguments,
    FinetuneRunArguments,
    LinearProbeArguments,
)
from modeling_mae.evaluation.linear_probe import LARS
from modeling_mae.evaluation.metrics import MetricArguments
from modeling_mae.loops import (
    finetuning,
    finetuning_setup,
    pretraining,
    pretraining_setup,
    pretraining_state,
)
from modeling_mae.loops import knn as knn_loop
from modeling_mae.loops import linear_probe as linear_probe_loop
from modeling_mae.training.accelerator import build_accelerator
from run_scripts import run_knn, run_linear_probe

NUM_LAYERS = 2  # conftest's tiny_config
FINETUNE_GROUPS = (FinetuneModelArguments, DataArguments, AugmentationArguments,
                   FinetuneOptimizationArguments, FinetuneRunArguments,
                   MetricArguments)


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def peak_lr_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """`{parameter name: its optimizer group}` (the group's `initial_lr` is the peak of the schedule)."""
    group_of = {id(parameter): group for group in optimizer.param_groups for parameter in group["params"]}
    return {name: group_of[id(parameter)] for name, parameter in model.named_parameters() if id(parameter) in group_of}


def official_layer_id(name: str) -> int:
    """The official `param_groups_lrd.get_layer_id_for_vit`, on our parameter names: CLS token, position table and
    patch embedding 0, block i: i + 1, the rest (fc_norm, head) num_layers + 1."""
    if name.startswith("mae.embeddings."):
        return 0
    if name.startswith("mae.encoder.layers."):
        return int(name.split(".")[3]) + 1
    return NUM_LAYERS + 1


# --------------------------------------------------------------------------------------------------------- run_mae.py


def test_pretraining_flags_reach_the_optimizer_schedule_and_model(data_dir, model_config, tmp_path) -> None:
    flags = run_args(data_dir, model_config, tmp_path, "--mask_ratio", "0.6", "--norm_pix_loss", "true",
                     "--weight_decay", "0.07", "--adam_beta1", "0.8", "--adam_beta2", "0.9", "--adam_epsilon", "1e-6",
                     "--base_learning_rate", "0.02", "--per_device_train_batch_size", "4",
                     "--gradient_accumulation_steps", "2", "--min_lr", "1e-5", "--max_train_steps", "5",
                     "--warmup_steps", "2", "--gradient_checkpointing", "--attn_implementation", "eager",
                     "--max_grad_norm", "0.5")
    trainer = pretraining_setup.setup(pretraining_state.Arguments(*parse_arguments(ARGUMENT_TYPES, flags)))
    model = trainer.unwrapped
    peak = 0.02 * (4 * 2) / 256
    groups = peak_lr_by_name(model, trainer.optimizer)
    assert set(groups) == {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    for name, group in groups.items():
        decayed = model.get_parameter(name).ndim > 1 and not name.endswith(".bias")  # timm's add_weight_decay
        assert (group["weight_decay"], group["initial_lr"]) == (0.07 if decayed else 0.0, pytest.approx(peak)), name
        assert (group["betas"], group["eps"]) == ((0.8, 0.9), 1e-6), name
    schedule = [peak * trainer.scheduler.lr_lambdas[0](step) for step in range(6)]
    assert schedule == pytest.approx([paper_learning_rate(step, 0.02, 8, 2, 5, 1e-5) for step in range(5)] + [1e-5])
    assert trainer.optimizer.optimizer.defaults["fused"]  # one kernel for every tensor (docs/training.md)

    assert (model.config.mask_ratio, model.config.norm_pix_loss, model.config._attn_implementation) == (
        0.6, True, "eager")
    assert model.is_activation_checkpointing
    masked = model(torch.randn(2, 3, 16, 16)).mask.sum(dim=1)
    assert masked.tolist() == [16 - int(16 * (1 - 0.6))] * 2  # the official len_keep = int(L * (1 - mask_ratio))

    for parameter in model.parameters():  # gradients of norm 2 x sqrt(#elements) ...
        parameter.grad = torch.full_like(parameter, 2.0) if parameter.requires_grad else None
    norms = []
    adamw = trainer.optimizer.optimizer
    adamw_step = adamw.step
    adamw.step = lambda *args, **kwargs: (norms.append(gradient_norm(model)), adamw_step(*args, **kwargs))[1]
    pretraining.optimizer_step(trainer, skip=False)
    assert norms == [pytest.approx(0.5)]  # ... clipped to --max_grad_norm before the step


def gradient_norm(model: torch.nn.Module) -> float:
    grads = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    return math.sqrt(sum(grad.double().square().sum().item() for grad in grads))


# ---------------------------------------------------------------------------------------------------- run_finetune.py


def finetune_setup(data_dir: pathlib.Path, model_config: pathlib.Path, tmp_path: pathlib.Path,
                   *flags: str) -> finetuning.Loop:
    argv = ["--dataset_name", str(data_dir), "--model_config", str(model_config), "--output_dir", str(tmp_path),
            "--per_device_train_batch_size", "4", *flags]
    return finetuning_setup.setup(finetuning.Arguments(*parse_arguments(FINETUNE_GROUPS, argv)))


def test_finetune_flags_reach_the_classifier_optimizer_and_schedule(data_dir, model_config, tmp_path) -> None:
    loop = finetune_setup(data_dir, model_config, tmp_path, "--layer_decay", "0.5", "--drop_path_rate", "0.2",
                          "--global_pool", "false", "--image_size", "24", "--train_position_embeddings", "false",
                          "--weight_decay", "0.03", "--adam_beta1", "0.85", "--adam_beta2", "0.99", "--adam_epsilon",
                          "1e-7", "--base_learning_rate", "0.004", "--gradient_accumulation_steps", "2", "--min_lr",
                          "1e-6", "--num_train_epochs", "2", "--warmup_epochs", "0.5")
    model = loop.accelerator.unwrap_model(loop.model)
    assert [layer.drop_path.rate for layer in model.mae.encoder.layers] == pytest.approx([0.0, 0.2])  # linspace
    assert not model.config.use_mean_pooling and model.config.image_size == (24, 24)
    assert model.mae.embeddings.position_embeddings.shape[1] == 1 + 6 * 6
    assert not model.mae.embeddings.position_embeddings.requires_grad

    peak = 0.004 * (4 * 2) / 256
    groups = peak_lr_by_name(model, loop.optimizer)
    assert set(groups) == {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    for name, group in groups.items():
        decayed = model.get_parameter(name).ndim > 1 and not name.endswith((".bias", "cls_token"))
        assert group["weight_decay"] == (0.03 if decayed else 0.0), name
        assert group["initial_lr"] == pytest.approx(peak * 0.5 ** (NUM_LAYERS + 1 - official_layer_id(name))), name
        assert (group["betas"], group["eps"]) == ((0.85, 0.99), 1e-7), name
    # 64 images / 4 = 16 micro-batches = 8 steps per epoch: 16 steps, 4 of warmup, cosine down to min_lr.
    assert (loop.plan.total_steps, loop.plan.warmup_steps) == (16, 4)
    schedule = [peak * loop.scheduler.lr_lambdas[0](step) for step in range(17)]
    assert schedule == pytest.approx([paper_learning_rate(step, 0.004, 8, 4, 16, 1e-6) for step in range(16)] + [1e-6])


def test_finetune_defaults_are_the_papers_recipe(data_dir, model_config, tmp_path) -> None:
    loop = finetune_setup(data_dir, model_config, tmp_path, "--mixup", "0", "--cutmix", "0.5")
    model = loop.accelerator.unwrap_model(loop.model)
    assert model.config.use_mean_pooling and model.mae.embeddings.position_embeddings.requires_grad
    assert [layer.drop_path.rate for layer in model.mae.encoder.layers] == pytest.approx([0.0, 0.1])
    groups = peak_lr_by_name(model, loop.optimizer)
    peak = 1e-3 * 4 / 256
    head, cls_token = groups["classifier.weight"], groups["mae.embeddings.cls_token"]
    assert (head["initial_lr"], head["weight_decay"], head["betas"]) == (pytest.approx(peak), 0.05, (0.9, 0.999))
    assert cls_token["initial_lr"] == pytest.approx(peak * 0.75 ** (NUM_LAYERS + 1)) and cls_token["weight_decay"] == 0
    # CutMix alone: every mixed pixel comes from one image or the other, never a blend.
    torch.manual_seed(0)
    for _ in range(20):
        pixels, targets = loop.mixer(torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]), torch.tensor([0, 1]))
        assert set(pixels.unique().tolist()) <= {0.0, 1.0}
        assert targets[0, 2] == pytest.approx(0.1 / 3)  # default label smoothing 0.1, class 2 in neither image


def test_finetune_mixing_flags_reach_the_mixer(data_dir, model_config, tmp_path) -> None:
    """MixUp alone with alpha 0.3 and smoothing 0.2: each image is a uniform blend `lam x + (1 - lam) x'`, the
    target the same blend of the two one-hot labels, smoothed; lam follows Beta(0.3, 0.3) (variance 1/6.4).
    (And --learning_rate replaces the scaled base lr.)"""
    loop = finetune_setup(data_dir, model_config, tmp_path, "--mixup", "0.3", "--cutmix", "0", "--label_smoothing",
                          "0.2", "--learning_rate", "2e-4")
    groups = peak_lr_by_name(loop.accelerator.unwrap_model(loop.model), loop.optimizer)
    assert groups["classifier.weight"]["initial_lr"] == pytest.approx(2e-4)
    torch.manual_seed(0)
    lams = []
    for _ in range(400):
        pixels, targets = loop.mixer(torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]), torch.tensor([0, 1]))
        lam = 1.0 - pixels[0, 0, 0, 0].item()  # image 0 = lam * zeros + (1 - lam) * ones
        torch.testing.assert_close(pixels[0], torch.full((3, 8, 8), 1.0 - lam))
        expected = torch.tensor([lam * 0.8 + 0.2 / 3, (1 - lam) * 0.8 + 0.2 / 3, 0.2 / 3])
        torch.testing.assert_close(targets[0], expected)
        lams.append(lam)
    variance = torch.tensor(lams).var().item()
    assert variance == pytest.approx(1 / (4 * (2 * 0.3 + 1)), abs=0.025)  # alpha 0.8 (the default): 0.096


# ------------------------------------------------------------------------------------------------ run_linear_probe.py


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_linear_probe_flags_reach_its_optimizer_and_schedule(optimizer: str, tmp_path) -> None:
    probe = parse_arguments((LinearProbeArguments,), [
        "--optimizer", optimizer, "--weight_decay", "0.01", "--base_learning_rate", "0.2",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--num_train_epochs", "3",
        "--warmup_epochs", "1", "--output_dir", str(tmp_path)])[0]
    accelerator = build_accelerator(2, tmp_path)
    training = linear_probe_loop.build_head_training(accelerator, probe, feature_dim=6, num_classes=3,
                                                    batches_per_epoch=17)
    inner = training.optimizer.optimizer
    assert type(inner) is (LARS if optimizer == "lars" else torch.optim.SGD)
    peak = 0.2 * (4 * 2) / 256
    for group in inner.param_groups:
        assert (group["initial_lr"], group["weight_decay"], group["momentum"]) == (pytest.approx(peak), 0.01, 0.9)
        assert group.get("trust_coefficient", 0.001) == 0.001  # LARS: the official util/lars.py's
    head = accelerator.unwrap_model(training.head)
    assert head[1].weight.shape == (3, 6) and not head[0].affine  # BatchNorm without affine, then linear
    # 17 batches = 8 whole steps of 2 per epoch: 24 steps, 8 of warmup, cosine to 0.
    schedule = [peak * training.scheduler.lr_lambdas[0](step) for step in range(24)]
    assert schedule == pytest.approx([paper_learning_rate(step, 0.2, 8, 8, 24) for step in range(24)])


class Spy:
    """Wraps a function and records the keyword-normalised arguments of every call."""

    def __init__(self, function: Any, *names: str) -> None:
        self.function, self.names, self.calls = function, names, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append({**dict(zip(self.names, args)), **kwargs})
        return self.function(*args, **kwargs)

    def values(self, name: str) -> set[Any]:
        return {call[name] for call in self.calls}


@pytest.fixture
def pooling_spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    """Records the pooling of every feature the scripts compute."""
    spy = Spy(features.pool_features, "last_hidden_state", "pooling")
    monkeypatch.setattr(features, "pool_features", spy)
    monkeypatch.setattr(linear_probe_loop, "pool_features", spy)
    return spy


@pytest.mark.parametrize("cached", ["true", "false"])
def test_linear_probe_pooling_reaches_the_features(cached: str, data_dir, model_config, tmp_path, pooling_spy) -> None:
    common = ["--dataset_name", str(data_dir), "--model_config", str(model_config), "--per_device_train_batch_size",
              "16", "--num_train_epochs", "1", "--warmup_epochs", "0", "--cached_features", cached]
    run_linear_probe.main([*common, "--output_dir", str(tmp_path / "default")])
    assert pooling_spy.values("pooling") == {"cls"}  # the paper's probe reads the CLS token
    pooling_spy.calls.clear()
    run_linear_probe.main([*common, "--output_dir", str(tmp_path / "mean"), "--pooling", "mean"])
    assert pooling_spy.values("pooling") == {"mean"}


# ------------------------------------------------------------------------------------------------------- run_knn.py


def test_knn_flags_reach_the_vote(data_dir, model_config, tmp_path, monkeypatch, pooling_spy) -> None:
    knn = Spy(knn_loop.knn_scores, "queries", "bank", "bank_labels", "num_classes", "k", "temperature")
    monkeypatch.setattr(knn_loop, "knn_scores", knn)
    common = ["--dataset_name", str(data_dir), "--model_config", str(model_config),
              "--per_device_eval_batch_size", "16"]
    run_knn.main([*common, "--output_dir", str(tmp_path / "default")])
    assert (knn.values("k"), knn.values("temperature"), pooling_spy.values("pooling")) == ({20}, {0.07}, {"mean"})
    knn.calls.clear()
    pooling_spy.calls.clear()
    run_knn.main([*common, "--output_dir", str(tmp_path / "set"), "--k", "7", "--temperature", "0.5", "--pooling",
                  "cls"])
    assert (knn.values("k"), knn.values("temperature"), pooling_spy.values("pooling")) == ({7}, {0.5}, {"cls"})
    assert knn.calls[0]["bank"].shape == (64, 32) and knn.calls[0]["num_classes"] == 3  # the whole train split
