"""Does MAE pretraining help downstream? The paper's protocols in miniature, on the embedded Fashion-MNIST sample.

    python run_scripts/evidence.py --output_dir outputs/evidence --num_threads 1

1. pretrain the default model (tiny-32px) with `run_mae.py`;
2. k-NN, linear probe and fine-tuning of that encoder and of the same ViT from a random init, with the same
   commands and budgets (`run_knn.py`, `run_linear_probe.py`, `run_finetune.py`);
3. the masking-ratio ablation: shorter pretrainings at several ratios, each scored by a linear probe;
4. a reconstruction figure of the pretrained model (`visualize.py`).

Every stage is the documented command, run in this process by `modeling_mae.stages.StageRunner` (its output in
`output_dir/STAGE.log`); a stage whose `all_results.json` exists is reused (`--force` reruns everything), so an
interrupted run continues where it stopped. The table is written to `output_dir/evidence.md` and the numbers to
`output_dir/evidence.json`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from modeling_mae.arguments import (
    AT_LEAST_ONE,
    DEFAULT_MODEL_CONFIG,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Range,
    parse_arguments,
)
from modeling_mae.errors import exit_process, run_main
from modeling_mae.studies.stages import Stage, StageRunner, script_main
from modeling_mae.text import counted

SCRIPTS = pathlib.Path(__file__).resolve().parent


@dataclass
class EvidenceArguments:
    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "seed": SEED, "pretrain_epochs": POSITIVE, "ablation_epochs": POSITIVE, "ablation_warmup_epochs": NON_NEGATIVE,
        "ablation_mask_ratios": FRACTION, "finetune_samples": AT_LEAST_ONE, "finetune_epochs": POSITIVE,
        "long_finetune_epochs": POSITIVE, "short_budget_base_lr": NON_NEGATIVE, "num_threads": AT_LEAST_ONE,
    }

    output_dir: str = field(default="outputs/evidence", metadata={"help": "Every stage's folder, table and figure."})
    model_config: str = field(default=DEFAULT_MODEL_CONFIG, metadata={"help": "The ViT pretrained and compared."})
    seed: int = field(default=0, metadata={"help": "Seed of every stage (weights, masks, data order)."})
    pretrain_epochs: float = field(default=8, metadata={"help": "Pretraining of the main comparison."})
    ablation_epochs: float = field(default=1, metadata={"help": "Pretraining of each masking-ratio ablation run."})
    ablation_warmup_epochs: float = field(default=0.25, metadata={"help": "Warmup of each ablation run."})
    ablation_mask_ratios: list[float] = field(default_factory=lambda: [0.9, 0.75, 0.5, 0.25])
    finetune_samples: int = field(default=2500, metadata={"help": "Labelled training images for fine-tuning."})
    finetune_epochs: float = field(default=4, metadata={"help": "Fine-tuning epochs over those images."})
    long_finetune_epochs: float = field(default=12, metadata={"help": "Epochs of the longest fine-tuning row."})
    short_budget_base_lr: float = field(
        default=4e-3,
        metadata={"help": "Base lr of the other fine-tuning rows: the paper's 1e-3 (ViT-L/H) is tuned for 50-100 "
                          "epochs and, scaled to a 64-image batch, barely moves the new head in a few hundred steps."})
    num_threads: int | None = field(
        default=None, metadata={"help": "torch threads of every stage (on a busy 2-core CPU, 1 was 3.5x faster)."})
    force: bool = field(default=False, metadata={"help": "Rerun stages that already have results."})
    parts: list[str] = field(
        default_factory=lambda: ["main", "ablation"],
        metadata={"help": "Run only these parts (e.g. 'main' while the ablation pretrains elsewhere); the table and "
                          "figure are written when both are run."})


def pretrain_stage(name: str, args: EvidenceArguments, mask_ratio: float, schedule: Sequence[str] = ()) -> Stage:
    """`run_mae.py` with its defaults (tiny-32px on the embedded sample), a masking ratio and a schedule."""
    return Stage(name, "run_mae.py", ("--mask_ratio", f"{mask_ratio:g}", "--seed", str(args.seed),
                                      "--logging_steps", "20", *schedule))


def downstream_stages(init: str, model_flags: Sequence[str], args: EvidenceArguments) -> list[Stage]:
    """k-NN, linear probe and fine-tuning of one initialisation, with identical flags whatever the init."""
    seed = ("--seed", str(args.seed))
    finetune = (*model_flags, *seed, "--max_train_samples", str(args.finetune_samples))
    short = ("--num_train_epochs", f"{args.finetune_epochs:g}")
    lr = ("--base_learning_rate", f"{args.short_budget_base_lr:g}")
    no_mix = ("--mixup", "0", "--cutmix", "0")
    return [
        Stage(f"knn_{init}", "run_knn.py", (*model_flags, *seed)),
        Stage(f"linprobe_{init}", "run_linear_probe.py", (*model_flags, *seed)),
        Stage(f"linprobe-mean_{init}", "run_linear_probe.py", (*model_flags, *seed, "--pooling", "mean")),
        Stage(f"finetune_{init}", "run_finetune.py", (*finetune, *short)),
        Stage(f"finetune-lr_{init}", "run_finetune.py", (*finetune, *short, *lr)),
        Stage(f"finetune-nomix_{init}", "run_finetune.py", (*finetune, *short, *lr, *no_mix)),
        Stage(f"finetune-long_{init}", "run_finetune.py",
              (*finetune, "--num_train_epochs", f"{args.long_finetune_epochs:g}", *lr, *no_mix)),
    ]


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def protocols(args: EvidenceArguments) -> list[tuple[str, str]]:
    """(table label, stage prefix) of each protocol of the main comparison."""
    epochs, long_epochs = counted(args.finetune_epochs, "epoch"), counted(args.long_finetune_epochs, "epoch")
    return [
        ("k-NN (k=20, T=0.07, mean-pooled)", "knn"),
        ("linear probe (BN + linear, SGD, CLS token)", "linprobe"),
        ("linear probe (mean-pooled)", "linprobe-mean"),
        (f"fine-tuning, paper recipe ({args.finetune_samples} labelled images, {epochs})", "finetune"),
        (f"fine-tuning, same with base lr {args.short_budget_base_lr:g}", "finetune-lr"),
        (f"fine-tuning, base lr {args.short_budget_base_lr:g}, no MixUp/CutMix", "finetune-nomix"),
        (f"fine-tuning, base lr {args.short_budget_base_lr:g}, no MixUp/CutMix, {long_epochs}", "finetune-long"),
    ]


def render_table(
    main: dict[str, dict[str, Any]], ablation: dict[float, dict[str, Any]], args: EvidenceArguments
) -> str:
    rows = ["| protocol (top-1 %) | random init | MAE pretrained | gain |", "|---|---:|---:|---:|"]
    for label, key in protocols(args):
        scratch, mae = main[f"{key}_random"]["eval_accuracy"], main[f"{key}_mae"]["eval_accuracy"]
        rows.append(f"| {label} | {percent(scratch)} | {percent(mae)} | {100 * (mae - scratch):+.1f} |")
    probes = " | ".join(percent(result["eval_accuracy"]) for result in ablation.values())
    losses = " | ".join(f"{result['pretrain_loss']:.3f}" for result in ablation.values())
    rows += ["", "| mask ratio | " + " | ".join(f"{ratio:g}" for ratio in ablation) + " |",
             "|---|" + "---:|" * len(ablation),
             f"| linear probe top-1 % | {probes} |",
             f"| final pretraining loss | {losses} |"]
    return "\n".join(rows) + "\n"


def run_main_comparison(runner: StageRunner, args: EvidenceArguments) -> dict[str, dict[str, Any]]:
    """Pretraining, then every protocol on the pretrained encoder and on a random init."""
    schedule = ("--num_train_epochs", f"{args.pretrain_epochs:g}")
    results = {"pretrain": runner.run(pretrain_stage("pretrain", args, 0.75, schedule))}
    initialisations = {"mae": ("--model_name_or_path", str(runner.folder("pretrain"))),
                       "random": ("--model_config", args.model_config)}
    for init, flags in initialisations.items():
        for stage in downstream_stages(init, flags, args):
            results[stage.name] = runner.run(stage)
    return results


def run_ablation(runner: StageRunner, args: EvidenceArguments) -> dict[float, dict[str, Any]]:
    """A shorter pretraining per masking ratio, each scored by the same linear probe."""
    ablation: dict[float, dict[str, Any]] = {}
    for ratio in args.ablation_mask_ratios:
        name = f"ablation_mask{ratio:g}"
        schedule = ("--num_train_epochs", f"{args.ablation_epochs:g}",
                    "--warmup_epochs", f"{args.ablation_warmup_epochs:g}")
        pretrained = runner.run(pretrain_stage(name, args, ratio, schedule))
        probe = Stage(f"ablation_linprobe_mask{ratio:g}", "run_linear_probe.py",
                      ("--model_name_or_path", str(runner.folder(name)), "--seed", str(args.seed)))
        ablation[ratio] = {**runner.run(probe), "pretrain_loss": pretrained["final_loss"]}
    return ablation


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every stage and write the table; returns the collected numbers."""
    (args,) = parse_arguments((EvidenceArguments,), argv, __doc__)
    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(SCRIPTS, output_dir, force=args.force, num_threads=args.num_threads)
    main_results = run_main_comparison(runner, args) if "main" in args.parts else {}
    ablation = run_ablation(runner, args) if "ablation" in args.parts else {}
    if not (main_results and ablation):
        return {"main": main_results, "ablation": ablation}

    script_main(SCRIPTS / "visualize.py")(["--model_name_or_path", str(runner.folder("pretrain")),
                                           "--output", str(output_dir / "reconstruction.png"),
                                           "--seed", str(args.seed)])
    table = render_table(main_results, ablation, args)
    (output_dir / "evidence.md").write_text(table)
    collected = {"main": main_results, "ablation": {f"{ratio:g}": result for ratio, result in ablation.items()},
                 "total_stage_wall_seconds": runner.total_wall_seconds, "seed": args.seed}
    (output_dir / "evidence.json").write_text(json.dumps(collected, indent=2, default=str))
    print(table)
    return collected


if __name__ == "__main__":
    exit_process(run_main(main))
