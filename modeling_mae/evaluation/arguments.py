"""The flags of the evaluation scripts (k-NN, linear probe, fine-tuning, figures), beside the shared ones of
`modeling_mae.arguments`.

Light on purpose: it imports neither torch nor transformers' models, so a script parses its command line (and answers
`--help`) before the heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..arguments import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    SEED,
    ModelArguments,
    OptimizationArguments,
    Range,
    RunArguments,
    display_channels_field,
    parse_display_channels,
)

POOLINGS: tuple[str, ...] = ("cls", "mean")


@dataclass
class KnnArguments:
    """The k-NN protocol and where its results go."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "k": AT_LEAST_ONE, "temperature": POSITIVE, "per_device_eval_batch_size": AT_LEAST_ONE, "seed": SEED,
    }

    k: int = field(default=20, metadata={"help": "Neighbours that vote."})
    temperature: float = field(default=0.07, metadata={"help": "Votes weigh exp(cosine similarity / temperature)."})
    pooling: str = field(
        default="mean",
        metadata={"help": "Feature: 'mean' of the patch tokens (MAE never trains its CLS token directly) or 'cls'.",
                  "choices": list(POOLINGS)},
    )
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Images per forward pass."})
    output_dir: str = field(default="outputs/mae-knn", metadata={"help": "Where all_results.json is written."})
    seed: int = field(default=0, metadata={"help": "Seeds the random init when --model_config is used."})


OPTIMIZERS = ("lars", "sgd")


@dataclass
class LinearProbeArguments:
    """The probe's recipe (paper, appendix A.2: LARS, base lr 0.1, no weight decay, batch 16384, 90 epochs with 10
    of warmup) with defaults sized for the embedded sample on a CPU (SGD instead of LARS, batch 256); the paper's
    exact recipe is in configuration/linprobe/*.yaml."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "per_device_train_batch_size": AT_LEAST_ONE, "gradient_accumulation_steps": AT_LEAST_ONE,
        "per_device_eval_batch_size": AT_LEAST_ONE, "base_learning_rate": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
        "num_train_epochs": POSITIVE, "warmup_epochs": NON_NEGATIVE, "seed": SEED,
    }

    pooling: str = field(default="cls", metadata={"help": "Feature: the 'cls' token (the paper) or the 'mean' of the "
                                                          "patch tokens.", "choices": list(POOLINGS)})
    cached_features: bool = field(
        default=True, metadata={"help": "Train on features of center crops computed once (fast) instead of freshly "
                                        "augmented images every step (the paper)."})
    # LARS's step is lr x 0.001 x |w|: at the linear-scaled lr of small batches it barely moves the head (on the
    # embedded sample, random init: LARS 38.5% vs SGD 73.5% top-1), so LARS is kept for the paper's 16384 batch.
    optimizer: str = field(default="sgd", metadata={"help": "'sgd' (momentum 0.9) or 'lars' (the paper, for its "
                                                            "16384-image batches).", "choices": list(OPTIMIZERS)})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Samples per process per micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step (the official accum_iter): the paper's "
                                     "16384-image batch on fewer devices. The head's BatchNorm normalises each "
                                     "micro-batch, as in the official code."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Images per forward pass when encoding."})
    base_learning_rate: float = field(default=0.1, metadata={"help": "lr = base_learning_rate * effective batch / "
                                                                         "256 (micro-batch x accumulation x processes)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the linear layer."})
    num_train_epochs: int = field(default=90, metadata={"help": "Epochs over the train split."})
    warmup_epochs: int = field(default=10, metadata={"help": "Linear warmup, then half-cycle cosine to 0."})
    output_dir: str = field(default="outputs/mae-linear-probe", metadata={"help": "Results and head weights."})
    seed: int = field(default=0, metadata={"help": "Seeds the head, the sample order and a --model_config init."})


@dataclass
class VisualizeArguments:
    FLAG_RANGES: ClassVar[dict[str, Range]] = {"num_images": AT_LEAST_ONE, "mask_ratio": FRACTION, "seed": SEED}

    model_name_or_path: str = field(metadata={"help": "Pretraining folder / Hub id, official .pth or ViTMAE folder."})
    images: list[str] | None = field(default=None, metadata={"help": "Image files; default: --num_images of --split."})
    split: str = field(default="validation", metadata={"help": "'train' or 'validation', when no --images are given.",
                                                       "choices": ["train", "validation"]})
    num_images: int = field(default=8, metadata={"help": "Rows taken from the dataset split."})
    mask_ratio: float | None = field(default=None, metadata={"help": "Default: the model's (0.75 in the paper)."})
    seed: int = field(default=0, metadata={"help": "Seeds the masks."})
    output: str = field(default="outputs/reconstruction.png", metadata={"help": "Where the PNG grid is written."})
    display_channels: str | None = display_channels_field()

    def __post_init__(self) -> None:
        parse_display_channels(self.display_channels)  # the count now; the range once the model is loaded


@dataclass
class FinetuneModelArguments(ModelArguments):
    """`ModelArguments` plus the classifier's fine-tuning knobs."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        **ModelArguments.FLAG_RANGES, "layer_decay": Range(low=0, high=1, low_open=True), "drop_path_rate": FRACTION,
        "image_size": AT_LEAST_ONE,
        "num_labels": AT_LEAST_ONE,
    }

    layer_decay: float = field(default=0.75, metadata={"help": "Layer-wise lr decay (paper: 0.65 ViT-B, 0.75 L/H)."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth (paper: 0.1 B, 0.2 L, 0.3 H)."})
    global_pool: bool = field(default=True, metadata={"help": "Classify the mean of the patch tokens (paper) or CLS"})
    image_size: int | None = field(
        default=None, metadata={"help": "Fine-tune at this resolution (position table resized); default: pretraining's"}
    )
    train_position_embeddings: bool = field(
        default=True, metadata={"help": "Fine-tune the position table, as the official code does (timm's pos_embed)."}
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Classes, when the labels are integer ids without names (e.g. webdataset); a label "
                                    "at or above it is an error. Named labels (ClassLabel, strings) give their own."}
    )


@dataclass
class AugmentationArguments:
    """The paper's ImageNet augmentation by default; configuration/finetune/small_images.yaml for small images."""

    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE, "label_smoothing": FRACTION,
        "crop_min_scale": Range(low=0, high=1, low_open=True), "random_erasing": PROBABILITY,
    }

    crop_min_scale: float = field(default=0.08, metadata={"help": "RandomResizedCrop's smallest crop, as a fraction "
                                                                  "of the image's area (paper: 0.08)."})
    rand_augment: bool = field(default=True, metadata={"help": "RandAugment(9, 0.5) (paper: on)."})
    random_erasing: float = field(default=0.25, metadata={"help": "Random erasing probability (paper: 0.25)."})
    mixup: float = field(default=0.8, metadata={"help": "MixUp alpha (0: off)."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (0: off; with both on, one per batch)."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the targets."})

    def is_imagenet_strength(self) -> bool:
        """Whether any of the paper's ImageNet-strength augmentations is on (they hurt small images)."""
        return self.rand_augment or self.mixup > 0 or self.cutmix > 0 or self.crop_min_scale < SMALL_CROP_MIN_SCALE


