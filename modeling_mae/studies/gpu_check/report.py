"""The GPU check's report: `gpu_check.md`, the tables of docs/benchmarks.md (engines, script options, throughput,
decode, MFU, what failed or was skipped), from the results and their summary."""

from __future__ import annotations

from .config import Results
from .summary import AGREEMENT_FACTOR, FP32_TOLERANCE, section_result, section_run


def percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def engine_rows(results: Results) -> list[str]:
    summary = results["summary"]
    rows = []
    for name in results["meta"]["engines"]:
        section = results["sections"].get(f"engine {name}")
        if section is None:
            continue
        runs, checks = section["result"].get("runs", {}), summary.get("engines", {}).get(name, {})
        if "full" in runs:
            rows.append(engine_row(name, runs, checks))
        else:
            rows.append(f"| {name} | {section['status']}: {section.get('reason') or section.get('error', '')} "
                        "| | | | | | |")
    return rows


def verdict(ok: bool | None, good: str = "ok", bad: str = "**differs**") -> str:
    return "-" if ok is None else good if ok else bad


def loss_cell(run: Results | None, checks: Results, key: str = "probe_end", rel: str = "vs_reference_rel",
              ok: str = "agrees") -> str:
    """A probe loss with its relative difference to the reference and the verdict, e.g. `1.18388 (0.035%, ok)`."""
    if run is None:
        return "-"
    return f"{run[key]:.5f} ({percent(checks.get(rel), 3)}, {verdict(checks.get(ok))})"


def engine_row(name: str, runs: Results, checks: Results) -> str:
    """One engine: precision, checkpoint + resume, export reload, the loss before and after training in bf16 and in
    fp32 against the reference engine's, and the verdict."""
    full, own, resumed = runs["full"], checks["full"], checks.get("resumed")
    state = verdict(checks.get("checkpoints_ok") and checks.get("resume_ok"), "yes", "**no**") + (
        f" (resumed {percent(resumed.get('vs_reference_rel'), 3)} from uninterrupted)" if resumed else " (no resume)")
    weights = full["compute_dtype"].replace("torch.", "") + (" + autocast" if full["autocast"] else "")
    return (f"| {name} | {weights} | {state} | {full['probe_end']:.5f} / {full['probe_export']:.5f} "
            f"({verdict(own['export_reload_ok'])}) | {loss_cell(full, own, 'probe_start', 'initial_rel', 'same_start')}"
            f" | {loss_cell(full, own)} | {loss_cell(runs.get('fp32'), checks.get('fp32', {}))} | "
            f"{checks.get('verdict') or '-'} |")


def engines_markdown(results: Results) -> list[str]:
    summary, sizes = results["summary"], results["meta"]["sizes"]
    reference, steps = summary["reference_engine"], sizes["engine_steps"]
    lines = [(f"### Engines: {sizes['engine_model']} MAE, {steps} steps of {sizes['engine_batch']} from the shards, "
              "one process each"), "",
             (f"| engine | weights | checkpoint, resume, export | export reloaded: loss engine / export | loss at step"
              f" 0 (vs {reference}) | loss after {steps} steps, bf16 (vs {reference}) | the same in fp32 (vs "
              f"{reference}) | verdict |"),
             "|---|---|---|---|---|---|---|---|", *engine_rows(results), ""]
    agreement = summary.get("agreement")
    if agreement:
        lines += [f"bf16 tolerance {percent(agreement['tolerance'], 2)}: max({AGREEMENT_FACTOR:g} x "
                  f"{percent(agreement['rounding_effect'], 3)}, how far bf16-sized errors in every gradient and "
                  "weight at every step move the reference engine's loss; 2^-8 = 0.39%)"
                  + (" (no control run: the floor only)" if agreement["provisional"] else "")
                  + f"; fp32 tolerance 2^-16 = {percent(FP32_TOLERANCE, 4)}. Training moved the loss by "
                  f"{percent(agreement['signal'], 2)}: "
                  + ("conclusive." if agreement["conclusive"] else "**inconclusive** (tolerance too close)."), ""]
    return lines


def options_markdown(results: Results) -> list[str]:
    checks = results["summary"].get("options", {})
    if not checks:
        return []
    lines = ["### Script options against the eager run", "", "| run | loss after the steps | vs eager | check |",
             "|---|---|---|---|"]
    for name, check in checks.items():
        run = section_run(results, f"option {name}")
        if name == "decode_on":
            outcome = (f"loss drop {check['loss_drop']:.4f} vs {check['eager_loss_drop']:.4f}, "
                       f"{check['skipped_images']} skipped: {verdict(check['trains_alike'])}")
        else:
            outcome = verdict(check["agrees"], "agrees", "**disagrees**")
        lines.append(f"| {' '.join(run['flags'])} | {run['probe_end']:.5f} | "
                     f"{percent(check.get('vs_reference_rel'), 3)} | {outcome}; export "
                     f"{verdict(check['export_reload_ok'])} |")
    return lines + [""]


