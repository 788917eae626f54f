"""Does MAE pretraining help downstream? The paper's protocols in miniature, on the embedded Fashion-MNIST sample.

    python run_scripts/evidence.py --output_dir outputs/evidence --num_threads 1

1. pretrain the default model (tiny-32px) with `run_mae.py`;
2. k-NN, linear probe and fine-tuning of that encoder and of the same ViT from a random init, with the same
   commands and budgets (`run_knn.py`, `run_linear_probe.py`, `run_finetune.py`);
3. the masking-ratio ablation: shorter pretrainings at several ratios, each scored by a linear probe;
4. a reconstruction figure of the pretrained model (`visualize.py`).

Every stage is a subprocess running the documented command; a stage whose `all_results.json` exists is reused
(`--force` reruns everything), so an interrupted run continues where it stopped. The table is written to
`output_dir/evidence.md` and the numbers to `output_dir/evidence.json`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
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
from modeling_mae.errors import run_main

SCRIPTS = pathlib.Path(__file__).resolve().parent
RESULTS_FILE = "all_results.json"
STAGE_TIME_FILE = "stage_time.json"


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
        default=None, metadata={"help": "OMP_NUM_THREADS of every stage (on a busy 2-core CPU, 1 was 3.5x faster)."})
    force: bool = field(default=False, metadata={"help": "Rerun stages that already have results."})
    parts: list[str] = field(
        default_factory=lambda: ["main", "ablation"],
        metadata={"help": "Run only these parts (e.g. 'main' while the ablation pretrains elsewhere); the table and "
                          "figure are written when both are run."})


@dataclass
class Stage:
    name: str
    script: str
    argv: list[str]

    def command(self) -> str:
        return " ".join(["python", f"run_scripts/{self.script}", *self.argv])


def run_stage(stage: Stage, output_dir: pathlib.Path, args: EvidenceArguments) -> dict[str, Any]:
    """Run (or reuse) one stage; returns its results plus `wall_seconds`."""
    folder = output_dir / stage.name
    results_path = folder / RESULTS_FILE
    if args.force or not results_path.is_file():
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if args.num_threads is not None:
            env.update(OMP_NUM_THREADS=str(args.num_threads), MKL_NUM_THREADS=str(args.num_threads))
        print(f"[{time.strftime('%H:%M:%S')}] {stage.command()}", flush=True)
        start = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        with open(output_dir / f"{stage.name}.log", "w") as log:
            subprocess.run([sys.executable, str(SCRIPTS / stage.script), *stage.argv], env=env, check=True,
                           stdout=log, stderr=subprocess.STDOUT)
        (folder / STAGE_TIME_FILE).write_text(json.dumps({"wall_seconds": time.perf_counter() - start}))
    results = json.loads(results_path.read_text())
    timing = folder / STAGE_TIME_FILE
    # Stages started by hand before this script existed have no timing file: their own runtime stands in.
    fallback = results.get("train_runtime") or results.get("runtime") or results.get("eval_runtime")
    results["wall_seconds"] = json.loads(timing.read_text())["wall_seconds"] if timing.is_file() else fallback
    return results


def pretrain_stage(
    name: str, output_dir: pathlib.Path, args: EvidenceArguments, mask_ratio: float, schedule: Sequence[str] = ()
) -> Stage:
    """`run_mae.py` with its defaults (tiny-32px on the embedded sample), a masking ratio and a schedule."""
    return Stage(name, "run_mae.py", ["--output_dir", str(output_dir / name), "--mask_ratio", f"{mask_ratio:g}",
                                      "--seed", str(args.seed), "--logging_steps", "20", *schedule])


def downstream_stages(
    init: str, model_flags: list[str], output_dir: pathlib.Path, args: EvidenceArguments
) -> list[Stage]:
    """k-NN, linear probe and fine-tuning of one initialisation, with identical flags whatever the init."""
    seed = ["--seed", str(args.seed)]
    return [
        Stage(f"knn_{init}", "run_knn.py", [*model_flags, "--output_dir", str(output_dir / f"knn_{init}"), *seed]),
        Stage(f"linprobe_{init}", "run_linear_probe.py",
              [*model_flags, "--output_dir", str(output_dir / f"linprobe_{init}"), *seed]),
        Stage(f"linprobe-mean_{init}", "run_linear_probe.py",
              [*model_flags, "--output_dir", str(output_dir / f"linprobe-mean_{init}"), *seed, "--pooling", "mean"]),
        Stage(f"finetune_{init}", "run_finetune.py",
              [*model_flags, "--output_dir", str(output_dir / f"finetune_{init}"), *seed,
               "--max_train_samples", str(args.finetune_samples), "--num_train_epochs", f"{args.finetune_epochs:g}"]),
        Stage(f"finetune-lr_{init}", "run_finetune.py",
              [*model_flags, "--output_dir", str(output_dir / f"finetune-lr_{init}"), *seed,
               "--max_train_samples", str(args.finetune_samples), "--num_train_epochs", f"{args.finetune_epochs:g}",
               "--base_learning_rate", f"{args.short_budget_base_lr:g}"]),
        Stage(f"finetune-nomix_{init}", "run_finetune.py",
              [*model_flags, "--output_dir", str(output_dir / f"finetune-nomix_{init}"), *seed,
               "--max_train_samples", str(args.finetune_samples), "--num_train_epochs", f"{args.finetune_epochs:g}",
               "--base_learning_rate", f"{args.short_budget_base_lr:g}", "--mixup", "0", "--cutmix", "0"]),
        Stage(f"finetune-long_{init}", "run_finetune.py",
              [*model_flags, "--output_dir", str(output_dir / f"finetune-long_{init}"), *seed,
               "--max_train_samples", str(args.finetune_samples),
               "--num_train_epochs", f"{args.long_finetune_epochs:g}",
               "--base_learning_rate", f"{args.short_budget_base_lr:g}", "--mixup", "0", "--cutmix", "0"]),
    ]


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def protocols(args: EvidenceArguments) -> list[tuple[str, str]]:
    """(table label, stage prefix) of each protocol of the main comparison."""
    return [
        ("k-NN (k=20, T=0.07, mean-pooled)", "knn"),
        ("linear probe (BN + linear, SGD, CLS token)", "linprobe"),
        ("linear probe (mean-pooled)", "linprobe-mean"),
        (f"fine-tuning, paper recipe ({args.finetune_samples} labelled images, {args.finetune_epochs:g} epochs)",
         "finetune"),
        (f"fine-tuning, same with base lr {args.short_budget_base_lr:g}", "finetune-lr"),
        (f"fine-tuning, base lr {args.short_budget_base_lr:g}, no MixUp/CutMix", "finetune-nomix"),
        (f"fine-tuning, base lr {args.short_budget_base_lr:g}, no MixUp/CutMix, {args.long_finetune_epochs:g} epochs",
         "finetune-long"),
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


def run_main_comparison(output_dir: pathlib.Path, args: EvidenceArguments) -> dict[str, dict[str, Any]]:
    """Pretraining, then every protocol on the pretrained encoder and on a random init."""
    schedule = ["--num_train_epochs", f"{args.pretrain_epochs:g}"]
    results = {"pretrain": run_stage(pretrain_stage("pretrain", output_dir, args, 0.75, schedule), output_dir, args)}
    initialisations = {"mae": ["--model_name_or_path", str(output_dir / "pretrain")],
                       "random": ["--model_config", args.model_config]}
    for init, flags in initialisations.items():
        for stage in downstream_stages(init, flags, output_dir, args):
            results[stage.name] = run_stage(stage, output_dir, args)
    return results


def run_ablation(output_dir: pathlib.Path, args: EvidenceArguments) -> dict[float, dict[str, Any]]:
    """A shorter pretraining per masking ratio, each scored by the same linear probe."""
    ablation: dict[float, dict[str, Any]] = {}
    for ratio in args.ablation_mask_ratios:
        name = f"ablation_mask{ratio:g}"
        schedule = ["--num_train_epochs", f"{args.ablation_epochs:g}",
                    "--warmup_epochs", f"{args.ablation_warmup_epochs:g}"]
        pretrained = run_stage(pretrain_stage(name, output_dir, args, ratio, schedule), output_dir, args)
        probe = Stage(f"ablation_linprobe_mask{ratio:g}", "run_linear_probe.py",
                      ["--model_name_or_path", str(output_dir / name),
                       "--output_dir", str(output_dir / f"ablation_linprobe_mask{ratio:g}"), "--seed", str(args.seed)])
        ablation[ratio] = {**run_stage(probe, output_dir, args), "pretrain_loss": pretrained["final_loss"],
                           "pretrain_wall_seconds": pretrained["wall_seconds"]}
    return ablation


def total_wall_seconds(main_results: dict[str, dict[str, Any]], ablation: dict[float, dict[str, Any]]) -> float:
    """CPU wall time of every stage, summed (reused stages count with the time they took when they ran)."""
    return sum(result["wall_seconds"] for result in main_results.values()) + sum(
        result["wall_seconds"] + result["pretrain_wall_seconds"] for result in ablation.values())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every stage and write the table; returns the collected numbers."""
    (args,) = parse_arguments((EvidenceArguments,), argv)
    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    main_results = run_main_comparison(output_dir, args) if "main" in args.parts else {}
    ablation = run_ablation(output_dir, args) if "ablation" in args.parts else {}
    if not (main_results and ablation):
        return {"main": main_results, "ablation": ablation}

    subprocess.run([sys.executable, str(SCRIPTS / "visualize.py"), "--model_name_or_path", str(output_dir / "pretrain"),
                    "--output", str(output_dir / "reconstruction.png"), "--seed", str(args.seed)], check=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    table = render_table(main_results, ablation, args)
    (output_dir / "evidence.md").write_text(table)
    collected = {"main": main_results, "ablation": {f"{ratio:g}": result for ratio, result in ablation.items()},
                 "total_stage_wall_seconds": total_wall_seconds(main_results, ablation), "seed": args.seed}
    (output_dir / "evidence.json").write_text(json.dumps(collected, indent=2, default=str))
    print(table)
    return collected


if __name__ == "__main__":
    sys.exit(run_main(main))
