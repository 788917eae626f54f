"""The scaling study's report: each cell's mean and sample std over seeds, the markdown table, and the two figures
(top-1 against encoder parameters, the paper's Figure 8; against pretraining epochs, its Figure 7).
"""

from __future__ import annotations

import pathlib
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ..errors import UsageError
from .scaling import PROTOCOLS, RECIPE_RULES, Results, Rung, encoder_parameters

MAE_LABEL, SCRATCH_LABEL = "MAE pretraining, then fine-tuning", "supervised from scratch (same recipe)"


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
