"""Choose the small-image fine-tuning recipe on a held-out part of the train split (studies/recipe_sweep.py).

    python run_scripts/make_sample_data.py --full       # all of Fashion-MNIST, to outputs/fashion_mnist_full
    python run_scripts/recipe_sweep.py --record docs/records/recipe_sweep.json       # ~20 CPU minutes
    python run_scripts/recipe_sweep.py --from_record docs/records/recipe_sweep.json  # its table again, from the record

The inits can run in two processes on one `--output_dir` (`--inits mae` and `--inits scratch`); a last run with both
reuses every stage and writes the record (every stage's arguments, results and curves, the git SHA, library versions,
machine) and, beside it, its table (`.md`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from modeling_mae.arguments import AT_LEAST_ONE, Range, parse_arguments
from modeling_mae.errors import exit_process, run_main
from modeling_mae.studies.recipe_sweep import SWEEP, render_sweep, sweep_stages
from modeling_mae.studies.records import (
    environment,
    load_record,
    stage_entries,
    write_record,
)
from modeling_mae.studies.scaling import ARMS, StudyPlan
from modeling_mae.studies.stages import StageRunner

SCRIPTS = pathlib.Path(__file__).resolve().parent


@dataclass
class SweepArguments:
    FLAG_RANGES: ClassVar[dict[str, Range]] = {"num_threads": AT_LEAST_ONE}

    dataset_name: str = field(default="outputs/fashion_mnist_full",
                              metadata={"help": "Data (make_sample_data.py --full)."})
    output_dir: str = field(default="outputs/recipe-sweep", metadata={"help": "Stages."})
    inits: list[str] = field(default_factory=lambda: list(ARMS), metadata={"help": "Which inits to run (mae, scratch).",
                                                                             "choices": list(ARMS)})
    record: str | None = field(default=None, metadata={"help": "Where the record goes (default: in output_dir); its "
                                                               "table is written beside it."})
    from_record: str | None = field(default=None, metadata={"help": "Only write the table of this record again."})
    num_threads: int | None = field(default=None, metadata={"help": "torch threads of every stage."})


def write_table(record_path: pathlib.Path, record: dict[str, Any]) -> str:
    table = render_sweep(record)
    record_path.with_suffix(".md").write_text(table)
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run (or reuse) the sweep's stages; with both inits, write the record and its table and return the record."""
    (args,) = parse_arguments((SweepArguments,), argv, __doc__)
    if args.from_record:
        print(write_table(pathlib.Path(args.from_record), load_record(pathlib.Path(args.from_record))))
        return None
    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(SCRIPTS, output_dir, num_threads=args.num_threads)
    plan = StudyPlan(SWEEP, (), args.dataset_name, output_dir)
    stages = sweep_stages(plan, tuple(args.inits))
    for stage in stages.values():
        runner.run(stage)
    if set(args.inits) != set(ARMS):
        return None
    record = {"study": "recipe_sweep", "environment": environment(SCRIPTS.parent),
              "wall_seconds": runner.total_wall_seconds, "stages": stage_entries(runner, stages.values())}
    record_path = pathlib.Path(args.record) if args.record else output_dir / "recipe_sweep.json"
    write_record(record_path, record)
    print(write_table(record_path, record))
    return record


if __name__ == "__main__":
    exit_process(run_main(main))
