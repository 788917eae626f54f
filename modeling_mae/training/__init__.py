"""Training building blocks, shared by the pretraining and fine-tuning loops (`modeling_mae.loops`).

- `optimization`: AdamW, the learning-rate schedule and the `TrainingPlan`;
- `accelerator`: the Accelerate set-up and the batch layout;
- `progress`: logging, progress bars, throughput, loss statistics, the non-finite loss guard;
- `checkpoints`: save and rotate checkpoints;
- `resume`: which checkpoint to resume, whether it may be resumed here, loading it, claiming the output folder;
- `checkpoint_files`: every file of a checkpoint checked (weights-only) before a resume loads it;
- `run_identity`: the model and data a checkpoint trained, checked on resume;
- `output_lock`: one run at a time in an output folder (and the start-up check that it is writable);
- `preemption`: `--save_on_signal`, a checkpoint and a clean exit on SIGTERM or SIGUSR1.

Imports from: model, common, data.
"""
