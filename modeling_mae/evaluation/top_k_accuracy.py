"""Top-k accuracy as an `evaluate` module: load it by path, offline, with `evaluate.load(path_of_this_file)`.

The Hub's `accuracy` scores one predicted class per sample; ImageNet results also quote top-5. This module takes the
classes ranked by score, best first (only the first `max(top_k)` are needed, so 1000-class logits need not be
stored), and returns `accuracy` (top-1) and `top{k}_accuracy` for the other k.

This file travels alone: `evaluate` copies it into its modules cache and imports the copy, so it imports nothing from
this package.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the fraction of samples whose reference class is among the k best-scored classes. Top-1 is the plain
accuracy; top-k for a k at least the number of classes is always 1 and is left out when `num_classes` is given.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): for each sample, class ids ranked by score, best first: at least
        max(top_k) of them, or all the classes when there are fewer.
    references (`list` of `int`): the true class ids.
    top_k (`tuple` of `int`, defaults to (1, 5)): the k to report.
    num_classes (`int`, optional): the number of classes; a k > 1 that is not below it is left out.
Returns:
    accuracy (`float`): top-1 accuracy, in [0, 1].
    top{k}_accuracy (`float`): top-k accuracy for every other k.
Examples:
    >>> metric = evaluate.load("modeling_mae/top_k_accuracy.py")
    >>> metric.compute(predictions=[[2, 0, 1], [0, 1, 2]], references=[2, 1], top_k=(1, 2))
    {'accuracy': 0.5, 'top2_accuracy': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(
        self,
        predictions: Sequence[Sequence[int]],
        references: Sequence[int],
        top_k: Sequence[int] = (1, 5),
        num_classes: int | None = None,
    ) -> dict[str, float]:
        labels = np.asarray(references, dtype=np.int64)
        if labels.size == 0:
            raise ValueError("top-k accuracy of no sample")
        ranked = np.stack([np.asarray(row, dtype=np.int64) for row in predictions])  # (N, ranked classes)
        hits = ranked == labels[:, None]  # (N, ranked classes): at most one True per row
        results = {}
        for k in top_k:
            if k > 1 and num_classes is not None and k >= num_classes:
                continue  # always right: top-5 of 3 classes says nothing
            if k > ranked.shape[1]:
                raise ValueError(f"top-{k} accuracy needs the {k} best classes of each sample, got {ranked.shape[1]}")
            results["accuracy" if k == 1 else f"top{k}_accuracy"] = float(hits[:, :k].any(axis=1).mean())
        return results
