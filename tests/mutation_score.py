"""Mutation score of a core module with mutmut, on a fixed sample of its mutants and a targeted test selection.

    python tests/mutation_score.py training                   # a target: see TARGETS (e.g. hub, shards, scripts)
    python tests/mutation_score.py all --output scores.json   # every target, one after the other (hours)
    python tests/mutation_score.py evaluation --tree /tmp/main-tree   # another checkout (e.g. `git archive main`)

For a target, the tree is copied to a scratch folder with a `setup.cfg` [mutmut] section (the module, its tests), the
mutants of the functions that matter are listed and a fixed sample of them is kept (a hash of the mutant's name, so
the same mutants are drawn on every tree where the function did not change), and `mutmut run` runs them (each mutant
runs the selected tests that execute its function, fastest first, until one fails). The report counts killed,
survived, "no tests" (no selected test executes the function) and timeouts, per function; the score is
killed / (killed + survived + no tests). Subprocess tests (accelerate launch, SIGKILL) are left out: mutmut cannot see
what runs in another process. See docs/testing.md for the measured scores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parents[1]
# Tests (-k words) that run the code under test in another process: a real full disk or read-only folder (unshare),
# a second run beside a first one, a Hub failing under a launched script.
IN_ANOTHER_PROCESS = "for_real or folder_in_use or read_only_output_dir or fails_mid_run"
STATUS_BY_EXIT_CODE = {0: "survived", 1: "killed", 3: "killed", 5: "no tests", 33: "no tests", 36: "timeout",
                       -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


@dataclass(frozen=True)
class Target:
    paths: tuple[str, ...]  # files to mutate
    functions: tuple[str, ...]  # mutmut's function names ("x_name", "xǁClassǁmethod"); empty: all of them
    tests: tuple[str, ...]  # test files (those that exist in the tree), then -k
    deselect: str  # -k expression
    sample_percent: int


TARGETS = {
    "modeling": Target(
        ("modeling_mae/modeling_mae.py",),
        ("x_sincos_position_table", "x_resize_position_table", "x_masking_indices", "x_gather_tokens",
         "x_random_masking", "x_loss_patch_index", "x_patch_grid", "x_patchify", "x_gather_patches",
         "xǁPatchProjectionǁforward", "xǁMAEEmbeddingsǁforward", "x_eager_attention_forward", "xǁMAEAttentionǁforward",
         "xǁDropPathǁforward", "xǁMAELayerǁforward", "xǁMAETransformerǁ__init__", "xǁMAEDecoderǁforward",
         "xǁMAEModelǁforward", "xǁMAEForPreTrainingǁunpatchify", "xǁMAEForPreTrainingǁnormalize_patches",
         "xǁMAEForPreTrainingǁforward_loss", "xǁMAEForPreTrainingǁlogits_to_pixels", "xǁMAEForPreTrainingǁforward",
         "xǁMAEForImageClassificationǁforward", "x_classification_loss"),
        ("tests/test_modeling.py", "tests/test_conversion.py"), "not remote_code_in_a_process", 12),
    "training": Target(
        tuple(f"modeling_mae/training/{name}.py" for name in (
            "optimization", "accelerator", "progress", "checkpoints", "resume", "run_identity", "output_lock",
            "preemption")), (),
        ("tests/test_training.py", "tests/test_checkpoint_faults.py", "tests/test_progress.py"),
        f"not (sigkill or torch_compile or {IN_ANOTHER_PROCESS})", 5),
    "checkpoint_files": Target(
        ("modeling_mae/training/checkpoint_files.py",), (), ("tests/test_checkpoint_faults.py",),
        f"not ({IN_ANOTHER_PROCESS})", 25),
    "data": Target(
        tuple(f"modeling_mae/data/{name}.py" for name in ("sources", "labels", "stream", "loader")),
        ("x_pick_split", "x_detect_column", "x__count_local_examples", "x_split_size", "x_epoch_samples",
         "x__record_key", "xǁBadImageTallyǁcount", "xǁWorkerStreamǁ__iter__", "xǁWorkerStreamǁ_records",
         "xǁWorkerStreamǁ_batches", "xǁWorkerStreamǁ_augmentation_seed", "xǁWorkerStreamǁ_read",
         "xǁWorkerStreamǁ_batch", "xǁImageStreamLoaderǁ__len__", "xǁImageStreamLoaderǁset_epoch",
         "xǁImageStreamLoaderǁstate_dict", "xǁImageStreamLoaderǁload_state_dict", "xǁImageStreamLoaderǁ__iter__",
         "xǁImageStreamLoaderǁ_consume", "xǁImageStreamLoaderǁ_record_progress", "x__prepare_source"),
        ("tests/test_data.py",), "not two_real_processes", 15),
    "evaluation": Target(
        tuple(f"modeling_mae/evaluation/{name}.py" for name in
              ("models", "features", "metrics", "knn", "linear_probe", "layer_decay", "results")), (),
        ("tests/test_evaluation.py", "tests/test_recipe_flags.py"), "not two_processes and not launched", 12),
    "hub": Target(
        ("modeling_mae/interop/hub.py",), (), ("tests/test_hub.py",), f"not ({IN_ANOTHER_PROCESS})", 20),
    "model_card": Target(
        ("modeling_mae/interop/model_card.py",), (), ("tests/test_hub.py", "tests/test_training.py",
                                                      "tests/test_evaluation.py"),
        "card or end_to_end_exports or finetune_script_saves", 20),
    "shards": Target(
        ("modeling_mae/data/shards.py",), (), ("tests/test_data_faults.py", "tests/test_data.py"),
        "not two_real_processes", 20),
    "scripts": Target(
        tuple(f"modeling_mae/loops/{name}.py" for name in
              ("pretraining_setup", "pretraining", "pretraining_outputs", "pretraining_state", "finetuning_setup",
               "finetuning", "linear_probe", "knn", "visualize")), (),
        ("tests/test_training.py", "tests/test_recipe_flags.py", "tests/test_evaluation.py"),
        "not (sigkill or torch_compile or two_processes or launched)", 3),
}


def copy_tree(source: pathlib.Path, destination: pathlib.Path) -> None:
    """The tracked files of `source` (a git checkout: as they are on disk), or every file of a plain folder."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=source, check=True, capture_output=True).stdout
        names = [name for name in listing.decode().split("\0") if name]
    except subprocess.CalledProcessError:  # e.g. `git archive main | tar -x -C DIR`
        if not (source / "modeling_mae" / "__init__.py").is_file():
            raise ValueError(f"{source} is no checkout of this repository") from None
        names = [str(path.relative_to(source)) for path in source.rglob("*") if path.is_file()]
    for name in names:
        if (source / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, destination / name)


