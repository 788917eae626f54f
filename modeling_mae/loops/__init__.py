"""What each script runs, built from the layers below. A script parses its flags, then imports its module here (so
that `--help` answers before torch loads) and calls one function.

- `pretraining_setup`: `run_mae.py`: the run built (`setup`, into a `Trainer`: `pretraining_state`), then `pretrain`;
- `pretraining`: the pretraining loop: masking noise per process and position, gradient accumulation, the
  non-finite loss guard; `pretraining_outputs`: validation, figures, checkpoints, results and exports;
- `finetuning_setup`: `run_finetune.py`: the classifier, loaders and optimizer built, then `finetune`;
  `finetuning`: its loop, with MixUp/CutMix and the per-epoch evaluation;
- `linear_probe`: `run_linear_probe.py`; `knn`: `run_knn.py`; `visualize`: `visualize.py`.

Imports from: model, common, data, training, interop, evaluation.
"""
