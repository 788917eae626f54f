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

import functools
import json
import pathlib
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from modeling_mae import MAEModel, load_config
from modeling_mae.arguments import AT_LEAST_ONE, DEFAULT_MODEL_CONFIG, SEED, Range, parse_arguments
from modeling_mae.errors import UsageError, exit_process, run_main
from modeling_mae.studies.stages import Stage, StageRunner

SCRIPTS = pathlib.Path(__file__).resolve().parent
TABLE_FILE, NUMBERS_FILE = "scaling_study.md", "scaling_study.json"
SIZE_FIGURE, EPOCHS_FIGURE = "model_size.png", "pretraining_epochs.png"
PROTOCOLS = {  # cell key -> column title
    "scratch": "from scratch, fine-tuning recipe",
    "mae": "MAE pretrained, fine-tuned",
    "linprobe": "MAE linear probe",
    "knn": "MAE k-NN",
}
Results = dict[str, dict[str, Any]]  # a protocol's all_results.json, by PROTOCOLS key
MAE_LABEL, SCRATCH_LABEL = "MAE pretraining, then fine-tuning", "supervised from scratch (same recipe)"

# The paper's per-size fine-tuning settings (appendix A.1, Table 9): rung i of every ladder takes model i's.
PAPER_SIZES = (
    {"paper_model": "ViT-B", "layer_decay": 0.65, "drop_path_rate": 0.1, "paper_base_lr": 5e-4},
    {"paper_model": "ViT-L", "layer_decay": 0.75, "drop_path_rate": 0.2, "paper_base_lr": 1e-3},
    {"paper_model": "ViT-H", "layer_decay": 0.75, "drop_path_rate": 0.3, "paper_base_lr": 1e-3},
)
# The paper's schedules have ~1e5 optimizer steps, ours 1e2-1e3: at a few hundred steps the paper's learning rates
# barely move the weights (evidence.py, measured before this study). Both factors are the ones the repository already
# used for short runs: run_mae.py's default base lr 1.5e-3 (10 x 1.5e-4) and evidence.py's 4e-3 (4 x 1e-3).
PRETRAIN_BASE_LR = 1.5e-4 * 10
FINETUNE_LR_FACTOR = 4
PRETRAIN_WARMUP_FRACTION = 0.05  # the paper's 40 of 800 epochs
FINETUNE_WARMUP_FRACTION = 0.1  # the paper's 5 of 50 epochs (ViT-L/H)

RECIPE_RULES = (
    "Images: 32 px, 4 px patches (64 patches; the paper: 224 px, 16 px patches, 196 patches).",
    ("Sizes: a ladder of three encoder widths with the same depth and decoder (the paper keeps one 512x8 decoder "
     "for ViT-B/L/H); rung i takes the paper's per-size fine-tuning settings of ViT-B, L, H: layer decay "
     "0.65/0.75/0.75, drop path 0.1/0.2/0.3, base lr 5e-4/1e-3/1e-3."),
    (f"Learning rates: base lr x batch / 256 (the paper's rule), with base lrs {FINETUNE_LR_FACTOR}x the paper's for "
     f"fine-tuning and {PRETRAIN_BASE_LR:g} (10x the paper's 1.5e-4) for pretraining, because our schedules have "
     "1e2-1e3 optimizer steps instead of ~1e5."),
    (f"Warmup: {PRETRAIN_WARMUP_FRACTION:.0%} of the pretraining epochs (the paper's 40 of 800), "
     f"{FINETUNE_WARMUP_FRACTION:.0%} of the fine-tuning epochs (the paper's 5 of 50)."),
    "Pretraining: mask ratio 0.75, norm_pix_loss, AdamW (0.9, 0.95), weight decay 0.05, RandomResizedCrop + flip.",
    ("Fine-tuning: AdamW (0.9, 0.999), weight decay 0.05, RandAugment(9, 0.5), random erasing 0.25, MixUp 0.8, "
     "CutMix 1.0, label smoothing 0.1, global-pool head; the same epochs, batch and base lr for both inits."),
    ("Scratch: the fine-tuning recipe without layer decay (1.0): decay keeps pretrained lower layers close to their "
     "weights, which a random init does not have (the paper's from-scratch recipe has none either)."),
    ("Score: top-1 on the validation split after the last fine-tuning epoch (not the best epoch); mean and sample "
     "standard deviation over the seeds."),
)


@dataclass(frozen=True)
class Rung:
    """One encoder size of the ladder, with the paper's settings for its place in the ladder."""

    name: str
    width: int
    depth: int
    heads: int
    paper_model: str
    layer_decay: float
    drop_path_rate: float
    paper_base_lr: float

    @property
    def slug(self) -> str:
        return self.name.lower()

    @property
    def finetune_base_lr(self) -> float:
        return self.paper_base_lr * FINETUNE_LR_FACTOR

    def encoder_overrides(self) -> str:
        return (f"hidden_size={self.width},num_hidden_layers={self.depth},num_attention_heads={self.heads},"
                f"intermediate_size={4 * self.width}")


