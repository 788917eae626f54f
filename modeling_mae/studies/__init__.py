"""Experiments made of many runs, and measurements: the stage runner behind the evidence and scaling studies, the
scaling study's design and report, the benchmark and the GPU check.

- `stages`: runs each stage (a script's `main`) in this process, once; a finished stage is read back, not rerun.
- `benchmark`: the benchmark's kit: the models compared (transformers' ViTMAE with our shapes, the mask-token
  baseline), the FLOPs of a training step, timing, memory and profiles of a step, speedups.
- `benchmark_sections`: the benchmark's sections (training step, asymmetric encoder, attention kernels, data path).
- `benchmark_report`: the benchmark's `benchmark.json` and `benchmark.md`.
- `gpu_check`: the GPU check's machinery (engines, throughput, MFU, its report), one module per concern.
- `scaling`: the scaling study's design: protocols, ladders of sizes, budgets and the rules that scale the recipe down.
- `scaling_report`: the scaling study's table and figures.

Imports from: model, common, data, training, interop, evaluation, loops.
"""
