"""Downstream evaluation: k-NN, linear probing, fine-tuning and reconstruction figures, on tiny offline data."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from types import SimpleNamespace

import evaluate
import numpy as np
import pyarrow.parquet
import pytest
import torch
from accelerate import Accelerator
from accelerate.launchers import PrepareForLaunch
from accelerate.state import AcceleratorState
from accelerate.utils import patch_environment
from conftest import tiny_config
from data_fixtures import image_bytes, make_colour_classes, make_parquet_shards
from official_mae import interpolate_pos_embed
from PIL import Image, ImageFont
from safetensors.torch import load_file, save_file
from test_distributed import free_port
from test_training import (
    FakeHfApi,
    assert_same_weights,
    export_model_on_a_full_disk,
    printed_paths,
    weights,
)
from torch.multiprocessing import start_processes
from transformers import AutoModelForImageClassification

from modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel
from modeling_mae.arguments import ModelArguments
from modeling_mae.errors import UsageError
from modeling_mae.evaluation.features import gather_variable_length, pool_features
from modeling_mae.evaluation.knn import knn_scores
from modeling_mae.evaluation.layer_decay import (
    FINETUNE_NO_WEIGHT_DECAY,
    layer_decay_lr_scale_fn,
    layer_id_for,
    lr_scale,
)
from modeling_mae.evaluation.linear_probe import LARS, LinearProbeHead
from modeling_mae.evaluation.metrics import TOP_K_ACCURACY_SCRIPT, ClassificationMetric
from modeling_mae.evaluation.models import (
    frozen_encoder,
    load_encoder,
    load_pretrained,
    resize_model_resolution,
)
from modeling_mae.evaluation.results import class_names_of
from modeling_mae.evaluation.visualization import (
    COLUMN_TITLES,
    GAP,
    MIN_TILE_SIDE,
    add_column_titles,
    column_titles,
    grid_image,
    wrap_to_width,
)
from modeling_mae.interop.conversion import to_transformers_vit
from modeling_mae.loops import finetuning_setup
from modeling_mae.loops.finetuning import evaluate as finetune_evaluate
from modeling_mae.loops.linear_probe import cached_batches, train_head
from modeling_mae.training import progress
from modeling_mae.training.accelerator import build_accelerator, iterate_in_lockstep
from modeling_mae.training.checkpoints import list_checkpoints
from modeling_mae.training.optimization import build_optimizer, build_scheduler
from run_scripts.evidence import EvidenceArguments, render_table
from run_scripts.run_finetune import main as finetune_main
from run_scripts.run_knn import main as knn_main
from run_scripts.run_linear_probe import main as linear_probe_main
from run_scripts.visualize import main as visualize_main

REPO = pathlib.Path(__file__).resolve().parents[1]
# A random-init encoder of the tiny test shape, for the scripts' --model_config baselines.
TINY_OVERRIDES = ("image_size=16,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
                  "decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=32")
NUM_TRAIN, NUM_VALIDATION = 45, 21  # odd sizes: not divisible by 2 processes x batch
NUM_EXACT_TRAIN = 48  # 6 batches of 8, 3 of 2 processes x 8
VALIDATION_CLASSES = [0, 1, 2] * 7
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("images")
    make_parquet_shards(folder, NUM_TRAIN, num_shards=3, split="train")
    make_parquet_shards(folder, NUM_VALIDATION, num_shards=1, split="validation")
    return folder


@pytest.fixture(scope="module")
def exact_dataset(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """48 train / 16 validation images: exact multiples of batch 8 (and of 2 processes x 8), where `dataset` leaves
    partial batches."""
    folder = tmp_path_factory.mktemp("exact")
    make_parquet_shards(folder, NUM_EXACT_TRAIN, num_shards=2, split="train")
    make_parquet_shards(folder, 16, num_shards=1, split="validation")
    return folder


@pytest.fixture(scope="module")
def colour_dataset(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """45 train / 21 validation images whose class is their colour, 15 / 7 per class: a known right answer."""
    folder = tmp_path_factory.mktemp("colours")
    make_colour_classes(folder, [0, 1, 2] * 15, "train")
    make_colour_classes(folder, VALIDATION_CLASSES, "validation", seed=1)
    return folder


@pytest.fixture(scope="module")
def few_cats_dataset(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The colour classes with only 4 of the 45 train images in class 0: 16 of the 20 neighbours of a class-0 query
    are of other classes, so only votes weighted by exp(similarity / 0.07) get those queries right."""
    folder = tmp_path_factory.mktemp("few_cats")
    make_colour_classes(folder, [0] * 4 + [1] * 20 + [2] * 21, "train")
    make_colour_classes(folder, VALIDATION_CLASSES, "validation", seed=1)
    return folder


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    MAEForPreTraining(tiny_config()).save_pretrained(folder)
    return folder


def read_results(folder: pathlib.Path) -> dict:
    return json.loads((folder / "all_results.json").read_text())


def solid_images(folder: pathlib.Path, split: str, size: int) -> tuple[torch.Tensor, list[int]]:
    """A colour-classes split read without modeling_mae: every (solid) image as the normalised `(3, size, size)`
    tensor of its colour, which any resize or center crop leaves as it is, and the labels."""
    table = pyarrow.parquet.read_table(folder / "data" / f"{split}-00000-of-00001.parquet")
    images = []
    for record in table["image"].to_pylist():
        colour = np.asarray(Image.open(io.BytesIO(record["bytes"])).convert("RGB"), dtype=np.float64).mean((0, 1))
        normalised = torch.tensor((colour / 255 - IMAGENET_MEAN) / IMAGENET_STD, dtype=torch.float32)
        images.append(normalised.reshape(3, 1, 1).expand(3, size, size))
    return torch.stack(images), table["label"].to_pylist()


def accuracy_of(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)


def reference_knn_predictions(queries: torch.Tensor, bank: torch.Tensor, bank_labels: Sequence[int], k: int,
                              temperature: float) -> list[int]:
    """The weighted k-NN of Wu et al. (2018) / DINO written out query by query: the k most cosine-similar bank samples
    vote for their class with weight exp(similarity / temperature)."""
    predictions = []
    for query in queries.double():
        similarities = [float(query @ sample / (query.norm() * sample.norm())) for sample in bank.double()]
        nearest = sorted(range(len(similarities)), key=lambda index: -similarities[index])[:k]
        votes: dict[int, float] = {}
        for index in nearest:
            votes[bank_labels[index]] = votes.get(bank_labels[index], 0.0) + math.exp(similarities[index] / temperature)
        predictions.append(max(votes, key=votes.__getitem__))
    return predictions


# ------------------------------------------------------------------------------------------------ library pieces


