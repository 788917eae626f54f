"""Experiments made of many runs, and measurements: the stage runner behind the evidence and scaling studies.

- `stages`: runs each stage (a script's `main`) in this process, once; a finished stage is read back, not rerun.

Imports from: model, common, data, training, interop, evaluation, loops.
"""