# The small-image recipe's regime, and its crop (a 28 px garment cropped to 8% of its area is no longer one).
SMALL_IMAGE_SIDE, SMALL_DATASET_IMAGES, SMALL_CROP_MIN_SCALE = 64, 100_000, 0.5
SMALL_IMAGE_RECIPE = "configuration/finetune/small_images.yaml"
IMAGENET_RECIPE = "configuration/finetune/mae_vit_*.yaml"


def recipe_regime(image_side: int, train_images: int | None, augment: AugmentationArguments) -> str:
    """One line: the fine-tuning regime of this run, and the other recipe when small images meet the ImageNet
    augmentation."""
    size = f"{image_side} px, {'an unknown number of' if train_images is None else f'{train_images:,}'} training images"
    small = image_side <= SMALL_IMAGE_SIDE or (train_images is not None and train_images <= SMALL_DATASET_IMAGES)
    if not small:
        return f"Fine-tuning regime: large images and data ({size}): the paper's ImageNet recipe ({IMAGENET_RECIPE})."
    advice = (f"; the ImageNet augmentation is on: consider --config {SMALL_IMAGE_RECIPE}"
              if augment.is_imagenet_strength() else "")
    return (f"Fine-tuning regime: small images or data ({size}; <= {SMALL_IMAGE_SIDE} px or <= "
            f"{SMALL_DATASET_IMAGES:,} images){advice}.")


@dataclass
class FinetuneOptimizationArguments(OptimizationArguments):
    """The paper's fine-tuning optimizer (base lr 5e-4 for ViT-B, 1e-3 for L/H, per 256 images)."""

    # At least one step: the results are those of the last epoch's evaluation, and 0 steps run no epoch.
    FLAG_RANGES: ClassVar[dict[str, Range]] = {**OptimizationArguments.FLAG_RANGES, "max_train_steps": AT_LEAST_ONE}

    base_learning_rate: float = field(default=1e-3, metadata={"help": "lr = base_learning_rate * batch / 256"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (the official fine-tuning keeps 0.999)."})
    min_lr: float = field(default=1e-6, metadata={"help": "Floor of the cosine decay."})
    num_train_epochs: float = field(default=10, metadata={"help": "Epochs (paper: 100 ViT-B, 50 L/H)."})
    warmup_epochs: float = field(default=1.0, metadata={"help": "Linear warmup in epochs (paper: 5)."})


@dataclass
class FinetuneRunArguments(RunArguments):
    output_dir: str = field(default="outputs/mae-finetune", metadata={"help": "Model, results and model card."})
    tracker_project_name: str = "mae-finetune"
