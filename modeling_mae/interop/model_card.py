"""The model cards (the `README.md` of an exported folder and of its Hub repository): pretraining and fine-tuning
runs, and the exports of `conversion.py`.

The scripts pass what they know about their run; the wording, tables and metadata live here. `hub.py` exports and
uploads the folders. A card is uploaded with the model, so it names models and data by Hub id only: a path of the
machine that trained means nothing on the Hub (and may say more than it should), so it is "a local checkpoint" or
"local data" there.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..arguments import DEFAULT_MODEL_CONFIG, OptimizationArguments
from ..configuration_mae import MAEConfig
from ..text import counted
from ..training.optimization import TrainingPlan, effective_batch_size

CARD_FILE = "README.md"
SAMPLE_DATASET = "the embedded Fashion-MNIST sample"
LOCAL_CHECKPOINT = "a local checkpoint"
LOCAL_CONFIG = "a local config"
LOCAL_DATA = "local data"
USAGE_PLACEHOLDER = "PATH_OR_REPO"  # in the usage snippet of a card whose Hub repository is not known
FEATURE_EXTRACTION = "image-feature-extraction"  # the Hub's pipeline tags
IMAGE_CLASSIFICATION = "image-classification"


def _cell(key: str, value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{text} s" if key.endswith("runtime") else text  # train_runtime, eval_runtime: seconds


def _markdown_table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {_cell(key, value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def is_hub_id(name: str) -> bool:
    """Whether `name` names a Hub repository ("org/name", or a preset name): no local path, and a valid repo id."""
    if pathlib.Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:  # "/abs/path", "../x", "a/b/c": a local path that is gone, never a Hub id
        return False
    return True


def public_name(name: str, local: str) -> str:
    """`name` when it is a Hub id, else `local` (e.g. `LOCAL_CHECKPOINT`): what a card may say of a model or data."""
    return name if is_hub_id(name) else local


def render_model_card(
    title: str,
    description: str,
    sections: Mapping[str, Mapping[str, Any]],
    tags: Iterable[str] = (),
    datasets: Iterable[str] = (),
    usage: str | None = None,
    figures: Iterable[str] = (),
    library_name: str = "transformers",
    pipeline_tag: str | None = None,
) -> str:
    """A Hub model card: YAML metadata, a description, a usage snippet, one table per section, figures."""
    metadata = ["---", f"library_name: {library_name}", "license: apache-2.0"]
    metadata += [f"pipeline_tag: {pipeline_tag}"] if pipeline_tag else []
    metadata += ["tags:"] + [f"- {tag}" for tag in tags]
    datasets = list(datasets)
    if datasets:
        metadata += ["datasets:"] + [f"- {name}" for name in datasets]
    metadata.append("---")
    parts = ["\n".join(metadata), f"# {title}", description]
    if usage:
        parts.append(f"## Usage\n\n```python\n{usage.strip()}\n```")
    parts += [f"## {heading}\n\n{_markdown_table(rows)}" for heading, rows in sections.items()]
    parts += [f"![{name}]({name})" for name in figures]
    return "\n\n".join(parts) + "\n"


def hub_dataset_ids(dataset_name: str | None) -> list[str]:
    """The card's `datasets:` metadata: the data set when it is a Hub id ("org/name"), not a local folder."""
    if dataset_name is None or "/" not in dataset_name or not is_hub_id(dataset_name):
        return []
    return [dataset_name]


def describe_dataset(dataset_name: str | None) -> str:
    return SAMPLE_DATASET if dataset_name is None else public_name(dataset_name, LOCAL_DATA)


def describe_start(model_name_or_path: str | None, model_config: str | None, seed: int) -> str:
    """Where a run started, as a card says it: the weights' Hub id, or the random init's config and seed."""
    if model_name_or_path is not None:
        return public_name(model_name_or_path, LOCAL_CHECKPOINT)
    return f"random init of {public_name(model_config or DEFAULT_MODEL_CONFIG, LOCAL_CONFIG)} (seed {seed})"


def usage_snippet(loads: Mapping[str, str], repo_id: str | None) -> str:
    """`name = AutoClass.from_pretrained(repo, trust_remote_code=True)` for each of `loads` ({name: Auto class}), after
    their import; the repository is a placeholder until the card knows its Hub id."""
    repo = repo_id or USAGE_PLACEHOLDER
    lines = [f'{name} = {cls}.from_pretrained("{repo}", trust_remote_code=True)' for name, cls in loads.items()]
    return f"from transformers import {', '.join(dict.fromkeys(loads.values()))}\n\n" + "\n".join(lines)


def write_model_card(output_dir: str | os.PathLike[str], card: str) -> pathlib.Path:
    path = pathlib.Path(output_dir) / CARD_FILE
    path.write_text(card)
    return path


def describe_architecture(config: MAEConfig) -> str:
    """"ViT 192x6, patch 4, image (32, 32)": width x depth of the encoder."""
    return f"ViT {config.hidden_size}x{config.num_hidden_layers}, patch {config.patch_size}, image {config.image_size}"