def test_layer_ids_follow_the_official_layer_decay() -> None:
    model = MAEForImageClassification(tiny_config(num_labels=3))
    num_layers = model.config.num_hidden_layers
    ids = {name: layer_id_for(name, num_layers) for name, _ in model.named_parameters()}
    assert ids["mae.embeddings.cls_token"] == ids["mae.embeddings.position_embeddings"] == 0
    assert ids["mae.embeddings.patch_embeddings.projection.weight"] == 0
    assert ids["mae.encoder.layers.0.attention.qkv.weight"] == 1
    assert ids[f"mae.encoder.layers.{num_layers - 1}.mlp.fc2.bias"] == num_layers
    assert ids["fc_norm.weight"] == ids["classifier.weight"] == num_layers + 1
    assert lr_scale("classifier.weight", num_layers, 0.65) == 1.0
    assert lr_scale("mae.embeddings.cls_token", num_layers, 0.65) == pytest.approx(0.65 ** (num_layers + 1))


def test_optimizer_groups_get_layer_decayed_lr_and_no_decay_on_tokens() -> None:
    model = MAEForImageClassification(tiny_config(num_labels=3))
    model.mae.embeddings.position_embeddings.requires_grad_(True)  # fine-tuned, as in the official code
    optimizer = build_optimizer(model, 1.0, 0.05, lr_scale_fn=layer_decay_lr_scale_fn(2, 0.5),
                                no_weight_decay=FINETUNE_NO_WEIGHT_DECAY)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    position = group_of[id(model.mae.embeddings.position_embeddings)]
    assert position["lr"] == pytest.approx(0.125) and position["weight_decay"] == 0.0
    assert group_of[id(model.mae.embeddings.cls_token)]["weight_decay"] == 0.0
    assert group_of[id(model.mae.encoder.layers[1].attention.qkv.weight)]["lr"] == pytest.approx(0.5)
    head = group_of[id(model.classifier.weight)]
    assert head["lr"] == 1.0 and head["weight_decay"] == 0.05


def test_weighted_knn_votes_with_exponential_similarity() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    bank_labels = torch.tensor([0, 1, 1])
    scores = knn_scores(torch.tensor([[1.0, 0.05]]), bank, bank_labels, num_classes=2, k=2, temperature=0.07)
    normalize = torch.nn.functional.normalize
    similarity = normalize(torch.tensor([[1.0, 0.05]]), dim=-1) @ normalize(bank, dim=-1).T
    expected = torch.tensor([[similarity[0, 0].div(0.07).exp(), similarity[0, 1].div(0.07).exp()]])
    torch.testing.assert_close(scores, expected)
    assert knn_scores(torch.zeros(3, 2), bank, bank_labels, 2, k=50, chunk_size=2).shape == (3, 2)  # k > bank size


def test_knn_scores_are_the_weighted_vote_of_each_query_with_the_papers_defaults() -> None:
    """Several queries of different norms in chunks, a bank larger than k: every query's scores are the sum of
    exp(cosine / 0.07) over its 20 nearest bank samples, per class (DINO's k=20, T=0.07 are the defaults)."""
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(30, 4, generator=generator), torch.randn(5, 4, generator=generator)
    queries = queries * torch.tensor([0.1, 1.0, 3.0, 10.0, 100.0]).unsqueeze(1)
    bank_labels = torch.arange(30) % 3
    expected = torch.zeros(5, 3, dtype=torch.float64)
    for row, query in enumerate(queries.double()):
        similarities = torch.nn.functional.cosine_similarity(query.unsqueeze(0), bank.double())
        for index in similarities.argsort(descending=True)[:20]:
            expected[row, bank_labels[index]] += (similarities[index] / 0.07).exp()
    scores = knn_scores(queries, bank, bank_labels, num_classes=3, chunk_size=2)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=0)


def rank_of_label(scores: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """0 when the label has the highest score, 1 when one class beats it, ...: top-k accuracy from first principles."""
    return [int((row > row[label]).sum()) for row, label in zip(scores, labels, strict=True)]


def direct_top_k(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    return sum(rank < k for rank in rank_of_label(scores, labels)) / len(labels)


def test_top_k_accuracy_module_loads_by_path_and_scores_known_answers() -> None:
    metric = evaluate.load(str(TOP_K_ACCURACY_SCRIPT))
    # Sample 1: label 2 ranked first; sample 2: label 1 ranked second; sample 3: label 0 ranked third.
    ranked, references = [[2, 0, 1], [0, 1, 2], [1, 2, 0]], [2, 1, 0]
    assert metric.compute(predictions=ranked, references=references, top_k=(1, 2, 3)) == {
        "accuracy": pytest.approx(1 / 3), "top2_accuracy": pytest.approx(2 / 3), "top3_accuracy": 1.0}
    # Top-3 of 3 classes is always right: left out when the class count is known.
    assert metric.compute(predictions=ranked, references=references, top_k=(1, 3), num_classes=3) == {
        "accuracy": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="top-5 accuracy needs the 5 best classes"):
        metric.compute(predictions=ranked, references=references, top_k=(1, 5))


def test_top_k_accuracy_module_matches_a_direct_count_over_batches() -> None:
    generator = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(50, 10, generator=generator), torch.randint(0, 10, (50,), generator=generator)
    metric = evaluate.load(str(TOP_K_ACCURACY_SCRIPT))
    for start in range(0, 50, 16):  # batches of 16, 16, 16, 2
        metric.add_batch(predictions=scores[start : start + 16].topk(5).indices.tolist(),
                         references=labels[start : start + 16].tolist())
    results = metric.compute(num_classes=10)
    assert results["accuracy"] == pytest.approx(direct_top_k(scores, labels, 1))
    assert results["top5_accuracy"] == pytest.approx(direct_top_k(scores, labels, 5))


def test_classification_metric_reports_top1_top5_and_skips_trivial_top5() -> None:
    accelerator = Accelerator(cpu=True)
    ten_classes = ClassificationMetric(accelerator)
    ten_classes.add_batch(torch.arange(10.0).flip(0).repeat(4, 1), torch.tensor([0, 4, 5, 9]))  # ranks 0, 1, ...
    ten_classes.add_batch(torch.arange(10.0).repeat(2, 1), torch.tensor([9, 0]))  # ranks 9, 8, ...: right, wrong
    assert ten_classes.compute() == {"eval_accuracy": pytest.approx(2 / 6), "eval_top5_accuracy": 0.5, "eval_samples": 6}
    three_classes = ClassificationMetric(accelerator)
    three_classes.add_batch(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]), torch.tensor([1, 2]))
    assert three_classes.compute(prefix="test_") == {"test_accuracy": 0.5, "test_samples": 2}
    with pytest.raises(UsageError, match="split is empty"):
        three_classes.compute()  # compute starts over


