"""Training building blocks, shared by the pretraining and fine-tuning loops (`modeling_mae.loops`).

- `optimization`: AdamW, the learning-rate schedule and the `TrainingPlan`;
- `accelerator`: the Accelerate set-up and the batch layout;
- `progress`: logging, progress bars, throughput, loss statistics, the non-finite loss guard;
- `checkpoints`: save, rotate, resume, claim an output folder;
- `checkpoint_files`: every file of a checkpoint checked (weights-only) before a resume loads it.

Imports from: model, common, data.
"""
