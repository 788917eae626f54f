"""The scaling study's design, version 2 (`run_scripts/scaling_study.py`; the protocol, pre-registered, is in
docs/evaluation.md): the protocols compared, the ladders of encoder sizes (`Rung`), the budgets, and the stages that
run them.

Every size gets the same hyperparameters: the small-image fine-tuning recipe (configuration/finetune/small_images.yaml),
one layer decay and drop path, one learning rate per arm, chosen on a held-out part of the train split at the middle
size. Scratch gets `SCRATCH_EPOCH_FACTOR` times the MAE arm's fine-tuning epochs, so it is never the under-trained side.
"""

from __future__ import annotations

import functools
import pathlib
from dataclasses import dataclass, fields
from typing import Any

from ..arguments import DEFAULT_MODEL_CONFIG, load_yaml_config
from ..evaluation.arguments import AugmentationArguments
from .stages import Stage

PROTOCOLS = {  # cell key -> column title
    "mae": "MAE, fine-tuned",
    "scratch": "scratch, fine-tuned",
    "linprobe": "MAE linear probe",
    "knn": "MAE k-NN",
    "linprobe_random": "random-init linear probe",
    "knn_random": "random-init k-NN",
}


ARMS = ("mae", "scratch")  # the fine-tuned pair whose paired difference is the gain


Results = dict[str, dict[str, Any]]  # a protocol's all_results.json, by PROTOCOLS key


SMALL_IMAGE_RECIPE = "configuration/finetune/small_images.yaml"  # relative to the repository root


PRETRAIN_BASE_LR = 1.5e-3  # run_mae.py's default for short runs (10x the paper's 1.5e-4, ~1e3 steps instead of ~1e5)


PRETRAIN_WARMUP_FRACTION = 0.05  # the paper's 40 of 800 epochs


FINETUNE_WARMUP_FRACTION = 0.1  # the paper's 5 of 50 epochs (ViT-L/H)


SCRATCH_EPOCH_FACTOR = 2


LAYER_DECAY = {"mae": 0.75, "scratch": 1.0}  # decay holds layers near their init: only a pretrained init gains from it


DROP_PATH_RATE = 0.1


@dataclass(frozen=True)
class Rung:
    """One encoder size of the ladder."""

    name: str
    width: int
    depth: int
    heads: int

    @property
    def slug(self) -> str:
        return self.name.lower()

    def encoder_overrides(self) -> str:
        return (f"hidden_size={self.width},num_hidden_layers={self.depth},num_attention_heads={self.heads},"
                f"intermediate_size={4 * self.width}")


