"""The scaling study's report, made from its record only (`records`): the summary (cells, paired gains, the
pre-registered criterion, plateau checks), the markdown table and the figures (the gain against encoder parameters,
for the README; the fine-tuning curves of the largest size).
"""

from __future__ import annotations

import math
import pathlib
import statistics
from typing import Any

from ..errors import UsageError
from ..text import counted
from .scaling import ARMS, PROTOCOLS
from .scaling_statistics import (
    PLATEAU_POINTS,
    cell,
    last_quarter_change,
    mean_interval,
    slope_interval,
)


def stage_results(record: dict[str, Any], name: str) -> dict[str, Any] | None:
    entry = record["stages"].get(name)
    return entry["results"] if entry else None


def percent(results: dict[str, Any]) -> float:
    return 100 * results["eval_accuracy"]


def curve(results: dict[str, Any]) -> list[float]:
    """Top-1 (%) after each fine-tuning epoch."""
    return [100 * epoch["eval_accuracy"] for epoch in results.get("history", [])]


def size_summary(record: dict[str, Any], size: dict[str, Any]) -> dict[str, Any]:
    """One size's cells over the seeds that finished it, its paired gains and the plateau of each arm's curves."""
    runs = {seed: {key: stage_results(record, name) for key, name in stages.items()}
            for seed, stages in record["runs"][size["name"]].items()}
    cells = {key: cell([percent(results[key]) for results in runs.values() if results[key]])
             for key in PROTOCOLS if any(results[key] for results in runs.values())}
    paired = [results for results in runs.values() if all(results[arm] for arm in ARMS)]
    gains = [percent(results["mae"]) - percent(results["scratch"]) for results in paired]
    plateau = {arm: max(last_quarter_change(curve(results[arm])) for results in paired) for arm in ARMS} if paired \
        else {}
    return {**size, "cells": cells, "gain": mean_interval(gains) if gains else None, "plateau": plateau}


def summarise(record: dict[str, Any]) -> dict[str, Any]:
    """Everything the table and figures show, computed from the record alone."""
    sizes = [size_summary(record, size) for size in record["sizes"]]
    points = [(math.log2(size["parameters"]), gain) for size in sizes if size["gain"]
              for gain in size["gain"]["values"]]
    slope = slope_interval([x for x, _ in points], [y for _, y in points])
    largest = sizes[-1]["cells"]
    return {
        "sizes": sizes, "slope": slope,
        "criterion_met": None if slope is None else slope["low"] > 0,
        "mae_above_linprobe_at_largest": (largest["mae"]["mean"] > largest["linprobe"]["mean"]
                                          if {"mae", "linprobe"} <= set(largest) else None),
    }


def format_parameters(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.0f}k"


