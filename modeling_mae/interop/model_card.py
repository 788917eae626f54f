"""The model cards (the `README.md` of an exported folder and of its Hub repository): pretraining and fine-tuning
runs, and the exports of `conversion.py`.

The scripts pass what they know about their run; the wording, tables and metadata live here. `hub.py` exports and
uploads the folders.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from ..arguments import OptimizationArguments
from ..configuration_mae import MAEConfig
from ..training.optimization import TrainingPlan, effective_batch_size

CARD_FILE = "README.md"
SAMPLE_DATASET = "the embedded Fashion-MNIST sample"


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown_table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def render_model_card(
    title: str,
    description: str,
    sections: Mapping[str, Mapping[str, Any]],
    tags: Iterable[str] = (),
    datasets: Iterable[str] = (),
    usage: str | None = None,
    figures: Iterable[str] = (),
    library_name: str = "transformers",
) -> str:
    """A Hub model card: YAML metadata, a description, a usage snippet, one table per section, figures."""
    metadata = ["---", f"library_name: {library_name}", "license: apache-2.0"]
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
    if dataset_name is None or "/" not in dataset_name or pathlib.Path(dataset_name).expanduser().exists():
        return []
    return [dataset_name]


def write_model_card(output_dir: str | os.PathLike[str], card: str) -> pathlib.Path:
    path = pathlib.Path(output_dir) / CARD_FILE
    path.write_text(card)
    return path


def describe_architecture(config: MAEConfig) -> str:
    """"ViT 192x6, patch 4, image (32, 32)": width x depth of the encoder."""
    return f"ViT {config.hidden_size}x{config.num_hidden_layers}, patch {config.patch_size}, image {config.image_size}"


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
) -> str:
    """The card of a pretraining export: data, recipe, results (`final`, or a checkpoint at `completed_steps`)."""
    batch = effective_batch_size(optim.per_device_train_batch_size, optim.gradient_accumulation_steps, num_processes)
    explicit_lr = optim.learning_rate is not None
    sections: dict[str, dict[str, Any]] = {
        "Data": {
            "dataset": dataset_name or f"{SAMPLE_DATASET} (modeling_mae/data/sample_data)",
            "split": train_split,
            "images per epoch": images_per_epoch,
            "augmentation": "RandomResizedCrop(scale=(0.2, 1)) + horizontal flip",
        },
        "Recipe": {
            "model": f"{model_source}: {describe_architecture(config)}, decoder "
            f"{config.decoder_hidden_size}x{config.decoder_num_hidden_layers}",
            "mask ratio": config.mask_ratio,
            "norm_pix_loss": config.norm_pix_loss,
            "optimizer": f"AdamW, betas ({optim.adam_beta1}, {optim.adam_beta2}), weight decay "
            f"{optim.weight_decay} (none on biases and norms)",
            "learning rate": f"{learning_rate:.3g}"
            if explicit_lr
            else f"{learning_rate:.3g} (base {optim.base_learning_rate:g} x {batch} / 256)",
            "schedule": f"{plan.warmup_steps} warmup steps, half-cycle cosine to {optim.min_lr:g}",
            "effective batch": batch,
            "processes": num_processes,
            "mixed precision": mixed_precision,
            "steps": f"{completed_steps} of {plan.total_steps}",
        },
        # final_loss: mean of the last logging window; train_loss: mean over the whole run.
        "Results": {"state": "final" if final else f"checkpoint at step {completed_steps}", **results},
    }
    usage = (
        "from transformers import AutoModel, AutoModelForPreTraining\n\n"
        'encoder = AutoModel.from_pretrained("PATH_OR_REPO", trust_remote_code=True)\n'
        'mae = AutoModelForPreTraining.from_pretrained("PATH_OR_REPO", trust_remote_code=True)'
    )
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
    )


def finetuning_card(
    config: MAEConfig,
    *,
    initialisation: str,
    dataset_name: str | None,
    layer_decay: float,
    mixup: float,
    cutmix: float,
    label_smoothing: float,
    results: Mapping[str, Any],
) -> str:
    """The card of a fine-tuned classifier: where it started, the recipe, the results."""
    sections = {
        "Recipe": {
            "initialisation": initialisation,
            "dataset": dataset_name or SAMPLE_DATASET,
            "model": describe_architecture(config),
            "head": "mean of patch tokens + fc_norm" if config.use_mean_pooling else "CLS token",
            "layer decay": layer_decay,
            "drop path": config.drop_path_rate,
            "augmentation": f"RandAugment(9, 0.5), random erasing 0.25, MixUp {mixup}, CutMix {cutmix}, label "
            f"smoothing {label_smoothing}",
        },
        "Results": results,
    }
    usage = ("from transformers import AutoModelForImageClassification\n\n"
             'model = AutoModelForImageClassification.from_pretrained("PATH_OR_REPO", trust_remote_code=True)')
    return render_model_card(
        "MAE fine-tuned image classifier", "A ViT fine-tuned end to end from a Masked Autoencoder encoder "
        "(He et al., 2021) with the paper's recipe.", sections,
        tags=["mae", "image-classification", "vision"], usage=usage,
    )
