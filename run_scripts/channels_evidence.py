"""Images of any channel count, end to end: measured evidence (issue 22, item 6).

    python run_scripts/channels_evidence.py --output_dir outputs/channels-evidence --record_dir docs/records

1. the embedded Fashion-MNIST sample (grayscale) pretrained with `num_channels=1` and RGB-expanded (3 channels), at
   the same budget: step time, images/s and k-NN top-1;
2. a synthetic 4-band data set whose fourth band alone carries the label (`modeling_mae/studies/channels.py`):
   pretrained with 4 channels and, on its R, G, B bands alone, with 3; each scored by the same linear probe.

Every stage is a run script's `main(argv)` (`studies.stages`, its log in `output_dir/STAGE.log`; finished stages are
reused). The record (`channels_evidence.json`: every stage's arguments and results, git SHA, versions, machine) and
its table (`channels_evidence.md`) go to `--record_dir`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from modeling_mae.arguments import AT_LEAST_ONE, POSITIVE, SEED, Range, parse_arguments
from modeling_mae.errors import exit_process, run_main

SCRIPTS = pathlib.Path(__file__).resolve().parent


@dataclass
class ChannelsEvidenceArguments:
    FLAG_RANGES: ClassVar[dict[str, Range]] = {
        "seed": SEED, "gray_epochs": POSITIVE, "band_epochs": POSITIVE, "band_train_images": AT_LEAST_ONE,
        "band_test_images": AT_LEAST_ONE, "num_threads": AT_LEAST_ONE,
    }

    output_dir: str = field(default="outputs/channels-evidence", metadata={"help": "Every stage's folder."})
    record_dir: str | None = field(default=None, metadata={"help": "Where the record and its table go."})
    seed: int = 0
    gray_epochs: float = field(default=2, metadata={"help": "Pretraining epochs on the Fashion-MNIST sample."})
    band_epochs: float = field(default=10, metadata={"help": "Pretraining epochs on the 4-band data set."})
    band_train_images: int = 2000
    band_test_images: int = 500
    num_threads: int | None = field(default=None, metadata={"help": "torch threads of every stage."})
    force: bool = field(default=False, metadata={"help": "Rerun stages that already have results."})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    (args,) = parse_arguments((ChannelsEvidenceArguments,), argv, __doc__)
    # Imported after parsing: --help answers without loading torch.
    from modeling_mae.studies.channels import run_evidence

    return run_evidence(args, SCRIPTS)


if __name__ == "__main__":
    exit_process(run_main(main))