def describe_inputs(config: MAEConfig) -> str:
    """"1 channel, pixel values x 1/65535, normalised with mean [0.449], std [0.226]": what the model expects (the
    exported image processor does it)."""
    inverse = 1 / config.rescale_factor
    is_fraction = inverse > 1 and abs(inverse - round(inverse)) < 1e-6  # 1/255, 1/65535
    scale = f"1/{round(inverse)}" if is_fraction else f"{config.rescale_factor:g}"
    channels = f"{config.num_channels} channel{'s' if config.num_channels > 1 else ''}"
    mean, std = ([round(value, 4) for value in values] for values in (config.image_mean, config.image_std))
    return f"{channels}, pixel values x {scale}, normalised with mean {mean}, std {std}"


def pretraining_card(
    config: MAEConfig,
    *,
    model_source: str,
    dataset_name: str | None,
    train_split: str,
    images_per_epoch: int | None,
    optim: OptimizationArguments,
    learning_rate: float,
    plan: TrainingPlan,
    completed_steps: int,
    num_processes: int,
    mixed_precision: str,
    results: Mapping[str, Any],
    final: bool,
    figures: Iterable[str] = (),
    repo_id: str | None = None,
) -> str:
    """The card of a pretraining export: data, recipe, results (`final`, or a checkpoint at `completed_steps`);
    `repo_id`: its Hub repository, when known."""
    batch = effective_batch_size(optim.per_device_train_batch_size, optim.gradient_accumulation_steps, num_processes)
    explicit_lr = optim.learning_rate is not None
    sections: dict[str, dict[str, Any]] = {
        "Data": {
            "dataset": describe_dataset(dataset_name),
            "split": train_split,
            "images per epoch": images_per_epoch,
            "augmentation": "RandomResizedCrop(scale=(0.2, 1)) + horizontal flip",
            "input": describe_inputs(config),
        },
        "Recipe": {
            "model": f"{public_name(model_source, 'a local model')}: {describe_architecture(config)}, decoder "
            f"{config.decoder_hidden_size}x{config.decoder_num_hidden_layers}",
            "mask ratio": config.mask_ratio,
            "norm_pix_loss": config.norm_pix_loss,
            "optimizer": f"AdamW, betas ({optim.adam_beta1}, {optim.adam_beta2}), weight decay "
            f"{optim.weight_decay} (none on biases and norms)",
            "learning rate": f"{learning_rate:.3g}"
            if explicit_lr
            else f"{learning_rate:.3g} (base {optim.base_learning_rate:g} x {batch} / 256)",
            "schedule": f"{counted(plan.warmup_steps, 'warmup step')}, half-cycle cosine to {optim.min_lr:g}",
            "effective batch": batch,
            "processes": num_processes,
            "mixed precision": mixed_precision,
            "steps": f"{completed_steps} of {plan.total_steps}",
        },
        # final_loss: mean of the last logging window; train_loss: mean over the whole run.
        "Results": {"state": "final" if final else f"checkpoint at step {completed_steps}", **results},
    }
    usage = usage_snippet({"encoder": "AutoModel", "mae": "AutoModelForPreTraining"}, repo_id)
    return render_model_card(
        "Masked Autoencoder (MAE) pretrained with modeling_mae",
        "A ViT encoder pretrained with the masked-autoencoder objective of He et al., *Masked Autoencoders Are "
        f"Scalable Vision Learners* (2021): {config.mask_ratio:.0%} of the patches are removed and the decoder "
        "reconstructs their pixels.",
        sections,
        tags=["mae", "masked-autoencoder", "self-supervised", "vision", "image-feature-extraction"],
        datasets=hub_dataset_ids(dataset_name),
        usage=usage,
        figures=figures,
        pipeline_tag=FEATURE_EXTRACTION,
    )


def finetuning_card(
    config: MAEConfig,
    *,
    model_name_or_path: str | None,
    model_config: str | None,
    seed: int,
    dataset_name: str | None,
    layer_decay: float,
    mixup: float,
    cutmix: float,
    label_smoothing: float,
    results: Mapping[str, Any],
    repo_id: str | None = None,
) -> str:
    """The card of a fine-tuned classifier: where it started (`describe_start`), the recipe, the results; `repo_id`:
    its Hub repository, when known."""
    sections = {
        "Recipe": {
            "initialisation": describe_start(model_name_or_path, model_config, seed),
            "dataset": describe_dataset(dataset_name),
            "model": describe_architecture(config),
            "input": describe_inputs(config),
            "head": "mean of patch tokens + fc_norm" if config.use_mean_pooling else "CLS token",
            "layer decay": layer_decay,
            "drop path": config.drop_path_rate,
            "augmentation": f"RandAugment(9, 0.5), random erasing 0.25, MixUp {mixup}, CutMix {cutmix}, label "
            f"smoothing {label_smoothing}",
        },
        "Results": results,
    }
    usage = usage_snippet({"model": "AutoModelForImageClassification"}, repo_id)
    return render_model_card(
        "MAE fine-tuned image classifier", "A ViT fine-tuned end to end from a Masked Autoencoder encoder "
        "(He et al., 2021) with the paper's recipe.", sections,
        tags=["mae", "image-classification", "vision"], datasets=hub_dataset_ids(dataset_name), usage=usage,
        pipeline_tag=IMAGE_CLASSIFICATION,
    )
