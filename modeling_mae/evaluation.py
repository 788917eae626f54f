"""Downstream evaluation of MAE encoders: the paper's three protocols and their shared pieces.

- Features: `extract_features` runs the frozen encoder once over a split (no masking) and gathers the
  features of every process, so each process holds the whole split in the same order.
- k-NN: `knn_scores`, the weighted vote of Wu et al. (2018) / DINO (cosine, k=20, T=0.07).
- Linear probing: `LinearProbeHead` (`BatchNorm1d(affine=False)` + linear, the paper's appendix A.2) and `LARS`
  (the official `util/lars.py`).
- Fine-tuning: layer-wise learning-rate decay (`layer_id_for`, `lr_scale`, `layer_decay_lr_scale_fn`, plugged into
  `training.build_optimizer`), `resize_model_resolution`.
- Metrics: `ClassificationMetric` feeds an `evaluate` module (by default our `top_k_accuracy.py`, loaded by path so
  it works offline; `--metric accuracy` is the Hub's) with the predictions of every process, gathered with
  `accelerator.gather_for_metrics`. The loaders of `modeling_mae.data` give each process a disjoint share of the split
  without padding, so every sample is added exactly once.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import evaluate
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from torch import nn

from .arguments import DEFAULT_MODEL_CONFIG, load_model_config
from .configuration_mae import MAEConfig
from .data import DataArguments, ImageStreamLoader, build_dataloader
from .errors import UsageError
from .modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel, resize_position_table
from .training import LrScaleFn, write_json
from .transforms import ImageTransform

logger = logging.getLogger(__name__)

Pooling = Literal["cls", "mean"]
LoadedModel = TypeVar("LoadedModel", bound=MAEModel | MAEForImageClassification)
POOLINGS: tuple[str, ...] = ("cls", "mean")
TOP_KS = (1, 5)
TOP_K_ACCURACY = "top_k_accuracy"  # our `evaluate` module, shipped next to this file
TOP_K_ACCURACY_SCRIPT = pathlib.Path(__file__).with_name(f"{TOP_K_ACCURACY}.py")
# Parameters of the classifier the official fine-tuning never decays (timm's `no_weight_decay`).
FINETUNE_NO_WEIGHT_DECAY = ("cls_token", "position_embeddings")
RESULTS_FILE = "all_results.json"
_ENCODER_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------------------- models


def load_encoder(
    model_name_or_path: str | None, model_config: str | None, config_overrides: str | None = None
) -> MAEModel:
    """The encoder of a saved MAE model (pretraining or classifier folder, Hub id), or a random init of a config.

    A random init is what the "from scratch" baselines use: seed before calling for reproducible weights.
    """
    if model_name_or_path:
        config = load_model_config(model_name_or_path, config_overrides)
        return from_pretrained_quietly(MAEModel, model_name_or_path, config=config)
    if model_config is None:
        raise ValueError("pass --model_name_or_path (pretrained weights) or --model_config (random init)")
    return MAEModel(load_model_config(model_config, config_overrides))


def from_pretrained_quietly(model_class: type[LoadedModel], source: str, **kwargs: Any) -> LoadedModel:
    """`model_class.from_pretrained(source, **kwargs)` with transformers' load-report table (a warning of a dozen
    lines, from every process) replaced by one INFO line: which modules start from a random init, which checkpoint
    weights go unused. For loads that change the model on purpose: a classifier from a pretraining checkpoint."""
    # transformers' library logger, not the one of modeling_utils: with a level of its own, that one also checks the
    # (absent) tensor-parallel plan and warns that no layer is sharded.
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model, loading_info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    changes = describe_loading(loading_info)
    if changes:
        logger.info("%s from %s: %s", model_class.__name__, source, changes)
    return model


def describe_loading(loading_info: dict[str, Any]) -> str:
    """`from_pretrained`'s loading info in a few words, by module ("classifier", not "classifier.weight")."""

    def modules(keys: Iterable[str]) -> str:
        return ", ".join(sorted({key.rsplit(".", 1)[0] for key in keys}))

    mismatched = [key for key, *_shapes in loading_info["mismatched_keys"]]
    parts = [(loading_info["missing_keys"], "new (random init)"), (mismatched, "new (another shape)"),
             (loading_info["unexpected_keys"], "not used")]
    return "; ".join(f"{what}: {modules(keys)}" for keys, what in parts if keys)