@dataclass(frozen=True)
class Budget:
    """How big the study is: the ladder, the seeds, the epochs, the learning-rate grid and the data."""

    names: tuple[str, ...]
    widths: tuple[int, ...]
    heads: tuple[int, ...]
    depth: int
    decoder_overrides: str
    seeds: tuple[int, ...]
    pretrain_epochs: float
    finetune_epochs: float  # the MAE arm's; scratch gets SCRATCH_EPOCH_FACTOR times as many
    # Fine-tuning base lrs tried per arm on the held-out split: around the recipe sweep's best (4e-3 for both inits,
    # the largest it tried; docs/records/recipe_sweep.md).
    learning_rates: tuple[float, ...]
    batch_size: int
    eval_batch_size: int  # of every evaluation, and the linear probe's batch of cached features
    dataloader_num_workers: int
    train_images: int | None  # the first N images of the train split (None: all)
    holdout_fraction: float  # of the train split, per class: where the learning rates are chosen
    holdout_images: int | None  # held-out images evaluated during the choice (None: all)
    test_images: int | None = None  # None: the whole test split, as the protocol requires
    scratch_epoch_factor: float = SCRATCH_EPOCH_FACTOR
    estimate: str = ""  # how long it takes, as measured or estimated when it was sized

    def rungs(self) -> list[Rung]:
        return [Rung(name, width, self.depth, heads) for name, width, heads in zip(self.names, self.widths, self.heads)]

    def selection_rung(self) -> Rung:
        """The middle size (where the learning rates are chosen; every size then uses them)."""
        rungs = self.rungs()
        return rungs[len(rungs) // 2]

    def epochs(self, arm: str) -> float:
        return self.finetune_epochs * (self.scratch_epoch_factor if arm == "scratch" else 1)


BUDGETS = {
    # CI: tiny models on 64 of the sample's images, two seeds (a standard deviation); checks the plumbing only.
    "smoke": Budget(
        names=("ViT-8", "ViT-16"), widths=(8, 16), heads=(2, 2), depth=1,
        decoder_overrides="decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,"
                          "decoder_intermediate_size=32",
        seeds=(0, 1), pretrain_epochs=1, finetune_epochs=1, learning_rates=(1e-3, 4e-3), batch_size=16,
        eval_batch_size=32, dataloader_num_workers=0, train_images=64, holdout_fraction=0.1, holdout_images=32,
        test_images=32, estimate="about a minute of CPU",
    ),
    # Two CPU cores: tiny-32px's 6 blocks and decoder at widths 32/64/128 (1:2:4, as ViT-Ti/S/B), 2 heads, on the
    # first 10,000 training images of the full Fashion-MNIST, scored on all 10,000 test images.
    "cpu": Budget(
        names=("ViT-32", "ViT-64", "ViT-128"), widths=(32, 64, 128), heads=(2, 2, 2), depth=6, decoder_overrides="",
        seeds=(0, 1, 2), pretrain_epochs=20, finetune_epochs=10, learning_rates=(2e-3, 4e-3, 8e-3), batch_size=64,
        eval_batch_size=256, dataloader_num_workers=0, train_images=10_000, holdout_fraction=0.1,
        holdout_images=2_000, estimate="~8.4 CPU core-hours, from measured step times",
    ),
    # One H100/H200: ViT-Ti/S/B (12 blocks, 64-wide heads) with the tiny/small presets' 256x4 decoder, on all of
    # Fashion-MNIST; fine-tuning 50 epochs and scratch 100 (at least 30 and 100, issue 21).
    "gpu": Budget(
        names=("ViT-Ti", "ViT-S", "ViT-B"), widths=(192, 384, 768), heads=(3, 6, 12), depth=12,
        decoder_overrides="decoder_hidden_size=256,decoder_num_hidden_layers=4,decoder_num_attention_heads=8,"
                          "decoder_intermediate_size=1024",
        seeds=(0, 1, 2), pretrain_epochs=100, finetune_epochs=50, learning_rates=(1e-3, 2e-3, 4e-3), batch_size=256,
        eval_batch_size=512, dataloader_num_workers=8, train_images=None, holdout_fraction=0.1,
        holdout_images=None, estimate="~4 GPU-hours on one H100 in bf16 (FLOP and loader estimate; not run)",
    ),
}


def recipe_flags(repository: pathlib.Path) -> tuple[str, ...]:
    """The small-image recipe's augmentation as explicit flags, so that every stage's record holds it (the study
    sets the optimizer, schedule and data itself)."""
    values = load_yaml_config(repository / SMALL_IMAGE_RECIPE)
    augmentation = [item.name for item in fields(AugmentationArguments)]
    return tuple(item for key in augmentation for item in (f"--{key}", flag_value(values[key])))


def flag_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class StudyPlan:
    """The stages of one budget on one data set, named so that a rerun finds and reuses them."""

    budget: Budget
    recipe: tuple[str, ...]  # recipe_flags()
    dataset_name: str | None
    folder: pathlib.Path  # the study's output_dir: later stages read earlier stages' folders

    def data_flags(self, *, holdout: bool, evaluated: int | None = None) -> tuple[str, ...]:
        """The data of a stage: the first N training images; the held-out split, or `evaluated` (default: all) of the
        test split."""
        budget = self.budget
        dataset = ("--dataset_name", self.dataset_name) if self.dataset_name else ()
        train = ("--max_train_samples", str(budget.train_images)) if budget.train_images else ()
        evaluated = budget.holdout_images if holdout else evaluated or budget.test_images
        evaluation = ("--max_eval_samples", str(evaluated)) if evaluated else ()
        carve = ("--holdout_fraction", f"{budget.holdout_fraction:g}") if holdout else ()
        return (*dataset, *train, *evaluation, *carve, "--dataloader_num_workers", str(budget.dataloader_num_workers))

    def pretrain(self, rung: Rung, seed: int) -> Stage:
        budget, epochs = self.budget, self.budget.pretrain_epochs
        overrides = ",".join(filter(None, (rung.encoder_overrides(), budget.decoder_overrides)))
        return Stage(f"pretrain_{rung.slug}_s{seed}", "run_mae.py", (
            "--model_config", DEFAULT_MODEL_CONFIG, "--config_overrides", overrides,
            "--mask_ratio", "0.75", "--norm_pix_loss", "true", "--base_learning_rate", f"{PRETRAIN_BASE_LR:g}",
            "--num_train_epochs", f"{epochs:g}", "--warmup_epochs", f"{PRETRAIN_WARMUP_FRACTION * epochs:g}",
            "--per_device_train_batch_size", str(budget.batch_size), "--per_device_eval_batch_size",
            str(budget.eval_batch_size), "--seed", str(seed), "--logging_steps", "50",
            # Its validation loss is a log, not a score: a few test images are enough.
            *self.data_flags(holdout=False, evaluated=budget.holdout_images),
        ), resumable=True)

    def init_flags(self, arm: str, rung: Rung, seed: int) -> tuple[str, ...]:
        """The MAE arm starts from its pretraining's folder, scratch from a random init of the same encoder."""
        if arm == "mae":
            return ("--model_name_or_path", str(self.folder / self.pretrain(rung, seed).name))
        return ("--model_config", DEFAULT_MODEL_CONFIG, "--config_overrides", rung.encoder_overrides())

    def finetune(self, arm: str, rung: Rung, seed: int, base_lr: float, *, holdout: bool) -> Stage:
        """`run_finetune.py` with the study's recipe: the arms differ in init, layer decay, epochs and lr only."""
        budget, epochs = self.budget, self.budget.epochs(arm)
        prefix = f"select-{arm}_lr{base_lr:g}" if holdout else f"finetune-{arm}"
        return Stage(f"{prefix}_{rung.slug}_s{seed}", "run_finetune.py", (
            *self.init_flags(arm, rung, seed), *self.recipe, "--layer_decay", f"{LAYER_DECAY[arm]:g}",
            "--drop_path_rate", f"{DROP_PATH_RATE:g}", "--base_learning_rate", f"{base_lr:g}",
            "--num_train_epochs", f"{epochs:g}", "--warmup_epochs", f"{FINETUNE_WARMUP_FRACTION * epochs:g}",
            "--per_device_train_batch_size", str(budget.batch_size), "--per_device_eval_batch_size",
            str(budget.eval_batch_size), "--seed", str(seed), *self.data_flags(holdout=holdout),
        ), resumable=True)

    def frozen(self, script: str, key: str, rung: Rung, seed: int) -> Stage:
        """A linear probe or k-NN (PROTOCOLS key "linprobe", "knn", "linprobe_random", "knn_random") of the MAE or a
        random encoder."""
        encoder = self.init_flags("scratch" if key.endswith("_random") else "mae", rung, seed)
        batch = ("--per_device_train_batch_size", str(self.budget.eval_batch_size)) if script == "run_linear_probe.py" \
            else ()
        return Stage(f"{key.replace('_', '-')}_{rung.slug}_s{seed}", script, (
            *encoder, "--seed", str(seed), "--per_device_eval_batch_size", str(self.budget.eval_batch_size), *batch,
            *self.data_flags(holdout=False),
        ))

    def selection(self) -> dict[str, dict[float, Stage]]:
        """arm -> base lr -> its fine-tuning on the held-out split (middle size, first seed)."""
        rung, seed = self.budget.selection_rung(), self.budget.seeds[0]
        return {arm: {lr: self.finetune(arm, rung, seed, lr, holdout=True) for lr in self.budget.learning_rates}
                for arm in ARMS}

    def size_stages(self, rung: Rung, seed: int, learning_rates: dict[str, float]) -> dict[str, Stage]:
        """Every protocol of one size and seed, by PROTOCOLS key, with each arm's chosen base lr."""
        arms = {arm: self.finetune(arm, rung, seed, learning_rates[arm], holdout=False) for arm in ARMS}
        frozen = {key: self.frozen("run_linear_probe.py" if key.startswith("linprobe") else "run_knn.py", key, rung,
                                   seed) for key in PROTOCOLS if key not in ARMS}
        return {**arms, **frozen}


def chosen_learning_rate(accuracies: dict[float, float]) -> float:
    """The base lr of the best held-out accuracy after the last epoch; a tie goes to the smaller lr."""
    return max(sorted(accuracies), key=lambda lr: accuracies[lr])


@functools.cache  # the report is rewritten after every stage; building ViT-B to count it once is enough
def encoder_parameters(overrides: str) -> int:
    """Parameters of the encoder that is fine-tuned (position table included, as in the paper's 86M for ViT-B)."""
    # Imported here, not at the top: the study's --help answers without loading torch.
    from ..configuration_mae import load_config
    from ..modeling_mae import MAEModel

    return MAEModel(load_config(DEFAULT_MODEL_CONFIG, overrides)).num_parameters()
