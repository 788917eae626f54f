"""The choice of the small-image fine-tuning recipe (configuration/finetune/small_images.yaml), made on a held-out part
of the train split, never on the split that is reported (`run_scripts/recipe_sweep.py`).

Two augmentations are compared: the paper's ImageNet one (the `run_finetune.py` defaults) and a light one for small
images (crops of 50-100% of the area + flip, label smoothing, nothing else), each at two base learning rates, for an
MAE-pretrained and a randomly initialised ViT-64 (the scaling study's middle size), 4 fine-tuning epochs each, on the
first 5,000 training images less a 10% held-out part per class, scored on 2,000 held-out images after the last epoch.
The rule, fixed before the run: the augmentation whose best-lr held-out accuracies, averaged over the two inits, are
higher becomes the recipe. A few CPU minutes per run: it picks an augmentation, not a schedule (the scaling study
picks its learning rates itself).
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

from .scaling import ARMS, Budget, StudyPlan, flag_value
from .stages import Stage

AUGMENTATIONS: dict[str, dict[str, Any]] = {
    "imagenet": {"crop_min_scale": 0.08, "rand_augment": True, "random_erasing": 0.25, "mixup": 0.8, "cutmix": 1.0,
                 "label_smoothing": 0.1},
    "small": {"crop_min_scale": 0.5, "rand_augment": False, "random_erasing": 0.0, "mixup": 0.0, "cutmix": 0.0,
              "label_smoothing": 0.1},
}


SWEEP = Budget(
    names=("ViT-64",), widths=(64,), heads=(2,), depth=6, decoder_overrides="", seeds=(0,), pretrain_epochs=10,
    finetune_epochs=4, learning_rates=(1e-3, 4e-3), batch_size=64, eval_batch_size=256, dataloader_num_workers=0,
    train_images=5_000, holdout_fraction=0.1, holdout_images=2_000, scratch_epoch_factor=1,
    estimate="about 25 CPU minutes",
)


def augmentation_flags(name: str) -> tuple[str, ...]:
    return tuple(item for key, value in AUGMENTATIONS[name].items() for item in (f"--{key}", flag_value(value)))


def sweep_stages(plan: StudyPlan, inits: tuple[str, ...] = ARMS) -> dict[str, Stage]:
    """The pretraining (when the MAE init is swept), then augmentation x init x lr fine-tunings, by stage name."""
    rung, seed = SWEEP.rungs()[0], SWEEP.seeds[0]
    stages = {plan.pretrain(rung, seed).name: plan.pretrain(rung, seed)} if "mae" in inits else {}
    for augmentation in AUGMENTATIONS:
        variant = replace(plan, recipe=augmentation_flags(augmentation))
        for arm in inits:
            for lr in SWEEP.learning_rates:
                stage = variant.finetune(arm, rung, seed, lr, holdout=True)
                stages[f"{augmentation}_{stage.name}"] = replace(stage, name=f"{augmentation}_{stage.name}")
    return stages


def held_out_accuracy(record: dict[str, Any], augmentation: str, arm: str, lr: float) -> float:
    """Top-1 (%) on the held-out images after the last epoch."""
    rung, seed = SWEEP.rungs()[0], SWEEP.seeds[0]
    name = f"{augmentation}_select-{arm}_lr{lr:g}_{rung.slug}_s{seed}"
    return 100 * record["stages"][name]["results"]["eval_accuracy"]


def choose(record: dict[str, Any]) -> dict[str, Any]:
    """Per augmentation and init the best lr's accuracy; the augmentation with the higher mean over inits wins."""
    best = {augmentation: {arm: max(held_out_accuracy(record, augmentation, arm, lr) for lr in SWEEP.learning_rates)
                           for arm in ARMS} for augmentation in AUGMENTATIONS}
    means = {augmentation: statistics.fmean(arms.values()) for augmentation, arms in best.items()}
    return {"best_per_init": best, "mean_over_inits": means, "chosen": max(means, key=lambda name: means[name])}


def render_sweep(record: dict[str, Any]) -> str:
    """Markdown: held-out top-1 of every run, the per-epoch curve, and the choice the rule makes."""
    rung = SWEEP.rungs()[0]
    columns = [(arm, lr) for arm in ARMS for lr in SWEEP.learning_rates]
    rows = [(f"Recipe sweep: {rung.name} ({rung.width} wide, {rung.depth} blocks), {SWEEP.train_images:,} training "
             f"images less a {SWEEP.holdout_fraction:.0%} held-out part per class, scored on "
             f"{SWEEP.holdout_images:,} held-out images after the last epoch; fine-tuning {SWEEP.finetune_epochs:g} "
             f"epochs (the MAE init after {SWEEP.pretrain_epochs:g} epochs of pretraining); "
             f"git {record['environment']['git']['sha'][:12]}."), "",
            "| augmentation | " + " | ".join(f"{arm}, base lr {lr:g}" for arm, lr in columns) + " |",
            "|---|" + "---:|" * len(columns)]
    for augmentation in AUGMENTATIONS:
        rows.append(f"| {augmentation} | " + " | ".join(
            f"{held_out_accuracy(record, augmentation, arm, lr):.1f}" for arm, lr in columns) + " |")
    choice = choose(record)
    means = ", ".join(f"{name} {value:.1f}" for name, value in choice["mean_over_inits"].items())
    rows += ["", f"Best-lr held-out top-1 averaged over the two inits: {means}. Chosen: **{choice['chosen']}**.", "",
             "Held-out top-1 after each epoch:", ""]
    for name, stage in record["stages"].items():
        history = stage["results"].get("history")
        if history:
            rows.append(f"- {name}: " + ", ".join(f"{100 * epoch['eval_accuracy']:.1f}" for epoch in history))
    return "\n".join(rows) + "\n"