def describe_model(model_name_or_path: str | None, model_config: str | None, seed: int) -> str:
    """What a run started from, for its results and model card: the weights, or the random init's config and seed."""
    return model_name_or_path or f"random init of {model_config or DEFAULT_MODEL_CONFIG} (seed {seed})"


def load_pretraining_model(source: str) -> MAEForPreTraining:
    """A model with its decoder: one of ours (folder or Hub id), or an official `.pth` / transformers ViTMAE
    checkpoint, converted on the fly."""
    from .conversion import convert_checkpoint  # conversion imports transformers' ViT: only when needed

    if not os.path.isfile(source):  # a folder or Hub id: ours loads as is, a transformers ViTMAE one is converted
        config_dict, _ = MAEConfig.get_config_dict(source)
        if config_dict.get("model_type") == MAEConfig.model_type:
            return MAEForPreTraining.from_pretrained(source)
    model = convert_checkpoint(source)
    if not isinstance(model, MAEForPreTraining):
        raise ValueError(f"{source} holds no decoder: reconstructions need a pretraining checkpoint")
    return model


def resize_model_resolution(model: MAEForImageClassification | MAEModel, image_size: Sequence[int]) -> None:
    """Fine-tune at another resolution: the position table is resized bicubically (the official
    `interpolate_pos_embed`) and the config updated, so the saved model works at the new size."""
    config = model.config
    new_size = (int(image_size[0]), int(image_size[1]))
    if new_size == tuple(config.image_size):
        return
    embeddings = (model.mae if isinstance(model, MAEForImageClassification) else model).embeddings
    old_grid = config.grid_size
    config.image_size = new_size
    table = resize_position_table(embeddings.position_embeddings.data, old_grid, config.grid_size)
    embeddings.position_embeddings = nn.Parameter(table, requires_grad=embeddings.position_embeddings.requires_grad)


# -------------------------------------------------------------------------------------------------------- features


