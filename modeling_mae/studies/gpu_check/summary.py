"""The GPU check's comparisons, pure functions of its records: the bf16 tolerance the engines' losses must agree
within, each run's checks (export reload, same start, agreement), each engine's verdict, the script options against
the eager run, and the throughput summary (cores per GPU). `summarise` recomputes all of them whenever the results are
written."""

from __future__ import annotations

import math

from .config import Results, Sizes

# bf16 keeps 8 significant bits: a value rounds by at most 2^-8 of itself (the unit roundoff). Two losses closer than
# that are one number in bf16.
BF16_UNIT_ROUNDOFF = 2.0**-8
AGREEMENT_FACTOR = 3.0  # engines may differ from each other by up to 3x what bf16 does to the reference engine
# fp32 runs of two engines agree to fp32's rounding (2^-24) amplified by training: 2^-16 allows 256x, and is still
# two orders below the bf16 tolerance, where any difference in the algorithm (data, masks, schedule, update) shows.
FP32_TOLERANCE = 2.0**-16


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def agreement_tolerance(reference: Results, noisy: Results | None) -> Results:
    """The bf16 tolerance of the engines' losses after N steps.

    The engines run the same algorithm and differ only in where they round to bf16: bf16 copies of the weights and
    bf16 activations under DeepSpeed, fp32 weights cast inside autocast elsewhere, LayerNorm and reductions in one
    precision or the other. Rounding errors are at most 2^-8 of each value, but training amplifies them (Adam moves
    every weight by about the learning rate whatever the size of its gradient, so rounding can flip the direction of
    the smallest ones). How far this run's loss moves under such errors is measured, not guessed: the reference engine
    once more with bf16-sized errors in every gradient and weight at every step (`rounding_effect`, see
    add_rounding_noise_to_each_step). Two engines each within about that of the reference agree; AGREEMENT_FACTOR = 3
    leaves a margin for one random draw. The floor is one bf16 rounding of the loss itself (2^-8): closer than that,
    two losses are the same bf16 number. Random noise does not copy every systematic rounding of a run computed in
    bf16 throughout (DeepSpeed), so an engine outside the tolerance is judged by its fp32 run (`fp32_tolerance`). The
    comparison is conclusive only if the tolerance is well below how far training moved the loss (`signal`), else an
    engine that did not train at all would pass."""
    signal = relative_difference(reference["probe_end"], reference["probe_start"])
    effect = relative_difference(noisy["probe_end"], reference["probe_end"]) if noisy else None
    tolerance = max(AGREEMENT_FACTOR * (effect or 0.0), BF16_UNIT_ROUNDOFF)
    return {"rounding_effect": effect, "tolerance": tolerance, "fp32_tolerance": FP32_TOLERANCE, "signal": signal,
            "conclusive": 2 * tolerance < signal, "provisional": noisy is None}


def run_checks(run: Results, tolerance: float, reference: Results | None, same_start: bool = True) -> Results:
    """A run's own checks: the export reloads to the engine's loss (the same weights in the same precision: equal up
    to one bf16 rounding); it started from the reference's weights (the loss before training equal up to one bf16
    rounding, the only difference being the precision it is computed in); its loss after training agrees."""
    checks: Results = {"export_reload_rel": relative_difference(run["probe_export"], run["probe_end"])}
    checks["export_reload_ok"] = checks["export_reload_rel"] <= BF16_UNIT_ROUNDOFF
    if reference is not None and same_start:
        checks["initial_rel"] = relative_difference(run["probe_start"], reference["probe_start"])
        checks["same_start"] = checks["initial_rel"] <= BF16_UNIT_ROUNDOFF
    if reference is not None:
        checks["vs_reference_rel"] = relative_difference(run["probe_end"], reference["probe_end"])
        checks["agrees"] = checks["vs_reference_rel"] <= tolerance
    return checks