def write_mutmut_config(scratch: pathlib.Path, target: Target) -> None:
    tests = [test for test in target.tests if (scratch / test).is_file()]
    options = {
        "source_paths": sorted({path.split("/")[0] for path in target.paths}),
        "only_mutate": list(target.paths),
        "pytest_add_cli_args_test_selection": [*tests, "-k", target.deselect, "-p", "no:cacheprovider"],
        "also_copy": ["run_scripts", "configuration", "modeling_mae"],
    }
    lines = [f"{key} =" + "".join(f"\n    {value}" for value in values) for key, values in options.items()]
    lines.append("process_isolation = forkserver")  # torch is not fork-safe once tests have run
    (scratch / "setup.cfg").write_text("[mutmut]\n" + "\n".join(lines) + "\n")


def sampled_mutants(scratch: pathlib.Path, target: Target) -> list[str]:
    """The sample's mutant names, listed by mutmut itself (in the scratch folder, where its config is)."""
    script = (
        "import json, sys\nfrom mutmut.mutation.file_mutation import mutate_file_contents\n"
        "print(json.dumps({p: list(mutate_file_contents(p, open(p).read()).mutant_names) for p in sys.argv[1:]}))"
    )
    listed = subprocess.run([sys.executable, "-c", script, *target.paths], cwd=scratch, check=True,
                            capture_output=True, text=True).stdout
    names = []
    for path, mutants in json.loads(listed).items():
        module = path.removesuffix(".py").replace("/", ".")
        for name in mutants:
            function = name.split("__mutmut_")[0]
            keep = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < target.sample_percent
            if keep and (not target.functions or function in target.functions):
                names.append(f"{module}.{name}")
    return names


def statuses(scratch: pathlib.Path, target: Target, names: list[str]) -> dict[str, str]:
    exit_codes: dict[str, int | None] = {}
    for path in target.paths:
        meta = scratch / "mutants" / f"{path}.meta"
        exit_codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return {name: STATUS_BY_EXIT_CODE.get(exit_codes.get(name), "suspicious") for name in names}


def score(name: str, target: Target, tree: pathlib.Path, max_children: int) -> dict:
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f"mutation_{name}_"))
    try:
        copy_tree(tree, scratch)
        write_mutmut_config(scratch, target)
        names = sampled_mutants(scratch, target)
        # Subprocesses a test starts (a launched script) import the mutated copy, as the tests themselves do. The
        # folder must exist before Python starts: a missing one is cached as holding no module.
        (scratch / "mutants").mkdir()
        env = {**os.environ, "PYTHONPATH": str(scratch / "mutants"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        completed = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *names],
            cwd=scratch, env=env, check=False, capture_output=True, text=True,
        )
        by_name = statuses(scratch, target, names)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if all(status == "not checked" for status in by_name.values()):  # e.g. a test failed without any mutant
        return {"error": (completed.stdout + completed.stderr)[-3000:], "mutants": len(by_name), "score": None}
    counts = Counter(by_name.values())
    per_function: dict[str, Counter] = defaultdict(Counter)
    for mutant, status in by_name.items():
        per_function[mutant.split("__mutmut_")[0]][status] += 1
    denominator = counts["killed"] + counts["survived"] + counts["no tests"]
    return {
        "mutants": len(by_name), **counts, "score": counts["killed"] / denominator if denominator else None,
        "not_killed": {mutant: status for mutant, status in sorted(by_name.items()) if status != "killed"},
        "per_function": {function: dict(counter) for function, counter in sorted(per_function.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", help=f"Comma-separated, of {', '.join(TARGETS)}; or all.")
    parser.add_argument("--tree", type=pathlib.Path, default=REPO, help="The checkout to mutate (default: this one).")
    parser.add_argument("--output", type=pathlib.Path, help="Write the results as JSON here.")
    parser.add_argument("--max_children", type=int, default=2)
    parser.add_argument("--count", action="store_true", help="Only count the sampled mutants.")
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.targets == "all" else args.targets.split(",")
    if args.count:
        for name in names:
            with tempfile.TemporaryDirectory() as directory:
                copy_tree(args.tree.resolve(), pathlib.Path(directory))
                write_mutmut_config(pathlib.Path(directory), TARGETS[name])
                print(name, len(sampled_mutants(pathlib.Path(directory), TARGETS[name])))
        return 0
    results = {}
    for name in names:
        results[name] = score(name, TARGETS[name], args.tree.resolve(), args.max_children)
        result = results[name]
        print(f"{name}: {result.get('killed', 0)} killed, {len(result.get('not_killed', ()))} not killed of "
              f"{result['mutants']} sampled mutants, score {result['score']}", result.get("error", ""), flush=True)
        if args.output:
            args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
