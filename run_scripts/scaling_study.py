"""Does MAE pretraining pay off more as the model grows? The paper's model-size and schedule figures in miniature.

    python run_scripts/scaling_study.py --budget smoke                     # CI: ~20 s of CPU time
    python run_scripts/scaling_study.py --budget cpu --num_threads 1       # ~1.3 h on one idle core
    python run_scripts/make_sample_data.py --full                          # all of Fashion-MNIST, for --budget gpu
    ACCELERATE_MIXED_PRECISION=bf16 python run_scripts/scaling_study.py --budget gpu \\
        --dataset_name outputs/fashion_mnist_full                          # one H100/H200: ~11 min (estimated)

Seeds can run in parallel processes on the same `--output_dir` (`--seeds 0 2` and `--seeds 1` on two cores); one
more run with every seed then writes the complete table, reusing every stage.

For a ladder of three encoder sizes and several seeds, on the same data with the same augmentations:
(a) supervised training from a random init with the fine-tuning recipe ("scratch");
(b) MAE pretraining (`run_mae.py`), then fine-tuning with the same recipe and budget ("MAE");
(c) the linear probe and k-NN of (b)'s encoder;
and, for the ladder's middle size, (b) after shorter pretrainings. Every run is one of the run scripts' `main(argv)`
(`modeling_mae.stages`: its log in `output_dir/STAGE.log`, finished stages reused when the study is rerun).

Output in `output_dir`: `scaling_study.md` and `scaling_study.json` (top-1 mean ± sample std over seeds per cell),
`model_size.png` (top-1 against encoder parameters, MAE and scratch, error bars: the paper's Figure 8) and
`pretraining_epochs.png` (top-1 against pretraining epochs for one size: the paper's Figure 7). The table and the
figures are rewritten after each seed, so an interrupted study still shows what it has.

The recipe is the paper's (appendix A.1; `run_mae.py` and `run_finetune.py` defaults otherwise), scaled down by
rules fixed before any run, listed in `RECIPE_RULES` and written into the table.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from modeling_mae.arguments import AT_LEAST_ONE, DEFAULT_MODEL_CONFIG, SEED, Range, parse_arguments
from modeling_mae.errors import exit_process, run_main
from modeling_mae.studies.scaling import (
    BUDGETS,
    FINETUNE_WARMUP_FRACTION,
    PRETRAIN_BASE_LR,
    PRETRAIN_WARMUP_FRACTION,
    RECIPE_RULES,
    Budget,
    Results,
    Rung,
)
from modeling_mae.studies.scaling_report import plot_model_size, plot_pretraining_epochs, render_table, summarise
from modeling_mae.studies.stages import Stage, StageRunner

SCRIPTS = pathlib.Path(__file__).resolve().parent


TABLE_FILE, NUMBERS_FILE = "scaling_study.md", "scaling_study.json"


SIZE_FIGURE, EPOCHS_FIGURE = "model_size.png", "pretraining_epochs.png"


@dataclass
class StudyArguments:
    FLAG_RANGES: ClassVar[dict[str, Range]] = {"seeds": SEED, "num_threads": AT_LEAST_ONE}

    budget: str = field(metadata={"help": "smoke (CI, seconds), cpu (~1.3 h on one idle core) or gpu (~11 min on one "
                                          "H100/H200, estimated).", "choices": list(BUDGETS)})
    output_dir: str = field(default="outputs/scaling-study", metadata={"help": "Stages, table and figures."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Data of every stage (default: the embedded 10k/2k Fashion-MNIST sample; "
                                        "the full 60k/10k: run_scripts/make_sample_data.py --full)."})
    seeds: list[int] | None = field(default=None, metadata={"help": "Seeds (default: the budget's, 0 1 2)."})
    num_threads: int | None = field(
        default=None, metadata={"help": "torch threads of every stage (on a busy 2-core CPU, 1 is fastest)."})
    force: bool = field(default=False, metadata={"help": "Rerun stages that already have results."})


def data_flags(budget: Budget, args: StudyArguments) -> tuple[str, ...]:
    dataset = ("--dataset_name", args.dataset_name) if args.dataset_name else ()
    return (*dataset, *budget.data_flags, "--dataloader_num_workers", str(budget.dataloader_num_workers))


def pretrain_stage(rung: Rung, epochs: float, seed: int, budget: Budget, data: Sequence[str]) -> Stage:
    overrides = ",".join(filter(None, (rung.encoder_overrides(), budget.decoder_overrides)))
    return Stage(f"pretrain_{rung.slug}_ep{epochs:g}_s{seed}", "run_mae.py", (
        "--model_config", DEFAULT_MODEL_CONFIG, "--config_overrides", overrides,
        "--mask_ratio", "0.75", "--norm_pix_loss", "true", "--base_learning_rate", f"{PRETRAIN_BASE_LR:g}",
        "--num_train_epochs", f"{epochs:g}", "--warmup_epochs", f"{PRETRAIN_WARMUP_FRACTION * epochs:g}",
        "--per_device_train_batch_size", str(budget.batch_size), "--per_device_eval_batch_size",
        str(budget.eval_batch_size), "--seed", str(seed), "--logging_steps", "20", *data,
    ))


def finetune_stage(name: str, model_flags: Sequence[str], layer_decay: float, rung: Rung, seed: int, budget: Budget,
                   data: Sequence[str]) -> Stage:
    """`run_finetune.py` with the study's recipe: only the initialisation and the layer decay differ."""
    epochs = budget.finetune_epochs
    return Stage(name, "run_finetune.py", (
        *model_flags, "--layer_decay", f"{layer_decay:g}", "--drop_path_rate", f"{rung.drop_path_rate:g}",
        "--base_learning_rate", f"{rung.finetune_base_lr:g}", "--num_train_epochs", f"{epochs:g}",
        "--warmup_epochs", f"{FINETUNE_WARMUP_FRACTION * epochs:g}",
        "--per_device_train_batch_size", str(budget.batch_size), "--per_device_eval_batch_size",
        str(budget.eval_batch_size), "--seed", str(seed), *data,
    ))