def engine_checks(runs: Results, half: int, steps: int, tolerance: float, reference: Results) -> Results:
    """Checkpoint, resume and export under one engine, and its agreement with the reference engine (`reference`:
    the reference engine's runs). `verdict`: "agrees" in bf16; "bf16 arithmetic" when only bf16 differs beyond the
    tolerance and the fp32 runs agree; "differs" when the fp32 runs differ too: a bug, ours or the engine's."""
    checks: Results = {}
    if "full" in runs:
        checks["full"] = run_checks(runs["full"], tolerance, reference.get("full"))
        checks["checkpoints_ok"] = runs["full"]["checkpoints"] == [f"step_{half}", f"step_{steps}"]
    if "fp32" in runs:
        checks["fp32"] = run_checks(runs["fp32"], FP32_TOLERANCE, reference.get("fp32"))
    if "resumed" in runs:
        resumed = runs["resumed"]
        checks["resumed"] = run_checks(resumed, tolerance, runs.get("full"), same_start=False)  # starts half way
        checks["resume_ok"] = (resumed["start_step"], resumed["end_step"]) == (half, steps) and checks["resumed"].get(
            "agrees", False)
    bf16, fp32 = checks.get("full", {}).get("agrees"), checks.get("fp32", {}).get("agrees")
    checks["verdict"] = ("agrees" if bf16 else "bf16 arithmetic" if bf16 is False and fp32 else
                         "differs" if bf16 is False and fp32 is False else None)
    return checks


def section_result(results: Results, name: str) -> Results:
    """What a section recorded, also when it failed part way (a failed resume leaves the run before it)."""
    return results["sections"].get(name, {}).get("result", {})


def section_run(results: Results, name: str, key: str = "run") -> Results | None:
    return section_result(results, name).get("runs", {}).get(key)


def summarise(results: Results, sizes: Sizes) -> Results:
    """Every check and derived number, recomputed from the raw records whenever the results are written. Without
    the reference engine's run, the engines are still checked on their own (export, resume) at the floor tolerance."""
    reference_name = results["meta"]["engines"][0]
    reference = section_result(results, f"engine {reference_name}").get("runs", {})
    agreement = (agreement_tolerance(reference["full"], section_run(results, "engine rounding-noise control"))
                 if "full" in reference else None)
    tolerance = agreement["tolerance"] if agreement else BF16_UNIT_ROUNDOFF
    half, steps = sizes.engine_steps // 2, sizes.engine_steps
    return {
        "reference_engine": reference_name,
        "agreement": agreement,
        "engines": {name: engine_checks(section_result(results, f"engine {name}").get("runs", {}), half, steps,
                                        tolerance, reference)
                    for name in results["meta"]["engines"] if f"engine {name}" in results["sections"]},
        "options": option_checks(results, reference["full"], tolerance) if "full" in reference else {},
        "throughput": throughput_summary(section_result(results, "throughput")),
    }


def option_checks(results: Results, eager: Results, tolerance: float) -> Results:
    """--torch_compile (and its CUDA-graph mode) must agree with the eager run within the bf16 tolerance; the device
    decoder sees other pixels and crops, so its run must only train as much (loss drop within 25% of the eager's)."""
    checks: Results = {}
    for name in ("torch_compile", "compile_reduce_overhead"):
        if run := section_run(results, f"option {name}"):
            checks[name] = run_checks(run, tolerance, eager)
    if run := section_run(results, "option decode_on"):
        drops = [run_["probe_start"] - run_["probe_end"] for run_ in (run, eager)]
        checks["decode_on"] = {**run_checks(run, tolerance, None), "loss_drop": drops[0], "eager_loss_drop": drops[1],
                               "skipped_images": run["results"]["skipped_images"],
                               "trains_alike": abs(drops[0] - drops[1]) <= 0.25 * abs(drops[1])}
    return checks


def throughput_summary(record: Results) -> Results:
    """Each path's img/s against (a), and the CPU cores per GPU each path needs for 90% of (a)."""
    synthetic = record.get("synthetic")
    if not synthetic:
        return {}
    model_rate = synthetic["images_per_s"]
    paths = {name: value for name, value in record.items() if name.startswith(("workers_", "decode_on_"))}
    summary: Results = {"model_images_per_s": model_rate,
                        "of_model": {name: value["training"]["images_per_s"] / model_rate
                                     for name, value in paths.items()}}
    worker_paths = sorted((value["workers"], value) for name, value in paths.items() if name.startswith("workers_"))
    if worker_paths:
        workers, least_contended = worker_paths[0]
        per_core = least_contended["loader_alone"]["images_per_s"] / workers
        summary["worker_images_per_s_per_core"] = per_core
        summary["cores_for_90_percent"] = math.ceil(0.9 * model_rate / per_core) + 1  # + the training process
        reaching = [w for w, value in worker_paths if value["training"]["images_per_s"] >= 0.9 * model_rate]
        summary["fewest_workers_reaching_90_percent"] = reaching[0] if reaching else None
    return summary
