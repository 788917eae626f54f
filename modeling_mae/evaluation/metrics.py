"""Classification metrics: `ClassificationMetric` feeds an `evaluate` module (by default our `top_k_accuracy.py`,
loaded by path so it works offline; `--metric accuracy` is the Hub's) with the predictions of every process, gathered
with `accelerator.gather_for_metrics`. The loaders give each process a disjoint share of the split without padding, so
every sample is added exactly once. `evaluate` is imported when a metric is loaded: the scripts import
`MetricArguments` before they parse their command line, and `--help` needs none of it.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    import evaluate
    import torch
    from accelerate import Accelerator

TOP_KS = (1, 5)


TOP_K_ACCURACY = "top_k_accuracy"  # our `evaluate` module, shipped next to this file


TOP_K_ACCURACY_SCRIPT = pathlib.Path(__file__).with_name(f"{TOP_K_ACCURACY}.py")


@dataclass
class MetricArguments:
    """Which `evaluate` module scores the validation split."""

    metric: str = field(
        default=TOP_K_ACCURACY,
        metadata={"help": f"'{TOP_K_ACCURACY}' (top-1 and top-5, shipped with the package, works offline), or an "
                          "`evaluate` module that takes one predicted class id per sample, by Hub name or path "
                          "(e.g. 'accuracy', which needs the Hub)."},
    )


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Our top-k accuracy (loaded by path: no network), or any other `evaluate` module by Hub name or path."""
    import evaluate

    source = str(TOP_K_ACCURACY_SCRIPT) if name == TOP_K_ACCURACY else name
    try:
        return evaluate.load(source, keep_in_memory=True)  # in memory: every process holds every prediction
    except (OSError, ImportError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"--metric {name}: `evaluate` cannot load it ({reason}). Hub metrics need a connection to the Hub; "
            f"offline, use --metric {TOP_K_ACCURACY}"
        ) from error


class ClassificationMetric:
    """An `evaluate` module fed with the predictions of every process, as transformers' no_trainer examples do.

    Each process scores its own share of the split. `add_batch` gathers the shares with
    `accelerator.gather_for_metrics` as Python lists, since shares differ in size at the end of a split (the loaders
    are not prepared by Accelerate: they shard without padding, so there is no duplicated tail sample to drop), and
    every process adds every sample once. A batch that a finished process re-runs only to keep the others company
    (`training.iterate_in_lockstep`, `is_real=False`) adds nothing.
    """

    def __init__(self, accelerator: Accelerator, name: str = TOP_K_ACCURACY) -> None:
        self.accelerator = accelerator
        self.module = load_metric(name)
        self.ranks_classes = name == TOP_K_ACCURACY  # ours takes the best classes; the others, the best class
        self.samples = 0
        self.num_classes = 0

    def add_batch(self, scores: torch.Tensor, labels: torch.Tensor, is_real: bool = True) -> None:
        """Add `(B, C)` class scores and `(B,)` labels of every process; a collective: call it on every process."""
        self.num_classes = scores.shape[-1]
        if self.ranks_classes:
            predictions = scores.topk(min(max(TOP_KS), self.num_classes), dim=-1).indices  # (B, k), best first
        else:
            predictions = scores.argmax(dim=-1)  # (B,)
        rows = list(zip(predictions.tolist(), labels.tolist(), strict=True)) if is_real else []
        gathered = self.accelerator.gather_for_metrics(rows, use_gather_object=True)
        if gathered:
            predicted, references = zip(*gathered, strict=True)
            self.module.add_batch(predictions=list(predicted), references=list(references))
        self.samples += len(gathered)

    def compute(self, prefix: str = "eval_") -> dict[str, float | int]:
        """`{prefix}accuracy`, `{prefix}top5_accuracy` (ours, when there are more than 5 classes) or the module's
        results, and `{prefix}samples`; then starts over."""
        if self.samples == 0:
            raise UsageError("no validation image was scored: the validation split is empty")
        options = {"top_k": TOP_KS, "num_classes": self.num_classes} if self.ranks_classes else {}
        results = {f"{prefix}{name}": value for name, value in self.module.compute(**options).items()}
        results[f"{prefix}samples"] = self.samples
        self.samples = 0
        return results
