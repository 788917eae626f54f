"""The GPU check (`run_scripts/gpu_check.py`): every engine trained, resumed and exported on a real GPU, and the
end-to-end throughput against the model alone.

- `config`: the GPU check's paths, engines and sizes (GPU and tiny), and its JSON records.
- `state`: one check's state, how a section runs (guarded, within the time budget), the reports written.
- `setup`: the check's environment and data sections.
- `children`: the check's child processes (start, end with every descendant), the measuring children run
  as sections, the background compilation.
- `engines`: the engine sections (`accelerate launch` of each config: bf16, fp32, resume, script options).
- `probes`: the engine worker in its child: run_mae.py's training between two probe losses, the export
  reloaded, the rounding-noise control.
- `throughput`: the measuring children: throughput from tensors, loader and device decoding, decode alone,
  MFU under each torch.compile mode.
- `summary`: the check's comparisons: the bf16 tolerance, each engine's verdict, options, cores per GPU.
- `report`: the check's `gpu_check.md`.

"""