def pool_features(last_hidden_state: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """`(B, 1 + L, D)` -> `(B, D)`: the CLS token (the paper's linear probe) or the mean of the patch tokens."""
    if pooling == "cls":
        return last_hidden_state[:, 0]
    if pooling == "mean":
        return last_hidden_state[:, 1:].mean(dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def gather_variable_length(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` of every process along dim 0, in process order, when the lengths differ.

    `accelerator.gather` needs equal shapes: pad to the longest, gather, then cut each process's padding away.
    """
    if accelerator.num_processes == 1:
        return tensor
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = accelerator.gather(length).tolist()
    padded = accelerator.pad_across_processes(tensor, dim=0)
    gathered = accelerator.gather(padded)
    longest = padded.shape[0]
    return torch.cat([gathered[rank * longest : rank * longest + size] for rank, size in enumerate(lengths)])


@torch.no_grad()
def extract_local_features(
    encoder: MAEModel, batches: Iterable[dict[str, torch.Tensor]], pooling: Pooling, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features `(N, D)` (float32) and labels `(N,)` of this process's batches, encoder in eval mode."""
    encoder.eval()
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for batch in batches:
        hidden = encoder(batch["pixel_values"].to(device)).last_hidden_state
        features.append(pool_features(hidden, pooling).float())
        labels.append(batch["labels"].to(device))
    if not features:
        empty = torch.empty(0, encoder.config.hidden_size, device=device)
        return empty, torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(labels)


def extract_features(
    accelerator: Accelerator, encoder: MAEModel, batches: Iterable[dict[str, torch.Tensor]], pooling: Pooling
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of the whole split (every process's share), the same on every process."""
    features, labels = extract_local_features(encoder, batches, pooling, accelerator.device)
    return gather_variable_length(accelerator, features), gather_variable_length(accelerator, labels)


# --------------------------------------------------------------------------------------------------------- metrics


@dataclass
class MetricArguments:
    """Which `evaluate` module scores the validation split."""

    metric: str = field(
        default=TOP_K_ACCURACY,
        metadata={"help": f"'{TOP_K_ACCURACY}' (top-1 and top-5, shipped with the package, works offline), or an "
                          "`evaluate` module that takes one predicted class id per sample, by Hub name or path "
                          "(e.g. 'accuracy', which needs the Hub)."},
    )


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Our top-k accuracy (loaded by path: no network), or any other `evaluate` module by Hub name or path."""
    source = str(TOP_K_ACCURACY_SCRIPT) if name == TOP_K_ACCURACY else name
    try:
        return evaluate.load(source, keep_in_memory=True)  # in memory: every process holds every prediction
    except (OSError, ImportError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"--metric {name}: `evaluate` cannot load it ({reason}). Hub metrics need a connection to the Hub; "
            f"offline, use --metric {TOP_K_ACCURACY}"
        ) from error


class ClassificationMetric:
    """An `evaluate` module fed with the predictions of every process, as transformers' no_trainer examples do.

    Each process scores its own share of the split. `add_batch` gathers the shares with
    `accelerator.gather_for_metrics` as Python lists, since shares differ in size at the end of a split (the loaders
    are not prepared by Accelerate: they shard without padding, so there is no duplicated tail sample to drop), and
    every process adds every sample once. A batch that a finished process re-runs only to keep the others company
    (`training.iterate_in_lockstep`, `is_real=False`) adds nothing.
    """

    def __init__(self, accelerator: Accelerator, name: str = TOP_K_ACCURACY) -> None:
        self.accelerator = accelerator
        self.module = load_metric(name)
        self.ranks_classes = name == TOP_K_ACCURACY  # ours takes the best classes; the others, the best class
        self.samples = 0
        self.num_classes = 0

    def add_batch(self, scores: torch.Tensor, labels: torch.Tensor, is_real: bool = True) -> None:
        """Add `(B, C)` class scores and `(B,)` labels of every process; a collective: call it on every process."""
        self.num_classes = scores.shape[-1]
        if self.ranks_classes:
            predictions = scores.topk(min(max(TOP_KS), self.num_classes), dim=-1).indices  # (B, k), best first
        else:
            predictions = scores.argmax(dim=-1)  # (B,)
        rows = list(zip(predictions.tolist(), labels.tolist(), strict=True)) if is_real else []
        gathered = self.accelerator.gather_for_metrics(rows, use_gather_object=True)
        if gathered:
            predicted, references = zip(*gathered, strict=True)
            self.module.add_batch(predictions=list(predicted), references=list(references))
        self.samples += len(gathered)

    def compute(self, prefix: str = "eval_") -> dict[str, float | int]:
        """`{prefix}accuracy`, `{prefix}top5_accuracy` (ours, when there are more than 5 classes) or the module's
        results, and `{prefix}samples`; then starts over."""
        if self.samples == 0:
            raise UsageError("no validation image was scored: the validation split is empty")
        options = {"top_k": TOP_KS, "num_classes": self.num_classes} if self.ranks_classes else {}
        results = {f"{prefix}{name}": value for name, value in self.module.compute(**options).items()}
        results[f"{prefix}samples"] = self.samples
        self.samples = 0
        return results


# ------------------------------------------------------------------------------------------------------------ k-NN


def knn_scores(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores `(Q, C)` of a weighted k-NN: each of the k most cosine-similar bank samples votes for its class
    with weight `exp(similarity / temperature)` (Wu et al., 2018; DINO's `knn_classifier`).

    Queries are processed in chunks so the `(chunk, N)` similarity matrix stays small.
    """
    bank = F.normalize(bank.float(), dim=-1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk_size):
        query = F.normalize(queries[start : start + chunk_size].float(), dim=-1)
        similarity, index = (query @ bank.T).topk(k, dim=-1)  # (chunk, k)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=query.device, dtype=weights.dtype)
        scores.append(votes.scatter_add_(1, bank_labels[index], weights))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=queries.device)


# ---------------------------------------------------------------------------------------------- linear probing


class LinearProbeHead(nn.Sequential):
    """The paper's linear probe: `BatchNorm1d(affine=False)` (it normalises features whose scale differs a lot between
    models, and folds into the linear layer at inference) + a linear classifier initialised with std 0.01."""

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6), nn.Linear(feature_dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017), as in the official MAE linear probing: SGD with momentum where the update of every
    matrix is rescaled by `trust_coefficient * |w| / |g + wd * w|`; biases and norms are plain SGD."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if parameter.ndim > 1:
                    update = update.add(parameter, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(parameter), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0), group["trust_coefficient"] * param_norm / update_norm, one
                    )
                    update = update.mul(trust)
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                parameter.add_(buffer, alpha=-group["lr"])


# ---------------------------------------------------------------------------------------------------- fine-tuning


def layer_id_for(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay (BEiT / official MAE `param_groups_lrd`): the CLS token, position
    table and patch embedding are layer 0, block i is layer i + 1, everything after the blocks (norms, head) is
    `num_layers + 1`."""
    match = _ENCODER_LAYER.search(name)
    if match:
        return int(match.group(1)) + 1
    if "embeddings." in name:
        return 0
    return num_layers + 1


def lr_scale(name: str, num_layers: int, layer_decay: float) -> float:
    """`layer_decay ** (num_layers + 1 - layer_id)`: the head keeps the full lr, each block below gets
    `layer_decay` times the lr of the block above it."""
    return layer_decay ** (num_layers + 1 - layer_id_for(name, num_layers))


def layer_decay_lr_scale_fn(num_layers: int, layer_decay: float) -> LrScaleFn:
    """`lr_scale` in the form `training.build_optimizer(lr_scale_fn=...)` takes."""
    return lambda name, _parameter: lr_scale(name, num_layers, layer_decay)


# ------------------------------------------------------------------------------------------------ script plumbing


def split_loader(
    accelerator: Accelerator,
    data_args: DataArguments,
    split: str,
    transform: ImageTransform,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    num_classes: int | None = None,
    min_image_size: int = 1,
) -> ImageStreamLoader:
    """This process's share of `split` ("train" or "validation") with its labels (raises a `UsageError` when the data
    has none); evaluation loaders keep every sample once. Pass the model's patch size as `min_image_size`, and the
    user's number of classes, if any, as `num_classes` (see `build_dataloader`)."""
    loader = build_dataloader(
        data_args, split, transform, batch_size, train=train, seed=seed,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes, num_classes=num_classes,
        min_image_size=min_image_size,
    )
    if not loader.has_labels:
        raise UsageError(f"No label column found in the {split} split (looked for a ClassLabel feature, then a column "
                         "named label, labels, cls, ...): pass --label_column_name.")
    return loader


def class_names_of(accelerator: Accelerator, loader: ImageStreamLoader, labels: torch.Tensor) -> list[str]:
    """The dataset's class names (a ClassLabel's, or its string labels sorted), else `"0"`, `"1"`, ... up to the
    largest integer label seen by any process (a collective: call it on every process)."""
    if loader.class_names is not None:
        return list(loader.class_names)
    largest = labels.max().reshape(1) if labels.numel() else torch.full((1,), -1, device=labels.device)
    if accelerator.num_processes > 1:
        largest = accelerator.reduce(largest.to(accelerator.device), reduction="max")
    return [str(index) for index in range(int(largest.item()) + 1)]


def save_results(
    accelerator: Accelerator, output_dir: str | os.PathLike[str], metrics: dict[str, Any]
) -> pathlib.Path:
    """`output_dir/all_results.json` (main process), like the other scripts; returns its path."""
    path = pathlib.Path(output_dir) / RESULTS_FILE
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, metrics)
    accelerator.wait_for_everyone()
    return path


def summarize(metrics: dict[str, Any]) -> str:
    """The validation scores of `metrics` in one line: "eval_accuracy 0.8150, eval_top5_accuracy 0.9900, ..."."""
    return ", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in metrics.items() if key.startswith("eval_") and key != "eval_runtime")