@dataclass(frozen=True)
class Budget:
    """How big the study is: the ladder, the seeds, the epochs and the data."""

    names: tuple[str, str, str]
    widths: tuple[int, int, int]
    heads: tuple[int, int, int]
    depth: int
    decoder_overrides: str
    seeds: tuple[int, ...]
    pretrain_epochs: float
    finetune_epochs: float
    sweep_epochs: tuple[float, ...]  # pretraining lengths of the schedule figure, pretrain_epochs among them
    batch_size: int
    eval_batch_size: int  # of every evaluation, and the linear probe's batch of cached features
    dataloader_num_workers: int
    data_flags: tuple[str, ...] = ()

    def rungs(self) -> list[Rung]:
        return [Rung(name, width, self.depth, heads, **paper)
                for name, width, heads, paper in zip(self.names, self.widths, self.heads, PAPER_SIZES)]

    def sweep_rung(self) -> Rung:
        """The middle size (the paper's schedule figure uses its middle model, ViT-L)."""
        return self.rungs()[1]


BUDGETS = {
    # CI: tiny models on 32 of the sample's images, two seeds (a standard deviation); checks the plumbing only.
    "smoke": Budget(
        names=("ViT-8", "ViT-16", "ViT-32"), widths=(8, 16, 32), heads=(2, 2, 2), depth=1,
        decoder_overrides="decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,"
                          "decoder_intermediate_size=32",
        seeds=(0, 1), pretrain_epochs=1, finetune_epochs=1, sweep_epochs=(0.5, 1), batch_size=8,
        eval_batch_size=16, dataloader_num_workers=0,
        data_flags=("--max_train_samples", "32", "--max_eval_samples", "16"),
    ),
    # A 2-core CPU: tiny-32px's 6 blocks and decoder at widths 32/64/128 (1:2:4, as ViT-Ti/S/B), 2 heads.
    "cpu": Budget(
        names=("ViT-32", "ViT-64", "ViT-128"), widths=(32, 64, 128), heads=(2, 2, 2), depth=6,
        decoder_overrides="", seeds=(0, 1, 2), pretrain_epochs=4, finetune_epochs=2, sweep_epochs=(1, 2, 4),
        batch_size=64, eval_batch_size=256, dataloader_num_workers=0,
    ),
    # One H100/H200: ViT-Ti/S/B (12 blocks, 64-wide heads) with the tiny/small presets' 256x4 decoder.
    "gpu": Budget(
        names=("ViT-Ti", "ViT-S", "ViT-B"), widths=(192, 384, 768), heads=(3, 6, 12), depth=12,
        decoder_overrides="decoder_hidden_size=256,decoder_num_hidden_layers=4,decoder_num_attention_heads=8,"
                          "decoder_intermediate_size=1024",
        seeds=(0, 1, 2), pretrain_epochs=8, finetune_epochs=2, sweep_epochs=(2, 4, 8), batch_size=256,
        eval_batch_size=256, dataloader_num_workers=8,
    ),
}


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


# --------------------------------------------------------------------------------------------------------- stages


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


# -------------------------------------------------------------------------------------------------------- summary


def cell(accuracies: Sequence[float]) -> dict[str, Any]:
    """Top-1 of several seeds in percent: the values, their mean and sample standard deviation (n - 1)."""
    percents = [100 * accuracy for accuracy in accuracies]
    std = statistics.stdev(percents) if len(percents) > 1 else None
    return {"values": percents, "n": len(percents), "mean": statistics.fmean(percents), "std": std}


def format_parameters(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.0f}k"


def format_cell(summary: dict[str, Any]) -> str:
    spread = "n/a" if summary["std"] is None else f"{summary['std']:.1f}"
    return f"{summary['mean']:.1f} ± {spread}"


@functools.cache  # the summary is rewritten after every seed; building ViT-B to count it once is enough
def encoder_parameters(rung: Rung) -> int:
    """Parameters of the encoder that is fine-tuned (position table included, as in the paper's 86M for ViT-B)."""
    return MAEModel(load_config(DEFAULT_MODEL_CONFIG, rung.encoder_overrides())).num_parameters()


def summarise(
    per_seed: dict[int, dict[str, Results]], sweep: dict[int, dict[float, dict[str, Any]]], rungs: Sequence[Rung]
) -> dict[str, Any]:
    """Cells of every size and protocol, and of every sweep length, over the seeds run so far."""
    sizes = []
    for rung in rungs:
        cells = {key: cell([results[rung.name][key]["eval_accuracy"] for results in per_seed.values()])
                 for key in PROTOCOLS}
        # The last epoch's training loss says whether fine-tuning got anywhere (chance: ln 10 = 2.30).
        losses = {key: statistics.fmean(results[rung.name][key]["train_loss"] for results in per_seed.values())
                  for key in ("scratch", "mae")}
        sizes.append({**asdict(rung), "finetune_base_lr": rung.finetune_base_lr,
                      "parameters": encoder_parameters(rung), "cells": cells, "finetune_train_loss": losses})
    lengths = sorted({epochs for results in sweep.values() for epochs in results})
    schedule = {f"{epochs:g}": cell([results[epochs]["eval_accuracy"] for results in sweep.values()])
                for epochs in lengths}
    return {"seeds": sorted(per_seed), "sizes": sizes, "sweep": schedule}


