"""Per-channel mean and std of a data set's images, on their own scale, from a bounded sample of a split.

    python run_scripts/image_stats.py --dataset_name data/sentinel --num_channels 4 --output outputs/stats.json
    python run_scripts/image_stats.py --dataset_name data/xray --num_channels 1 --max_images 2000

Reads the first --max_images images of the split as the training pipeline decodes them (8-bit values / 255, 16-bit
/ 65535, float arrays as they are; no augmentation), counting images of another channel count as skipped. Prints the
statistics and the flags that use them (--image_mean ... --image_std ...); with --output, writes them as JSON
({"image_mean", "image_std", "rescale_factor", "images"}) for `run_mae.py --image_stats FILE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modeling_mae.arguments import parse_arguments
from modeling_mae.data.sources import DataArguments, ImageStatsArguments
from modeling_mae.errors import exit_process, run_main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Compute, print (and with --output, write) the statistics; returns them as the JSON file holds them."""
    data_args, stats_args = parse_arguments((DataArguments, ImageStatsArguments), argv, __doc__)
    from modeling_mae.data.statistics import (
        report_image_statistics,  # torch only now: --help answers at once
    )

    return report_image_statistics(data_args, stats_args)


if __name__ == "__main__":
    exit_process(run_main(main))
