"""Does MAE pretraining pay off more as the model grows? The study, version 2, pre-registered in docs/evaluation.md.

    python run_scripts/scaling_study.py --budget smoke                           # CI: about a minute of CPU
    python run_scripts/make_sample_data.py --full                                # all of Fashion-MNIST
    nohup nice -n 19 python run_scripts/scaling_study.py --budget cpu --num_threads 2 \\
        --dataset_name outputs/fashion_mnist_full --output_dir outputs/scaling-v2-cpu --record_dir docs/records \\
        > outputs/scaling-v2-cpu.log 2>&1 &                                     # ~8 core-hours; resumable
    ACCELERATE_MIXED_PRECISION=bf16 python run_scripts/scaling_study.py --budget gpu \\
        --dataset_name outputs/fashion_mnist_full --record_dir docs/records      # ~4 GPU-hours (estimated)
    python run_scripts/scaling_study.py --from_record docs/records/scaling_study_smoke.json    # table + figures
    python run_scripts/scaling_study.py --from_record docs/records/scaling_study_smoke.json \\
        --rerun finetune-mae_vit-16_s1 --output_dir outputs/rerun                            # one stage again

First the learning rate of each arm (MAE fine-tuning, scratch) is chosen on a held-out part of the train split, at the
middle size; then, for every seed and size, with those rates: MAE pretraining and fine-tuning, scratch training for
twice the epochs, and the linear probe and k-NN of the MAE encoder and of a random one, all scored on the test split
(`modeling_mae/studies/scaling.py`). Every stage is one of the run scripts' `main(argv)` (`studies.stages`: its log in
`output_dir/STAGE.log`; finished stages are reused, so an interrupted study goes on where it stopped when the same
command runs again).

After every stage the study writes its record (every stage's arguments, results and curves, git SHA, library versions,
machine, wall time) to `output_dir/scaling_study.json` and to `--record_dir`/scaling_study_BUDGET.json, and from it
the table (`.md` beside the record) and the figures (`_gain.png`, `_curves.png`). `--from_record` makes the table and
figures again from a record alone (`--readme README.md`: and the README's plot and sentence); with `--rerun STAGE` it
runs that stage again (and the stages it reads) under `--output_dir` and prints the new top-1 beside the recorded one.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from modeling_mae.arguments import AT_LEAST_ONE, SEED, Range, parse_arguments
from modeling_mae.errors import UsageError, exit_process, run_main
from modeling_mae.studies.records import (
    environment,
    load_record,
    rerun_stage,
    stage_entries,
    write_cpu_seconds,
    write_record,
)
from modeling_mae.studies.scaling import (
    BUDGETS,
    Budget,
    StudyPlan,
    chosen_learning_rate,
    encoder_parameters,
    recipe_flags,
)
from modeling_mae.studies.scaling_report import (
    readme_section,
    replace_readme_section,
    write_report,
)
from modeling_mae.studies.stages import STAGE_RECORD_FILE, Stage, StageRunner
from modeling_mae.text import counted

SCRIPTS = pathlib.Path(__file__).resolve().parent
REPOSITORY = SCRIPTS.parent
RECORD_FILE = "scaling_study.json"
PROTOCOL = "docs/evaluation.md#the-scaling-study-version-2-pre-registered"


@dataclass
class StudyArguments:
    FLAG_RANGES: ClassVar[dict[str, Range]] = {"seeds": SEED, "num_threads": AT_LEAST_ONE}

    budget: str | None = field(default=None, metadata={"help": "smoke (CI), cpu (~8 core-hours) or gpu (~4 "
                                                               "GPU-hours, estimated).", "choices": list(BUDGETS)})
    output_dir: str = field(default="outputs/scaling-study", metadata={"help": "Stages, record, table and figures."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Data of every stage (default: the embedded 10k/2k Fashion-MNIST sample; "
                                        "the protocol's: the full 60k/10k, run_scripts/make_sample_data.py --full)."})
    seeds: list[int] | None = field(default=None, metadata={"help": "Seeds (default: the budget's)."})
    record_dir: str | None = field(default=None, metadata={"help": "A second place for the record, as "
                                                                   "scaling_study_BUDGET.json (e.g. docs/records)."})
    from_record: str | None = field(default=None, metadata={"help": "Make the table and figures of this record."})
    rerun: str | None = field(default=None, metadata={"help": "With --from_record: run this stage again."})
    readme: str | None = field(default=None, metadata={"help": "With --from_record: write its gain plot and sentence "
                                                               "into this README, between the study's markers."})
    num_threads: int | None = field(
        default=None, metadata={"help": "torch threads of every stage (on a busy 2-core CPU, 1 is fastest)."})
    force: bool = field(default=False, metadata={"help": "Rerun stages that already have results."})


def data_description(budget: Budget, dataset_name: str | None) -> str:
    data = pathlib.Path(dataset_name).name if dataset_name else "the embedded Fashion-MNIST sample"
    train = f"the first {budget.train_images:,}" if budget.train_images else "all"
    test = f"the first {budget.test_images:,}" if budget.test_images else "all"
    return (f"{data}, {train} training images, {test} test images; pretraining "
            f"{counted(budget.pretrain_epochs, 'epoch')}, fine-tuning {counted(budget.epochs('mae'), 'epoch')} (MAE) "
            f"and {counted(budget.epochs('scratch'), 'epoch')} (scratch), batch "
            f"{budget.batch_size}; learning rates chosen on {budget.holdout_fraction:.0%} of the train split held out "
            f"per class")


class Study:
    """One budget's run: its stages, and the record rewritten after each of them."""

    def __init__(self, args: StudyArguments, budget: Budget) -> None:
        self.args, self.budget = args, budget
        self.output_dir = pathlib.Path(args.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.runner = StageRunner(SCRIPTS, self.output_dir, force=args.force, num_threads=args.num_threads)
        self.plan = StudyPlan(budget, recipe_flags(REPOSITORY), args.dataset_name, self.output_dir)
        self.finished: list[Stage] = []
        self.selection: dict[str, dict[float, Stage]] = self.plan.selection()
        self.chosen: dict[str, float] = {}
        self.runs: dict[str, dict[int, dict[str, Stage]]] = {rung.name: {} for rung in budget.rungs()}
        self.start = time.time()

    def run(self, stage: Stage) -> dict[str, Any]:
        """Run or reuse the stage; a stage run here also records the CPU time it took (wall time depends on what else
        the machine runs, CPU time does not: the budget's rule is in CPU time)."""
        ran_before = (self.runner.folder(stage.name) / STAGE_RECORD_FILE).is_file()
        cpu_start = time.process_time()
        results = self.runner.run(stage)
        if self.args.force or not ran_before:
            write_cpu_seconds(self.runner.folder(stage.name), time.process_time() - cpu_start)
        self.finished.append(stage)
        self.write()
        return results

    def choose_learning_rates(self) -> None:
        rung, seed = self.budget.selection_rung(), self.budget.seeds[0]
        self.run(self.plan.pretrain(rung, seed))
        for arm, stages in self.selection.items():
            accuracies = {lr: self.run(stage)["eval_accuracy"] for lr, stage in stages.items()}
            self.chosen[arm] = chosen_learning_rate(accuracies)

    def run_seed(self, seed: int) -> None:
        for rung in self.budget.rungs():
            self.run(self.plan.pretrain(rung, seed))
            stages = self.plan.size_stages(rung, seed, self.chosen)
            self.runs[rung.name][seed] = stages
            for stage in stages.values():
                self.run(stage)

    def record(self) -> dict[str, Any]:
        rungs = self.budget.rungs()
        return {
            "study": "scaling", "version": 2, "protocol": PROTOCOL,
            "budget": self.args.budget, "budget_settings": asdict(self.budget),
            "data_description": data_description(self.budget, self.args.dataset_name), "recipe": list(self.plan.recipe),
            "environment": environment(REPOSITORY), "elapsed_seconds": time.time() - self.start,
            "wall_seconds": self.runner.total_wall_seconds,
            "sizes": [{"name": rung.name, "width": rung.width,
                       "parameters": encoder_parameters(rung.encoder_overrides())} for rung in rungs],
            "selection": {arm: {f"{lr:g}": stage.name for lr, stage in stages.items()}
                          for arm, stages in self.selection.items()},
            "chosen_learning_rates": self.chosen,
            "runs": {name: {str(seed): {key: stage.name for key, stage in stages.items()}
                            for seed, stages in seeds.items()} for name, seeds in self.runs.items()},
            "stages": stage_entries(self.runner, self.finished),
        }

    def write(self) -> None:
        record = self.record()
        copy = self.args.record_dir and pathlib.Path(self.args.record_dir) / f"scaling_study_{self.args.budget}.json"
        for path in filter(None, (self.output_dir / RECORD_FILE, copy)):
            write_record(path, record)
            write_report(record, path.with_suffix(".md"))


def write_readme_section(record: dict[str, Any], record_path: pathlib.Path, readme: pathlib.Path) -> None:
    figure = record_path.with_name(f"{record_path.stem}_gain.png").resolve().relative_to(readme.resolve().parent)
    readme.write_text(replace_readme_section(readme.read_text(), readme_section(record, figure.as_posix())))


def from_record(args: StudyArguments) -> dict[str, Any]:
    """Table and figures of a record, or one of its stages run again."""
    path = pathlib.Path(args.from_record)
    record = load_record(path)
    if args.rerun is None:
        print(write_report(record, path.with_suffix(".md")))
        if args.readme:
            write_readme_section(record, path, pathlib.Path(args.readme))
        return record
    runner = StageRunner(SCRIPTS, pathlib.Path(args.output_dir), force=args.force, num_threads=args.num_threads)
    results = rerun_stage(record, args.rerun, runner)
    recorded = record["stages"][args.rerun]["results"]
    print(json.dumps({"stage": args.rerun, "recorded_eval_accuracy": recorded.get("eval_accuracy"),
                      "rerun_eval_accuracy": results.get("eval_accuracy")}))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Choose the learning rates, then run every seed and size; returns the record."""
    (args,) = parse_arguments((StudyArguments,), argv, __doc__)
    if args.from_record:
        return from_record(args)
    if args.budget is None:
        raise UsageError("pass --budget (smoke, cpu or gpu), or --from_record RECORD")
    budget = BUDGETS[args.budget]
    study = Study(args, budget)
    study.choose_learning_rates()
    for seed in args.seeds or budget.seeds:
        study.run_seed(seed)
    print((study.output_dir / RECORD_FILE).with_suffix(".md").read_text())
    return study.record()


if __name__ == "__main__":
    exit_process(run_main(main))