def mae_finetune(runner: StageRunner, rung: Rung, epochs: float, seed: int, budget: Budget,
                 data: Sequence[str]) -> tuple[Stage, dict[str, Any]]:
    """Pretrain for `epochs`, then fine-tune; returns the pretraining stage and the fine-tuning results."""
    pretrain = pretrain_stage(rung, epochs, seed, budget, data)
    runner.run(pretrain)
    weights = ("--model_name_or_path", str(runner.folder(pretrain.name)))
    name = f"finetune-mae_{rung.slug}_ep{epochs:g}_s{seed}"
    return pretrain, runner.run(finetune_stage(name, weights, rung.layer_decay, rung, seed, budget, data))


def run_rung(runner: StageRunner, rung: Rung, seed: int, budget: Budget, data: Sequence[str]) -> Results:
    """Every protocol of one size and seed: its results per cell key of `PROTOCOLS`."""
    pretrain, mae = mae_finetune(runner, rung, budget.pretrain_epochs, seed, budget, data)
    init = ("--model_config", DEFAULT_MODEL_CONFIG, "--config_overrides", rung.encoder_overrides())
    scratch = runner.run(finetune_stage(f"finetune-scratch_{rung.slug}_s{seed}", init, 1.0, rung, seed, budget, data))
    encoder = ("--model_name_or_path", str(runner.folder(pretrain.name)), "--seed", str(seed),
               "--per_device_eval_batch_size", str(budget.eval_batch_size), *data)
    probe = runner.run(Stage(f"linprobe-mae_{rung.slug}_s{seed}", "run_linear_probe.py",
                             (*encoder, "--per_device_train_batch_size", str(budget.eval_batch_size))))
    knn = runner.run(Stage(f"knn-mae_{rung.slug}_s{seed}", "run_knn.py", encoder))
    return {"scratch": scratch, "mae": mae, "linprobe": probe, "knn": knn}


def run_sweep(runner: StageRunner, seed: int, budget: Budget, data: Sequence[str]) -> dict[float, dict[str, Any]]:
    """MAE fine-tuning results of the sweep size after each pretraining length (the ladder's own run among them)."""
    rung = budget.sweep_rung()
    return {epochs: mae_finetune(runner, rung, epochs, seed, budget, data)[1] for epochs in budget.sweep_epochs}


def budget_line(name: str, budget: Budget, args: StudyArguments, images: dict[str, int]) -> str:
    """The budget in epochs and images, the image counts as the stages reported them."""
    data = args.dataset_name or "the embedded Fashion-MNIST sample"
    return (f"`--budget {name}` on {data} ({images['train']:,} training images, {images['validation']:,} validation); "
            f"pretraining {budget.pretrain_epochs:g} epochs ({budget.pretrain_epochs * images['train']:,.0f} images), "
            f"fine-tuning {budget.finetune_epochs:g} epochs ({budget.finetune_epochs * images['train']:,.0f} images), "
            f"batch {budget.batch_size}")


def write_outputs(output_dir: pathlib.Path, summary: dict[str, Any], name: str, budget: Budget,
                  args: StudyArguments, images: dict[str, int], wall_seconds: float) -> None:
    line = budget_line(name, budget, args, images)
    sweep_rung = budget.sweep_rung().name
    (output_dir / TABLE_FILE).write_text(render_table(summary, line, sweep_rung))
    numbers = {**summary, "budget": name, "budget_description": line, "recipe": list(RECIPE_RULES),
               "stage_wall_seconds": wall_seconds}
    (output_dir / NUMBERS_FILE).write_text(json.dumps(numbers, indent=2))
    data = f"{pathlib.Path(args.dataset_name).name if args.dataset_name else 'Fashion-MNIST sample'}, 32 px"
    seeds = f"mean ± std of {len(summary['seeds'])} seeds"
    plot_model_size(summary, output_dir / SIZE_FIGURE, f"Fine-tuned top-1 vs model size\n{data}, {seeds}")
    plot_pretraining_epochs(summary, output_dir / EPOCHS_FIGURE,
                            f"{sweep_rung}: fine-tuned top-1 vs pretraining length\n{data}, {seeds}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every stage, seed after seed, rewriting the table and figures after each; returns the summary."""
    (args,) = parse_arguments((StudyArguments,), argv)
    budget = BUDGETS[args.budget]
    seeds = args.seeds or list(budget.seeds)
    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(SCRIPTS, output_dir, force=args.force, num_threads=args.num_threads)
    data, rungs = data_flags(budget, args), budget.rungs()
    per_seed: dict[int, dict[str, Results]] = {}
    sweep: dict[int, dict[float, dict[str, Any]]] = {}
    summary: dict[str, Any] = {}
    for seed in seeds:
        per_seed[seed] = {rung.name: run_rung(runner, rung, seed, budget, data) for rung in rungs}
        sweep[seed] = run_sweep(runner, seed, budget, data)
        summary = summarise(per_seed, sweep, rungs)
        knn = per_seed[seed][rungs[0].name]["knn"]  # it counted every training and validation image
        images = {"train": knn["train_samples"], "validation": knn["eval_samples"]}
        write_outputs(output_dir, summary, args.budget, budget, args, images, runner.total_wall_seconds)
    print((output_dir / TABLE_FILE).read_text())
    return summary


if __name__ == "__main__":
    exit_process(run_main(main))
