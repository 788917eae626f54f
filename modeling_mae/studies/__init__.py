"""Experiments made of many runs, and measurements: the stage runner behind the evidence and scaling studies, the
scaling study's design and report, the benchmark and the GPU check.

- `stages`: runs each stage (a script's `main`) in this process, once; a finished stage is read back, not rerun.
- `benchmark`: the benchmark's kit: the models compared (transformers' ViTMAE with our shapes, the mask-token
  baseline), the FLOPs of a training step, timing, memory and profiles of a step, speedups.
- `benchmark_sections`: the benchmark's sections (training step, asymmetric encoder, attention kernels, data path).
- `benchmark_report`: the benchmark's `benchmark.json` and `benchmark.md`.
- `gpu_check`: the GPU check's machinery (engines, throughput, MFU, its report), one module per concern.
- `scaling`: the scaling study's design: protocols, ladders of sizes, budgets, and the stages that run them.
- `scaling_statistics`: its statistics (t-intervals of the paired gain and of the slope, the plateau check).
- `scaling_report`: its summary, table and figures, made from its record alone.
- `records`: a study's record (stages' arguments, results and curves, git SHA, versions, machine), a stage rerun.
- `recipe_sweep`: the choice of the small-image fine-tuning recipe on a held-out part of the train split.

Imports from: model, common, data, training, interop, evaluation, loops.
"""