def test_classification_metric_feeds_other_modules_the_predicted_class(tmp_path: pathlib.Path) -> None:
    """An `evaluate` module by path that takes one class id per sample (the interface of the Hub's `accuracy`)."""
    script = tmp_path / "exact_match.py"
    script.write_text(
        "import datasets\nimport evaluate\n\n\n"
        "class ExactMatch(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        features = {'predictions': datasets.Value('int64'), 'references': datasets.Value('int64')}\n"
        "        return evaluate.MetricInfo(description='', citation='', features=datasets.Features(features))\n\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'accuracy': sum(p == r for p, r in zip(predictions, references)) / len(references),\n"
        "                'predicted': list(predictions)}\n"
    )
    metric = ClassificationMetric(Accelerator(cpu=True), str(script))
    metric.add_batch(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.0, 1.0]]), torch.tensor([1, 2, 2]))
    assert metric.compute() == {"eval_accuracy": pytest.approx(2 / 3), "eval_predicted": [1, 0, 2], "eval_samples": 3}


def test_a_hub_metric_offline_is_a_one_line_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="offline, use --metric top_k_accuracy") as error:
        ClassificationMetric(Accelerator(cpu=True), "accuracy")
    assert "\n" not in str(error.value) and str(error.value).startswith("--metric accuracy: ")


def score_in_lockstep(shares: list[list[tuple[torch.Tensor, torch.Tensor]]], output: pathlib.Path) -> None:
    """In each of 2 processes: score this process's batches as loops.finetuning.evaluate does, write what rank 0 got."""
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from pytest: start from a fresh state
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    metric = ClassificationMetric(accelerator)
    batches = ({"scores": scores, "labels": labels} for scores, labels in shares[accelerator.process_index])
    for batch, is_real in iterate_in_lockstep(accelerator, batches):
        metric.add_batch(batch["scores"], batch["labels"], is_real)
    results = metric.compute()
    if accelerator.is_main_process:
        output.write_text(json.dumps(results))


def test_two_processes_with_uneven_shares_count_every_sample_once(tmp_path: pathlib.Path) -> None:
    """Process 0 has 3 batches (4, 4, 1 samples), process 1 one batch of 2: while process 0 finishes, process 1
    re-runs its last batch (is_real=False), which must not be counted."""
    generator = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(11, 8, generator=generator), torch.randint(0, 8, (11,), generator=generator)
    shares = [[(scores[0:4], labels[0:4]), (scores[4:8], labels[4:8]), (scores[8:9], labels[8:9])],
              [(scores[9:11], labels[9:11])]]
    # accelerate's debug_launcher, with a rendezvous file of our own and no fixed port (tests run side by side).
    with patch_environment(world_size=2, master_addr="127.0.0.1", master_port=str(free_port()),
                           accelerate_debug_rdv_file=str(tmp_path / "rendezvous"), accelerate_use_cpu="yes",
                           accelerate_mixed_precision="no", gloo_socket_ifname="lo"):
        start_processes(PrepareForLaunch(score_in_lockstep, debug=True), args=(shares, tmp_path / "results.json"),
                        nprocs=2, start_method="fork")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["eval_samples"] == 11
    assert results["eval_accuracy"] == pytest.approx(direct_top_k(scores, labels, 1))
    assert results["eval_top5_accuracy"] == pytest.approx(direct_top_k(scores, labels, 5))


@pytest.mark.parametrize(("num_samples", "num_processes"), [(16, 1), (19, 1), (32, 2), (37, 2)])
def test_cached_batches_hold_whole_global_batches_each_sample_once(num_samples: int, num_processes: int) -> None:
    """An epoch of the probe's cached features: num_samples // (8 x processes) global batches of distinct samples,
    each process taking its own 8 of each; an exact multiple (16, 32) is covered whole, the rest of an uneven split (3
    of 19, 5 of 37) is left out."""
    features, labels = torch.arange(num_samples, dtype=torch.float32).unsqueeze(1), torch.arange(num_samples)
    taken = []
    for rank in range(num_processes):
        process = SimpleNamespace(num_processes=num_processes, process_index=rank)
        batches = list(cached_batches(process, features, labels, 8, epoch=1, seed=0))
        assert len(batches) == num_samples // (8 * num_processes) and all(len(y) == 8 for _, y in batches)
        assert all(torch.equal(x[:, 0].long(), y) for x, y in batches)  # each feature keeps its label
        taken += [index for _, y in batches for index in y.tolist()]
    assert len(taken) == len(set(taken)) == num_samples // (8 * num_processes) * 8 * num_processes


def test_finetune_validation_scores_the_model_in_eval_mode_whatever_the_eval_batch() -> None:
    """`loops.finetuning.evaluate` on 40 images, each labelled with the class that the classifier in eval mode ranks
    (i mod 10)-th for it: top-1 0.1 and top-5 0.5, in one batch, batches of 8 (an exact multiple) or of 7 (a last
    batch of 5; a mean of batch means gives 0.095). Drop path 0.5, still on in training mode, reorders the classes."""
    model = MAEForImageClassification(tiny_config(num_labels=10, drop_path_rate=0.5)).eval()
    images = torch.randn(40, 3, 16, 16)
    with torch.no_grad():
        ranked = model(images).logits.argsort(dim=-1, descending=True)  # (40, 10), best class first
    labels = ranked[torch.arange(40), torch.arange(40) % 10]
    model.train()
    accelerator = Accelerator(cpu=True)
    metric = ClassificationMetric(accelerator)
    for batch_size in (40, 8, 7):
        batches = [{"pixel_values": images[i : i + batch_size], "labels": labels[i : i + batch_size]}
                   for i in range(0, 40, batch_size)]
        scores = finetune_evaluate(accelerator, model, batches, metric)
        assert scores == {"eval_accuracy": pytest.approx(0.1), "eval_top5_accuracy": pytest.approx(0.5),
                          "eval_samples": 40}, batch_size
        assert model.training  # back to training