def render_table(summary: dict[str, Any], budget_line: str, sweep_rung: str) -> str:
    """Markdown: the recipe's rules, the budget, the size table and the schedule table."""
    rows = [f"Budget: {budget_line}; seeds {', '.join(map(str, summary['seeds']))}.", "",
            "| model | encoder parameters | " + " | ".join(PROTOCOLS.values()) + " | MAE gain |",
            "|---|---:|" + "---:|" * (len(PROTOCOLS) + 1)]
    for size in summary["sizes"]:
        cells = size["cells"]
        gain = cells["mae"]["mean"] - cells["scratch"]["mean"]
        rows.append(f"| {size['name']} ({size['width']} wide, {size['depth']} blocks) | "
                    f"{format_parameters(size['parameters'])} | " + " | ".join(format_cell(cells[key]) for key in PROTOCOLS)
                    + f" | {gain:+.1f} |")
    losses = "; ".join(f"{size['name']} {size['finetune_train_loss']['scratch']:.2f} from scratch, "
                       f"{size['finetune_train_loss']['mae']:.2f} from MAE" for size in summary["sizes"])
    rows += ["", f"Fine-tuning loss in the last epoch, mean over seeds (chance: 2.30): {losses}."]
    scratch = summary["sizes"][1]["cells"]["scratch"]
    lengths = summary["sweep"]
    rows += ["", f"| {sweep_rung}: pretraining epochs | 0 (from scratch) | " + " | ".join(lengths) + " |",
             "|---|" + "---:|" * (len(lengths) + 1),
             f"| fine-tuned top-1 % | {format_cell(scratch)} | "
             + " | ".join(format_cell(value) for value in lengths.values()) + " |",
             "", "Recipe (fixed before the runs):", *[f"- {rule}" for rule in RECIPE_RULES]]
    return "\n".join(rows) + "\n"


# -------------------------------------------------------------------------------------------------------- figures


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend; matplotlib is the optional `study` extra."""
    try:
        import matplotlib
    except ImportError as error:
        raise UsageError("the study's figures need matplotlib: pip install 'modeling-mae[study]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure() -> tuple[Any, Any]:
    return pyplot().subplots(figsize=(5, 4), dpi=150)


def draw_cells(axes: Any, x: Sequence[float], cells: Sequence[dict[str, Any]], style: str, label: str) -> None:
    """Mean top-1 of each cell, with an error bar of ±1 sample std (none for a single seed)."""
    axes.errorbar(x, [c["mean"] for c in cells], yerr=[c["std"] or 0.0 for c in cells], fmt=style, capsize=4,
                  label=label)


def save_figure(figure: Any, axes: Any, path: pathlib.Path, xlabel: str, title: str) -> Any:
    axes.set(xlabel=xlabel, ylabel="fine-tuned top-1 accuracy (%)")
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    pyplot().close(figure)
    return figure


def plot_model_size(summary: dict[str, Any], path: pathlib.Path, title: str) -> Any:
    """Top-1 against encoder parameters (log scale), MAE and scratch with error bars; returns the figure."""
    figure, axes = new_figure()
    parameters = [size["parameters"] for size in summary["sizes"]]
    for key, label, style in (("mae", MAE_LABEL, "o-"), ("scratch", SCRATCH_LABEL, "s--")):
        draw_cells(axes, parameters, [size["cells"][key] for size in summary["sizes"]], style, label)
    axes.set_xscale("log")
    axes.set_xticks(parameters, [f"{size['name']}\n{format_parameters(size['parameters'])}" for size in summary["sizes"]])
    axes.minorticks_off()
    return save_figure(figure, axes, path, "encoder parameters", title)


def plot_pretraining_epochs(summary: dict[str, Any], path: pathlib.Path, title: str) -> Any:
    """Fine-tuned top-1 of the sweep size against pretraining epochs, the scratch run as a band; returns the figure."""
    figure, axes = new_figure()
    epochs = [float(length) for length in summary["sweep"]]
    draw_cells(axes, epochs, list(summary["sweep"].values()), "o-", MAE_LABEL)
    scratch = summary["sizes"][1]["cells"]["scratch"]
    axes.axhline(scratch["mean"], color="gray", linestyle="--", label=SCRATCH_LABEL)
    spread = scratch["std"] or 0.0
    axes.axhspan(scratch["mean"] - spread, scratch["mean"] + spread, color="gray", alpha=0.15)
    axes.set_xticks(epochs, [f"{value:g}" for value in epochs])
    return save_figure(figure, axes, path, "pretraining epochs", title)


# ----------------------------------------------------------------------------------------------------------- main


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
