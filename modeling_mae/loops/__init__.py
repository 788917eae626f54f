"""The loops the scripts run, built from the layers below: each takes what its script's builders made and trains it.

- `pretraining`: MAE pretraining (`run_scripts/run_mae.py`): masking noise per process and position, gradient
  accumulation, validation loss, figures, checkpoints and exports along the way;
- `finetuning`: supervised fine-tuning of a pretrained encoder (`run_scripts/run_finetune.py`).

Imports from: model, common, data, training, interop, evaluation.
"""