def format_cell(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "-"
    spread = "n/a" if summary["std"] is None else f"{summary['std']:.1f}"
    return f"{summary['mean']:.1f} ± {spread}"


def format_interval(summary: dict[str, Any] | None, unit: str = "") -> str:
    if summary is None:
        return "-"
    value = summary.get("mean", summary.get("slope"))
    if summary["low"] is None:
        return f"{value:+.2f}{unit} (one seed)"
    return f"{value:+.2f}{unit} [{summary['low']:+.2f}, {summary['high']:+.2f}]"


def cpu_hours(record: dict[str, Any]) -> float:
    """The CPU time of the stages that measured it (threads summed), in hours."""
    return sum(stage.get("cpu_seconds") or 0.0 for stage in record["stages"].values()) / 3600


def format_change(change: float) -> str:
    return "n/a (one epoch)" if math.isnan(change) else f"{change:.2f}"


def selection_lines(record: dict[str, Any]) -> list[str]:
    """The learning rates tried per arm on the held-out split, and the one chosen."""
    lines = []
    for arm, stages in record["selection"].items():
        tried = ", ".join(f"{float(lr):g}: " + (f"{percent(results):.1f}" if (results := stage_results(record, name))
                                                 else "not run") for lr, name in stages.items())
        chosen = record["chosen_learning_rates"].get(arm)
        lines.append(f"- {arm}: held-out top-1 by base lr {tried}; chosen: {'-' if chosen is None else f'{chosen:g}'}")
    return lines


def verdict(summary: dict[str, Any]) -> str:
    """The pre-registered criterion, stated."""
    slope = summary["slope"]
    if slope is None:
        return "Criterion: not evaluable yet (fewer than 3 paired gains over 2 sizes)."
    outcome = "met" if summary["criterion_met"] else "not met (a null result)"
    return (f"Criterion (slope of the paired gain against log2(encoder parameters), 95% interval above 0): "
            f"{outcome}; slope {format_interval(slope, ' points per doubling')} from {slope['n']} paired gains.")


def render_table(record: dict[str, Any]) -> str:
    """Markdown: the budget line, the size table with gains, the criterion, the lr choice and the plateau checks."""
    summary = summarise(record)
    budget = record["budget_settings"]
    git = record["environment"]["git"]
    rows = [(f"Budget `{record['budget']}`: {record['data_description']}; git {git['sha'][:12]}"
             f"{' (with local changes)' if git['dirty'] else ''}; stages' wall time "
             f"{record['wall_seconds'] / 3600:.2f} h, CPU time {cpu_hours(record):.2f} h."),
            "",
            "| model | encoder parameters | " + " | ".join(PROTOCOLS.values())
            + " | paired gain, MAE - scratch [95% CI] |",
            "|---|---:|" + "---:|" * (len(PROTOCOLS) + 1)]
    for size in summary["sizes"]:
        cells = [format_cell(size["cells"].get(key)) for key in PROTOCOLS]
        rows.append(f"| {size['name']} ({size['width']} wide, {counted(budget['depth'], 'block')}) | "
                    f"{format_parameters(size['parameters'])} | " + " | ".join(cells)
                    + f" | {format_interval(size['gain'])} |")
    above = summary["mae_above_linprobe_at_largest"]
    rows += ["", verdict(summary),
             "" if above is None else f"MAE fine-tuning above the MAE linear probe at the largest size: "
                                      f"{'yes' if above else 'no'}.", "",
             "Learning rates (chosen on the held-out split, then used at every size):", *selection_lines(record), "",
             (f"Plateau (largest |change| of top-1 over the last quarter of the epochs, over seeds; the protocol asks "
              f"< {PLATEAU_POINTS}):")]
    rows += [f"- {size['name']}: " + ", ".join(f"{arm} {format_change(change)}"
                                              for arm, change in size["plateau"].items())
             for size in summary["sizes"] if size["plateau"]]
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


def plot_gain(summary: dict[str, Any], path: pathlib.Path, title: str) -> Any:
    """The paired gain (MAE - scratch) against encoder parameters, 95% t-interval error bars; returns the figure."""
    sizes = [size for size in summary["sizes"] if size["gain"]]
    figure, axes = pyplot().subplots(figsize=(5, 4), dpi=150)
    parameters = [size["parameters"] for size in sizes]
    means = [size["gain"]["mean"] for size in sizes]
    spans = [0.0 if size["gain"]["low"] is None else size["gain"]["mean"] - size["gain"]["low"] for size in sizes]
    axes.errorbar(parameters, means, yerr=spans, fmt="o-", capsize=4, label="MAE - scratch, mean [95% CI]")
    for size in sizes:
        axes.plot([size["parameters"]] * len(size["gain"]["values"]), size["gain"]["values"], "k.", alpha=0.4)
    axes.axhline(0, color="gray", linewidth=1)
    axes.set_xscale("log")
    axes.set_xticks(parameters, [f"{size['name']}\n{format_parameters(size['parameters'])}" for size in sizes])
    axes.minorticks_off()
    axes.set(xlabel="encoder parameters", ylabel="fine-tuned top-1 gain (points)")
    return save(figure, axes, path, title)


def plot_curves(record: dict[str, Any], path: pathlib.Path, title: str) -> Any:
    """Top-1 after each fine-tuning epoch at the largest size, per arm and seed, with the MAE linear probe's level."""
    size = record["sizes"][-1]["name"]
    figure, axes = pyplot().subplots(figsize=(5, 4), dpi=150)
    for arm, style in zip(ARMS, ("C0", "C1"), strict=True):
        for seed, stages in record["runs"][size].items():
            results = stage_results(record, stages[arm])
            if results:
                values = curve(results)
                axes.plot(range(1, len(values) + 1), values, color=style, alpha=0.8,
                          label=f"{arm}, fine-tuned" if seed == next(iter(record["runs"][size])) else None)
    probes = [percent(results) for stages in record["runs"][size].values()
              if (results := stage_results(record, stages["linprobe"]))]
    if probes:
        axes.axhline(statistics.fmean(probes), color="gray", linestyle="--", label="MAE linear probe (mean)")
    axes.set(xlabel="fine-tuning epoch", ylabel="top-1 on the test split (%)")
    return save(figure, axes, path, title)


def save(figure: Any, axes: Any, path: pathlib.Path, title: str) -> Any:
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # a record without finished runs yet draws an empty figure
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    pyplot().close(figure)
    return figure


def write_report(record: dict[str, Any], table_path: pathlib.Path) -> str:
    """The table at `table_path` and the figures beside it (`_gain.png`, `_curves.png`); returns the table."""
    table = render_table(record)
    table_path.write_text(table)
    seeds = f"{len(record['budget_settings']['seeds'])} paired seeds"
    plot_gain(summarise(record), table_path.with_name(f"{table_path.stem}_gain.png"),
              f"MAE gain over scratch vs encoder size\n{record['data_description'].split(';')[0]}, {seeds}")
    plot_curves(record, table_path.with_name(f"{table_path.stem}_curves.png"),
                f"{record['sizes'][-1]['name']}: fine-tuning curves")
    return table



README_START = "<!-- scaling study: written by run_scripts/scaling_study.py --from_record RECORD --readme README.md -->"
README_END = "<!-- end of the scaling study -->"


def readme_section(record: dict[str, Any], figure: str) -> str:
    """The README's plot of the gain against size (`figure`: its path from the README) and a plain sentence of what
    it shows and what it cannot."""
    summary = summarise(record)
    sizes = [size for size in summary["sizes"] if size["gain"]]
    gains = ", ".join(f"{size['gain']['mean']:+.1f} points at {format_parameters(size['parameters'])}"
                      for size in sizes)
    slope = summary["slope"]
    criterion = ("not evaluable yet" if slope is None else
                 f"{'met' if summary['criterion_met'] else 'not met'} (slope "
                 f"{format_interval(slope, ' points per doubling of parameters')})")
    seeds = max(size["gain"]["n"] for size in sizes) if sizes else 0
    return (f"![Fine-tuned top-1 gain of MAE over scratch against encoder parameters, 95% intervals]({figure})\n\n"
            f"*The pre-registered scaling study (`{record['budget']}` budget, {counted(seeds, 'paired seed')}; "
            f"[protocol](docs/evaluation.md#the-scaling-study-version-2-pre-registered)): MAE pretraining changes "
            f"fine-tuned top-1 over training from scratch by {gains or 'nothing yet'}; its criterion, a gain that "
            f"grows with log2(parameters), is {criterion}. It shows the trend over small encoders on 32 px "
            f"Fashion-MNIST with one fixed recipe; it cannot show that the trend holds at ViT-B/L/H scale, on "
            f"ImageNet, or with another recipe.*")


def replace_readme_section(readme: str, section: str) -> str:
    """`readme` with the text between its scaling-study markers replaced by `section`."""
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    return f"{readme[:start]}\n{section}\n{readme[end:]}"