def test_gather_and_pooling_on_one_process() -> None:
    tensor = torch.arange(6.0).reshape(3, 2)
    assert gather_variable_length(Accelerator(cpu=True), tensor) is tensor
    hidden = torch.arange(12.0).reshape(1, 3, 4)
    torch.testing.assert_close(pool_features(hidden, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool_features(hidden, "mean"), hidden[:, 1:].mean(1))
    with pytest.raises(ValueError, match="pooling"):
        pool_features(hidden, "max")


def test_lars_scales_matrix_updates_by_the_trust_ratio() -> None:
    weight = torch.nn.Parameter(torch.full((2, 2), 2.0))
    bias = torch.nn.Parameter(torch.ones(2))
    weight.grad, bias.grad = torch.full((2, 2), 0.5), torch.full((2,), 0.5)
    LARS([weight, bias], lr=1.0, trust_coefficient=0.001).step()
    # trust = 0.001 * |w| / |g| = 0.001 * 4 / 1: the matrix moves by 0.004 * 0.5, the bias by the plain gradient.
    torch.testing.assert_close(weight.detach(), torch.full((2, 2), 2.0 - 0.002))
    torch.testing.assert_close(bias.detach(), torch.full((2,), 0.5))


def test_linear_probe_head_normalises_with_the_running_statistics_then_projects() -> None:
    head = LinearProbeHead(3, 2).eval()
    head[0].running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    head[0].running_var.copy_(torch.tensor([4.0, 1e-6, 0.25]))
    features = torch.tensor([[3.0, 2.001, 2.0]])
    normalised = (features - head[0].running_mean) / (head[0].running_var + 1e-6).sqrt()  # the official eps 1e-6
    torch.testing.assert_close(head(features), normalised @ head[1].weight.T + head[1].bias)


def test_linear_probe_head_is_batchnorm_without_affine_then_linear() -> None:
    head = LinearProbeHead(8, 3)
    assert not head[0].affine and head[1].weight.std() < 0.05
    assert head(torch.randn(4, 8)).shape == (4, 3)


def test_load_encoder_applies_config_overrides_to_pretrained_weights(pretrained: pathlib.Path) -> None:
    encoder = load_encoder(str(pretrained), None, "drop_path_rate=0.3,layer_norm_eps=1e-5")
    assert (encoder.config.drop_path_rate, encoder.config.layer_norm_eps) == (0.3, 1e-5)
    with pytest.raises(ValueError, match="--model_name_or_path .* or --model_config"):
        load_encoder(None, None)


@pytest.mark.parametrize(("damage", "missing"), [
    (lambda key: f"backbone.{key}", 3 + 2 * 12),  # every weight renamed: the patch projection (weight and bias),
    # the CLS token, and 2 blocks of 12 (2 LayerNorms, qkv, proj, fc1, fc2: a weight and a bias each)
    (lambda key: None if key.startswith("mae.encoder.layers.1.") else key, 12),  # a block lost
], ids=["renamed", "block_lost"])
@pytest.mark.parametrize("model_class", [MAEModel, MAEForPreTraining, MAEForImageClassification])
def test_load_pretrained_refuses_a_checkpoint_without_the_encoder(
    model_class: type, damage, missing: int, pretrained: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """An MAE config.json over weights of which the encoder lacks some: transformers starts them from a random init
    (a warning table), and the run claimed to start from that folder."""
    folder = tmp_path / "damaged"
    shutil.copytree(pretrained, folder)
    weights = load_file(folder / "model.safetensors")
    kept = {damage(key): tensor for key, tensor in weights.items() if damage(key) is not None}
    save_file(kept, folder / "model.safetensors")
    with pytest.raises(UsageError) as raised:
        load_pretrained(model_class, str(folder))
    assert re.fullmatch(
        rf"{folder} lacks {missing} weights of the MAE encoder \(\S+, \.\.\.\), which would start from random "
        rf"values: convert it first with `python run_scripts/convert_checkpoint.py --source {folder} --output_dir "
        r"FOLDER` \(transformers ViT and ViTMAE, timm and the official MAE checkpoints\), then pass FOLDER",
        str(raised.value),
    )
    loaded = load_pretrained(model_class, str(pretrained))  # the same weights under their own names: found
    prefix = "mae." if model_class is MAEModel else ""
    encoder = {f"{prefix}{key}": tensor for key, tensor in loaded.state_dict().items()}
    for key in [key for key in encoder if key.startswith("mae.")]:
        torch.testing.assert_close(encoder[key], weights[key])


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("model_class", [MAEModel, MAEForImageClassification])
def test_resize_model_resolution_to_a_non_square_size(model_class: type, trained: bool) -> None:
    """An encoder or a classifier, to 24x32 (6x8 patches of 4): the config and the table follow, and the table stays
    trained or fixed as it was."""
    model = model_class(tiny_config(num_labels=3))
    encoder = model if model_class is MAEModel else model.mae
    encoder.embeddings.position_embeddings.requires_grad_(trained)
    resize_model_resolution(model, (24, 32))
    assert model.config.image_size == (24, 32) and model.config.grid_size == (6, 8)
    table = encoder.embeddings.position_embeddings
    assert table.shape == (1, 1 + 6 * 8, 32) and table.requires_grad == trained
    assert encoder(torch.randn(1, 3, 24, 32)).last_hidden_state.shape == (1, 1 + 6 * 8, 32)


def test_resize_model_resolution_is_the_official_interpolation(tmp_path: pathlib.Path) -> None:
    """The table becomes the official `interpolate_pos_embed` of the old one, and the resized classifier predicts
    what transformers' ViT (same weights) predicts at that resolution with its own run-time interpolation; the saved
    model too."""
    model = MAEForImageClassification(tiny_config(num_labels=3, use_mean_pooling=False)).eval()
    with torch.no_grad():
        model.mae.embeddings.position_embeddings.normal_()  # any table, not only sin-cos, is resized
    table = model.mae.embeddings.position_embeddings.detach().clone()  # (1, 1 + 16, 32)
    vit = to_transformers_vit(model)
    resize_model_resolution(model, (24, 24))
    assert model.config.image_size == (24, 24)
    torch.testing.assert_close(model.mae.embeddings.position_embeddings, interpolate_pos_embed(table, 36))
    pixel_values = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        expected = vit(pixel_values, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(model(pixel_values).logits, expected)
        model.save_pretrained(tmp_path)
        reloaded = MAEForImageClassification.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(pixel_values).logits, expected)


# ---------------------------------------------------------------------------------------------------- the scripts


def test_knn_script_from_pretrained_and_random_init(
    few_cats_dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The defaults (k=20, T=0.07, mean-pooled features) find every class, as the k-NN written out here does on the
    same encoder's features; votes not weighted by the temperature (T=1) would miss some of the few cats."""
    monkeypatch.chdir(tmp_path)  # the default output_dir is relative: the printed path says where it went
    common = ["--dataset_name", str(few_cats_dataset), "--per_device_eval_batch_size", "4"]
    metrics = knn_main([*common, "--model_name_or_path", str(pretrained)])
    assert metrics["eval_samples"] == NUM_VALIDATION and metrics["train_samples"] == NUM_TRAIN
    results = tmp_path / "outputs" / "mae-knn" / "all_results.json"
    assert json.loads(results.read_text()) == pytest.approx(metrics)
    assert printed_paths(capsys.readouterr().out) == {"results": str(results.resolve())}
    encoder = MAEModel.from_pretrained(pretrained).eval()
    with torch.no_grad():
        (bank_images, bank_labels), (queries, labels) = (solid_images(few_cats_dataset, split, 16)
                                                          for split in ("train", "validation"))
        bank, features = (encoder(images).last_hidden_state[:, 1:].mean(1) for images in (bank_images, queries))
    assert metrics["eval_accuracy"] == accuracy_of(reference_knn_predictions(features, bank, bank_labels, 20, 0.07),
                                                   labels) == 1.0
    assert accuracy_of(reference_knn_predictions(features, bank, bank_labels, 20, 1.0), labels) < 0.9
    scratch = knn_main([*common, "--model_config", "tiny", "--config_overrides", TINY_OVERRIDES, "--k", "5",
                        "--output_dir", str(tmp_path / "random"), "--pooling", "cls"])
    assert scratch["model"].startswith("random init") and scratch["eval_accuracy"] == 1.0  # colour is easy to see


def test_knn_accuracy_is_the_same_with_two_processes(
    dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # 45 train / 21 validation images in batches of 4 on 2 processes: uneven shares, partial last batches.
    flags = ["--dataset_name", str(dataset), "--model_name_or_path", str(pretrained), "--per_device_eval_batch_size", "4",
             "--k", "5"]
    single = knn_main([*flags, "--output_dir", str(tmp_path / "one")])
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(REPO / "run_scripts" / "run_knn.py"), *flags,
         "--output_dir", str(tmp_path / "two")],
        check=True, env=env, cwd=REPO, capture_output=True, timeout=180,
    )
    double = read_results(tmp_path / "two")
    assert double["num_processes"] == 2
    assert double["eval_samples"] == NUM_VALIDATION and double["train_samples"] == NUM_TRAIN
    assert double["eval_accuracy"] == pytest.approx(single["eval_accuracy"])


def test_the_evaluation_scripts_show_their_progress(
    dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Away from a terminal, feature extraction, the k-NN vote and the probe's epochs each end with a progress line
    (45 train / 21 validation images in batches of 4: 12 and 6 batches; the 21 queries in one chunk)."""
    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    caplog.set_level(logging.INFO, logger="modeling_mae.training.progress")
    flags = ["--dataset_name", str(dataset), "--model_name_or_path", str(pretrained),
             "--per_device_eval_batch_size", "4"]
    knn_main([*flags, "--output_dir", str(tmp_path / "knn")])
    linear_probe_main([*flags, "--output_dir", str(tmp_path / "probe"), "--num_train_epochs", "2",
                       "--warmup_epochs", "0", "--per_device_train_batch_size", "8"])
    lines = [record.getMessage() for record in caplog.records if record.name == progress.__name__]
    done = [re.sub(r", \d\d:\d\d:\d\d elapsed", "", line) for line in lines]
    probe_loss = float(done[-1].rpartition("loss=")[2])
    assert done == ["train features: 12/12 batch (100%)", "validation features: 6/6 batch (100%)",
                    "k-NN: 1/1 chunk (100%)",
                    "validation features: 6/6 batch (100%)", "train features: 12/12 batch (100%)",
                    f"linear probe: 2/2 epoch (100%), loss={probe_loss:.4f}"]
    assert probe_loss == pytest.approx(read_results(tmp_path / "probe")["train_loss"], abs=1e-4)


@pytest.mark.parametrize("cached", ["true", "false"])
def test_linear_probe_script(
    colour_dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path, cached: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The probe learns the colour classes, and its reported accuracy is that of the saved head on the CLS features,
    computed here from the weights (BatchNorm without affine, eps 1e-6, then linear)."""
    metrics = linear_probe_main([
        "--dataset_name", str(colour_dataset), "--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path),
        "--per_device_train_batch_size", "8", "--num_train_epochs", "3", "--warmup_epochs", "1", "--cached_features", cached,
    ])
    assert metrics["eval_samples"] == NUM_VALIDATION
    assert metrics["train_steps"] == 3 * (NUM_TRAIN // 8)  # whole batches only, both ways
    assert printed_paths(capsys.readouterr().out) == {"results": str(tmp_path.resolve() / "all_results.json"),
                                                      "head": str(tmp_path.resolve() / "linear_head.safetensors")}
    assert read_results(tmp_path)["cached_features"] == (cached == "true")
    head = load_file(tmp_path / "linear_head.safetensors")
    images, labels = solid_images(colour_dataset, "validation", 16)
    with torch.no_grad():
        features = MAEModel.from_pretrained(pretrained).eval()(images).last_hidden_state[:, 0]
    normalised = (features - head["0.running_mean"]) / (head["0.running_var"] + 1e-6).sqrt()
    predictions = (normalised @ head["1.weight"].T + head["1.bias"]).argmax(-1).tolist()
    assert metrics["eval_accuracy"] == accuracy_of(predictions, labels) >= 0.9


def test_linear_probe_accumulation_steps_like_the_whole_batch(tmp_path: pathlib.Path) -> None:
    """4 samples x 2 accumulated micro-batches make the optimizer step of one batch of 8: same weights, same schedule
    (a plain linear head: the probe's BatchNorm normalises each micro-batch, as in the official code)."""
    features, labels = torch.randn(16, 6), torch.arange(16) % 3

    def train(batch_size: int, accumulation: int) -> tuple[torch.Tensor, int]:
        accelerator = build_accelerator(accumulation, tmp_path)
        torch.manual_seed(0)
        head = torch.nn.Linear(6, 3)
        head, optimizer = accelerator.prepare(head, torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9))
        scheduler = build_scheduler(optimizer, 0, 2, 0.5)
        epoch = [(features[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, 16, batch_size)]
        train_head(accelerator, head, optimizer, scheduler, iter([iter(epoch)]))
        return accelerator.unwrap_model(head).weight.detach().clone(), scheduler.last_epoch

    (whole, whole_steps), (accumulated, accumulated_steps) = train(8, 1), train(4, 2)
    assert whole_steps == accumulated_steps == 2
    torch.testing.assert_close(accumulated, whole)


def test_linear_probe_script_with_accumulation(
    dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Batch 4 x 2 micro-batches: the optimizer steps and learning rate of batch 8."""
    common = ["--dataset_name", str(dataset), "--model_name_or_path", str(pretrained), "--num_train_epochs", "3",
              "--warmup_epochs", "1"]
    whole = linear_probe_main([*common, "--output_dir", str(tmp_path / "whole"), "--per_device_train_batch_size", "8"])
    accumulated = linear_probe_main([*common, "--output_dir", str(tmp_path / "accumulated"),
                                     "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"])
    assert accumulated["train_steps"] == whole["train_steps"] == 3 * (NUM_TRAIN // 8)
    assert accumulated["learning_rate"] == pytest.approx(whole["learning_rate"])
    assert accumulated["gradient_accumulation_steps"] == 2 and 0.0 <= accumulated["eval_accuracy"] <= 1.0


def test_linear_probe_trains_on_every_batch_of_an_exact_multiple(
    exact_dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """48 cached features in batches of 8: 6 optimizer steps an epoch, the last batch included; `train_steps` counts
    the steps taken."""
    metrics = linear_probe_main(["--dataset_name", str(exact_dataset), "--model_name_or_path", str(pretrained),
                                 "--output_dir", str(tmp_path), "--per_device_train_batch_size", "8",
                                 "--per_device_eval_batch_size", "8", "--num_train_epochs", "2", "--warmup_epochs", "0"])
    assert (metrics["train_steps"], metrics["eval_samples"]) == (2 * NUM_EXACT_TRAIN // 8, 16)


def test_linear_probe_leaves_the_encoder_untouched(
    dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    before = {name: tensor.clone() for name, tensor in MAEModel.from_pretrained(pretrained).state_dict().items()}
    linear_probe_main(["--dataset_name", str(dataset), "--model_name_or_path", str(pretrained), "--output_dir",
                       str(tmp_path), "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
                       "--warmup_epochs", "0", "--optimizer", "sgd"])
    after = MAEModel.from_pretrained(pretrained).state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_launched_run_prints_what_it_did_and_no_library_noise(
    dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The README's launch (our default Accelerate config) of a fine-tuning, its output piped as to a log file."""
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    output = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "configuration" / "accelerate" / "default.yaml"), str(REPO / "run_scripts" / "run_finetune.py"),
         "--dataset_name", str(dataset), "--model_name_or_path", str(pretrained), "--output_dir", str(output),
         "--per_device_train_batch_size", "8", "--num_train_epochs", "1"],
        env=env, cwd=tmp_path, capture_output=True, timeout=300, check=True,  # bytes: text mode would turn \r to \n
    )
    stdout, log = run.stdout.decode(), (run.stdout + run.stderr).decode()
    assert "Setting accelerator to CPU" not in log  # DeepSpeed, imported by Accelerate to unwrap the model
    assert "had defaults used instead" not in log  # Accelerate, launched without a config
    assert "LOAD REPORT" not in log and "not sharded" not in log  # transformers, the new head is on purpose
    assert "MAEForImageClassification from" in log and "new (random init): classifier, fc_norm" in log
    assert "\r" not in log  # no progress bar redrawn in place, ours or a library's
    assert "fine-tuning: 1/1 epoch (100%)" in log
    assert printed_paths(stdout) == {"model": str(output.resolve()),
                                     "results": str((output / "all_results.json").resolve())}


def test_finetune_script_saves_a_loadable_classifier(
    colour_dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    metrics = finetune_main([
        "--dataset_name", str(colour_dataset), "--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path),
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--num_train_epochs", "2",
        "--image_size", "24", "--layer_decay", "0.65",
    ])
    assert metrics["eval_samples"] == NUM_VALIDATION and metrics["train_epochs"] == 2 and len(metrics["history"]) == 2
    model = MAEForImageClassification.from_pretrained(tmp_path).eval()
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "fish"} and model.config.image_size == (24, 24)
    assert model.config.drop_path_rate == 0.1 and model.config.use_mean_pooling
    assert model(torch.randn(1, 3, 24, 24)).logits.shape == (1, 3)
    # It learnt the colour classes, and the reported accuracy is the saved classifier's on the validation images.
    images, labels = solid_images(colour_dataset, "validation", 24)
    with torch.no_grad():
        predictions = model(images).logits.argmax(-1).tolist()
    assert metrics["eval_accuracy"] == accuracy_of(predictions, labels) >= 0.9
    # The encoder started from the pretrained weights: a few tiny steps moved them a little, a new init would not match.
    pretrained_qkv = MAEModel.from_pretrained(pretrained).encoder.layers[0].attention.qkv.weight
    assert torch.allclose(model.mae.encoder.layers[0].attention.qkv.weight, pretrained_qkv, atol=1e-2)
    card = (tmp_path / "README.md").read_text()
    for fact in ("| initialisation | a local checkpoint |", "| layer decay | 0.65 |", "| head | mean of patch tokens + fc_norm |",
                 "ViT 32x2, patch (4, 4), image (24, 24)", "MixUp 0.8, CutMix 1.0", "| eval_accuracy |", "- image-classification"):
        assert fact in card
    assert "eval_accuracy" in read_results(tmp_path)


def test_finetune_with_accumulation_takes_the_whole_batchs_steps_and_records_them(
    exact_dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Batch 4 x 2 accumulated micro-batches is batch 8: on 48 images, the same 6 optimizer steps, the lr of batch 8
    (1e-3 x 8 / 256), the same weights (no MixUp, CutMix nor drop path: the augmentations are seeded per image) and
    scores, and the model card's records say so."""
    common = ["--dataset_name", str(exact_dataset), "--model_name_or_path", str(pretrained), "--num_train_epochs", "1",
              "--mixup", "0", "--cutmix", "0", "--drop_path_rate", "0", "--per_device_eval_batch_size", "16"]
    whole = finetune_main([*common, "--output_dir", str(tmp_path / "whole"), "--per_device_train_batch_size", "8"])
    accumulated = finetune_main([*common, "--output_dir", str(tmp_path / "accumulated"),
                                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"])
    for metrics in (whole, accumulated):
        assert (metrics["train_steps"], metrics["effective_batch_size"]) == (6, 8)
        assert metrics["learning_rate"] == pytest.approx(1e-3 * 8 / 256)
    card = (tmp_path / "accumulated" / "README.md").read_text()
    assert "| effective_batch_size | 8 |" in card and "| learning_rate | 3.125e-05 |" in card
    assert_same_weights(weights(tmp_path / "accumulated"), weights(tmp_path / "whole"), atol=1e-5)
    assert accumulated["eval_accuracy"] == whole["eval_accuracy"]


def test_finetune_refuses_zero_steps_before_building_anything(dataset: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """0 steps run no epoch, so there would be no evaluation to report (it ended in an IndexError after setup)."""
    with pytest.raises(UsageError, match=r"^--max_train_steps=0 is not allowed: it must be >= 1$"):
        finetune_main(["--dataset_name", str(dataset), "--model_config", "tiny", "--config_overrides", TINY_OVERRIDES,
                       "--output_dir", str(tmp_path), "--per_device_train_batch_size", "8", "--max_train_steps", "0"])
    assert not tmp_path.joinpath("all_results.json").exists()


def test_finetune_on_a_full_disk_at_the_export_names_the_last_checkpoint(
    dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The classifier's export runs out of space (safetensors' own error): one line, as at a checkpoint."""

    monkeypatch.setattr(finetuning_setup, "export_model", export_model_on_a_full_disk)
    with pytest.raises(UsageError) as refused:
        finetune_main([
            "--dataset_name", str(dataset), "--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path),
            "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--checkpointing_steps", "epoch",
        ])  # 45 images: 5 steps
    assert str(refused.value).startswith("no space left on ")
    assert str(refused.value).endswith(
        f" while saving the fine-tuned model to {tmp_path}; the previous checkpoint {tmp_path / 'step_5'} is intact. "
        "Free some space and rerun with --resume_from_checkpoint latest"
    )


def test_finetune_script_from_scratch_without_mixing(dataset: pathlib.Path, tmp_path: pathlib.Path) -> None:
    metrics = finetune_main([
        "--dataset_name", str(dataset), "--model_config", "tiny", "--config_overrides", TINY_OVERRIDES,
        "--output_dir", str(tmp_path), "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
        "--mixup", "0", "--cutmix", "0", "--global_pool", "false",
    ])
    assert metrics["model"].startswith("random init") and metrics["train_steps"] == NUM_TRAIN // 8
    assert not MAEForImageClassification.from_pretrained(tmp_path).config.use_mean_pooling


def test_finetune_push_to_hub_offline(
    dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, hf_home
) -> None:
    FakeHfApi.remote, FakeHfApi.calls = tmp_path / "remote", []
    FakeHfApi.remote.mkdir()
    monkeypatch.setattr("modeling_mae.interop.hub.HfApi", FakeHfApi)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the fake Hub needs no network
    finetune_main([
        "--dataset_name", str(dataset), "--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path / "run"),
        "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--push_to_hub", "--hub_model_id",
        "someone/tiny-mae-classifier", "--hub_token", "hf_test",
    ])
    assert FakeHfApi.calls[0]["call"] == "create_repo" and FakeHfApi.calls[0]["repo_id"] == "someone/tiny-mae-classifier"
    assert [call["call"] for call in FakeHfApi.calls].count("upload_folder") >= 1
    uploaded = {path.name for path in FakeHfApi.remote.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_mae.py", "configuration_mae.py",
            "preprocessor_config.json", "README.md", "all_results.json"} <= uploaded
    # What reached the Hub loads as remote code and classifies with the data set's label names.
    classifier = AutoModelForImageClassification.from_pretrained(FakeHfApi.remote, trust_remote_code=True)
    assert classifier.config.id2label == {0: "cat", 1: "dog", 2: "fish"}


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_visualize_script_from_a_split_and_from_files(
    dataset: pathlib.Path, tmp_path: pathlib.Path, norm_pix_loss: bool
) -> None:
    model_dir = tmp_path / "model"
    MAEForPreTraining(tiny_config(norm_pix_loss=norm_pix_loss)).save_pretrained(model_dir)
    figure = visualize_main(["--model_name_or_path", str(model_dir), "--dataset_name", str(dataset), "--num_images", "3",
                             "--output", str(tmp_path / "split.png")])
    titles = column_titles(COLUMN_TITLES, MIN_TILE_SIDE)  # 16-pixel images are shown as 96-pixel tiles
    tile = MIN_TILE_SIDE + GAP
    with Image.open(figure) as image:
        assert image.size == (4 * tile + GAP, titles.height + 3 * tile + GAP)  # the titles over 3 rows of 4 tiles
        assert_same_pixels(image.crop((0, 0, image.width, titles.height)), titles)
    (tmp_path / "a.png").write_bytes(image_bytes(7))
    files = visualize_main(["--model_name_or_path", str(model_dir), "--images", str(tmp_path / "a.png"),
                            "--mask_ratio", "0.5", "--output", str(tmp_path / "files.png")])
    with Image.open(files) as image:
        assert image.size == (4 * tile + GAP, titles.height + tile + GAP)  # the titles over 1 row of 4 tiles


def assert_same_pixels(image: Image.Image, expected: Image.Image) -> None:
    assert image.size == expected.size
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.convert("RGB")))


def test_column_titles_are_drawn_over_each_column_and_leave_the_grid_unchanged() -> None:
    generator = np.random.default_rng(0)
    rows = [[generator.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)] for _ in range(2)]
    grid = grid_image(rows)
    figure = add_column_titles(grid)
    strip_height = figure.height - grid.height
    assert figure.width == grid.width and strip_height > 0
    assert_same_pixels(figure.crop((0, strip_height, figure.width, figure.height)), grid)
    strip = np.asarray(figure.crop((0, 0, figure.width, strip_height)).convert("L"))  # (strip height, width)
    tile_width = (grid.width - GAP) // 4 - GAP
    for column, title in enumerate(COLUMN_TITLES):  # dark text in every column's part of the strip
        left = GAP + column * (tile_width + GAP)
        assert strip[:, left : left + tile_width].min() < 128, f"no title over column {column} ({title})"
    assert strip[:, :GAP].min() == 255 and strip[:, -GAP:].min() == 255  # a white margin, nothing cut off
    assert len(wrap_to_width("reconstruction + visible", ImageFont.load_default(size=12), 96)) == 2  # too wide: wrapped


def test_evidence_table_reports_gains_and_the_ablation() -> None:
    main_results = {f"{protocol}_{init}": {"eval_accuracy": accuracy}
                    for protocol in ("knn", "linprobe", "linprobe-mean", "finetune", "finetune-lr", "finetune-nomix",
                                     "finetune-long") for init, accuracy in (("random", 0.5), ("mae", 0.75))}
    ablation = {0.75: {"eval_accuracy": 0.7, "pretrain_loss": 0.5}, 0.9: {"eval_accuracy": 0.6, "pretrain_loss": 0.6}}
    table = render_table(main_results, ablation, EvidenceArguments())
    assert "| 50.0 | 75.0 | +25.0 |" in table and "| linear probe top-1 % | 70.0 | 60.0 |" in table


def test_visualize_script_converts_a_transformers_vitmae_checkpoint(
    dataset: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
        norm_pix_loss=True,
    )
    ViTMAEForPreTraining(config).save_pretrained(tmp_path / "vitmae")
    figure = visualize_main(["--model_name_or_path", str(tmp_path / "vitmae"), "--dataset_name", str(dataset),
                             "--num_images", "2", "--output", str(tmp_path / "vitmae.png")])
    assert figure.is_file()


def test_finetune_checkpoint_and_resume_latest_continue_exactly(
    dataset: pathlib.Path, pretrained: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # 5 steps per epoch, 6 in all: step_2 is mid-epoch, the resumed run crosses an epoch end. MixUp/CutMix and drop
    # path stay on: their randomness is seeded from the micro-batch's place in the run.
    def run(output: pathlib.Path, *extra: str) -> dict:
        return finetune_main([
            "--dataset_name", str(dataset), "--model_name_or_path", str(pretrained), "--output_dir", str(output),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--max_train_steps", "6",
            "--checkpointing_steps", "2", *extra,
        ])

    straight = run(tmp_path / "straight")
    assert [p.name for p in list_checkpoints(tmp_path / "straight")] == ["step_2", "step_4", "step_6"]
    # An interrupted run: only its step_2 checkpoint exists when it is started again with "latest".
    shutil.copytree(tmp_path / "straight" / "step_2", tmp_path / "resumed" / "step_2")
    resumed = run(tmp_path / "resumed", "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1")
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_6"]
    assert resumed["train_steps"] == straight["train_steps"] == 6 and resumed["train_epochs"] == 2
    assert_same_weights(weights(tmp_path / "resumed"), weights(tmp_path / "straight"))
    # The per-epoch train loss is restored mid-epoch too.
    assert resumed["history"] == [pytest.approx(epoch) for epoch in straight["history"]]


# ----------------------------------------------- defaults and messages the scripts never exercise (mutation testing)


def test_knn_scores_vote_with_the_20_nearest_by_default() -> None:
    """30 bank samples on the unit circle, 0.05 rad apart; the query at angle 0: the 20 nearest are class 0, the rest
    class 1. With k=20, class 1 gets no vote at all (a 21st neighbour would give it one)."""
    angles = torch.arange(30, dtype=torch.float64) * 0.05
    bank = torch.stack([angles.cos(), angles.sin()], dim=1)
    bank_labels = (torch.arange(30) >= 20).long()
    scores = knn_scores(torch.tensor([[2.0, 0.0]]), bank, bank_labels, num_classes=2)
    expected = torch.tensor([[(angles[:20].cos() / 0.07).exp().sum(), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=0)
    # No queries (a process whose evaluation share is empty): no rows.
    assert knn_scores(torch.zeros(0, 2), bank, bank_labels, num_classes=2).shape == (0, 2)


def test_lars_defaults_are_the_official_ones() -> None:
    """The official MAE `util/lars.py`: lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001."""
    defaults = LARS([torch.nn.Parameter(torch.ones(2, 2))]).defaults
    assert defaults == {"lr": 0.0, "weight_decay": 0.0, "momentum": 0.9, "trust_coefficient": 0.001}


def test_a_damaged_weights_file_is_named_in_one_line(pretrained: pathlib.Path, tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(pretrained, folder)
    weights_file = folder / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    with pytest.raises(UsageError, match=rf"^{re.escape(str(weights_file))} cannot be read as weights \(\w+: "):
        load_pretrained(MAEModel, str(folder))


def test_integer_labels_without_names_are_named_up_to_the_largest_label() -> None:
    """A split of plain integer labels (no ClassLabel): classes "0" .. the largest label seen, gaps included."""
    accelerator, unnamed = Accelerator(cpu=True), SimpleNamespace(class_names=None)
    assert class_names_of(accelerator, unnamed, torch.tensor([0, 4, 2])) == ["0", "1", "2", "3", "4"]
    assert class_names_of(accelerator, unnamed, torch.tensor([], dtype=torch.long)) == []
    assert class_names_of(accelerator, SimpleNamespace(class_names=("cat", "dog")), torch.tensor([0])) == ["cat", "dog"]


def test_integer_labels_are_named_up_to_the_largest_label_of_any_process() -> None:
    """Two processes: this one saw labels up to 1, the other up to 3 (accelerate's reduce of the two, written out
    for the reductions it has): every process names 4 classes."""

    def reduce(tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        other = torch.tensor([3])
        return {"max": torch.maximum, "sum": torch.add, "mean": lambda a, b: (a + b) / 2}[reduction](tensor, other)

    two_processes = SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=reduce)
    names = class_names_of(two_processes, SimpleNamespace(class_names=None), torch.tensor([1, 0]))
    assert names == ["0", "1", "2", "3"]


def test_a_padding_batch_of_a_finished_process_adds_nothing() -> None:
    """`is_real=False`: the batch a process re-runs only to keep the others company (wrong labels here) is not scored."""
    metric = ClassificationMetric(Accelerator(cpu=True))
    scores = torch.eye(6)  # sample i ranks class i first
    metric.add_batch(scores[:2], torch.tensor([0, 1]))
    metric.add_batch(scores[2:5], torch.tensor([0, 0, 0]), is_real=False)
    assert metric.compute() == {"eval_accuracy": 1.0, "eval_top5_accuracy": 1.0, "eval_samples": 2}


def test_the_frozen_encoder_applies_the_config_overrides(pretrained: pathlib.Path) -> None:
    args = ModelArguments(model_name_or_path=str(pretrained), config_overrides="drop_path_rate=0.3")
    encoder = frozen_encoder(args, seed=0, device=torch.device("cpu"))
    assert encoder.config.drop_path_rate == 0.3 and not encoder.training
    assert not any(parameter.requires_grad for parameter in encoder.parameters())


def test_a_load_that_leaves_weights_out_says_from_where(pretrained: pathlib.Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="modeling_mae.evaluation.models")
    load_pretrained(MAEForImageClassification, str(pretrained))  # a new head; the decoder's weights go unused
    assert any(record.getMessage().startswith(f"MAEForImageClassification from {pretrained}: ")
               for record in caplog.records)


def test_load_pretrained_of_a_folder_with_a_config_alone_is_one_line(tmp_path: pathlib.Path) -> None:
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=rf"^{re.escape(str(tmp_path))}: the folder holds a config.json but no weights"):
        load_pretrained(MAEModel, str(tmp_path))


def test_a_metric_that_cannot_load_says_why_in_its_first_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(path: str, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'accuracy' on the Hub (LocalEntryNotFoundError)\nTraceback ...")

    monkeypatch.setattr(evaluate, "load", unreachable)
    with pytest.raises(UsageError, match=r"^--metric accuracy: `evaluate` cannot load it \(Couldn't reach 'accuracy' "
                                         r"on the Hub \(LocalEntryNotFoundError\)\)\. "):
        ClassificationMetric(Accelerator(cpu=True), "accuracy")


def test_the_metric_keeps_the_predictions_in_memory_and_an_empty_split_is_one_line(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No cache file of predictions (two runs at once would share evaluate's default_experiment file); nothing
    scored: one line."""
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", str(tmp_path))
    metric = ClassificationMetric(Accelerator(cpu=True))
    metric.add_batch(torch.eye(6)[:2], torch.tensor([0, 1]))
    assert not list(tmp_path.rglob("*.arrow"))
    assert metric.compute()["eval_samples"] == 2
    with pytest.raises(UsageError) as empty:
        metric.compute()
    assert str(empty.value) == "no validation image was scored: the validation split is empty"