def throughput_markdown(results: Results) -> list[str]:
    record, summary = section_result(results, "throughput"), results["summary"].get("throughput", {})
    if not summary:
        return []
    model_rate = summary["model_images_per_s"]
    lines = [(f"### End-to-end training throughput: {record['model']} MAE, batch {record['batch_size']}, "
              f"{record['dtype']}, {'compiled' if record['compiled'] else 'eager'}"), "",
             "| input | training img/s | of (a) | loader alone img/s | first batch s |", "|---|---|---|---|---|",
             f"| (a) synthetic tensors on the device | {model_rate:.0f} | 100% | - | - |"]
    for name, share in summary["of_model"].items():
        value = record[name]
        label = (f"(c) decode_on {value['decode_on']}, reader workers: {value['workers']}" if name.startswith("decode")
                 else f"(b) {value['workers']} decoding workers")
        lines.append(f"| {label} | {value['training']['images_per_s']:.0f} | {share:.0%} | "
                     f"{value['loader_alone']['images_per_s']:.0f} | {value['first_batch_s']:.1f} |")
    if "cores_for_90_percent" in summary:
        lines += ["", (f"Decoding workers: {summary['worker_images_per_s_per_core']:.0f} img/s per core; 90% of (a) "
                      f"needs {summary['cores_for_90_percent']} cores per GPU (workers + the training process); "
                      "fewest measured workers reaching it: "
                      f"{summary['fewest_workers_reaching_90_percent'] or 'none of those measured'}.")]
    return lines + [""] + decode_markdown(record) + mfu_markdown(results)


def decode_markdown(record: Results) -> list[str]:
    decode = record.get("decode")
    if not decode:
        return []
    return ["| decode + augment alone, batch of the shards' JPEGs | img/s |", "|---|---|",
            f"| nvjpeg decode (`decode_images_on_device`) | {decode['decode']['images_per_s']:.0f} |",
            f"| on-device augmentation (`augment_on_device`) | {decode['augment']['images_per_s']:.0f} |",
            f"| both | {decode['decode_and_augment']['images_per_s']:.0f} |",
            (f"| CPU fast path (`FastPretrainTransform`), one core | "
            f"{decode['cpu_fast_path_one_core']['images_per_s']:.0f} |"), "",
            (f"Device pixels against the CPU decoder: mean |difference| "
             f"{decode['pixels_vs_cpu_decoder']['mean_abs']:.2f}, max {decode['pixels_vs_cpu_decoder']['max_abs']:.0f}"
             " grey levels."), ""]


def mfu_markdown(results: Results) -> list[str]:
    rows = []
    throughput, modes = section_result(results, "throughput"), section_result(results, "compile modes")
    measured = [("default", throughput.get("synthetic"))] + [(mode, modes.get(mode)) for mode in
                                                            results["meta"]["compile_modes"]]
    for mode, value in measured:
        if value:
            method = value["benchmark_method"]
            rows.append(f"| {mode} | {method['images_per_s']:.0f} | {method['step_ms']:.1f} | "
                        f"{method['tflops_per_s']:.0f} | {percent(method['mfu'])} |")
    if not rows:
        return []
    return ["| torch.compile mode | img/s | step ms | TFLOP/s | MFU |", "|---|---|---|---|---|", *rows, ""]


def markdown(results: Results) -> str:
    meta, environment = results["meta"], section_result(results, "environment")
    device = section_result(results, "throughput").get("device", {}).get("name") or environment.get("gpu") or "-"
    packages = environment.get("packages", {})
    lines = [f"## GPU check: {device}, {meta['started']}", "",
             (f"`{meta['command']}`: {meta['seconds']:.0f} s. torch {packages.get('torch')}, transformers "
             f"{packages.get('transformers')}, accelerate {packages.get('accelerate')}, datasets "
             f"{packages.get('datasets')}, deepspeed {packages.get('deepspeed')}; {environment.get('usable_cores')} "
             f"cores."), ""]
    data = section_result(results, "data")
    if data:
        lines += [(f"Data: {data['train_images']} + {data['validation_images']} JPEGs of {data['width']}x"
                  f"{data['height']} at quality {data['quality']}, mean {data['mean_kb']:.0f} kB "
                  f"({data['min_kb']:.0f}-{data['max_kb']:.0f}), {data['train_shards']} parquet shards of "
                  f"{data['train_rows']} training rows (each image "
                  f"{data['train_rows'] // data['train_images']}x)."), ""]
    lines += engines_markdown(results) + options_markdown(results) + throughput_markdown(results)
    problems = [f"- {name}: {section['status']}: {section.get('reason') or section.get('error')}"
                for name, section in results["sections"].items() if section["status"] in ("failed", "skipped")]
    problems += [f"- {name}: {error['measurement']}: {error['error']}" for name in ("throughput", "compile modes")
                 for error in results["sections"].get(name, {}).get("result", {}).get("errors", [])]
    if problems:
        lines += ["### Failed or skipped", "", *problems, ""]
    return "\n".join(lines)
