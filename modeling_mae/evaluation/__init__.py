"""Downstream evaluation of MAE encoders: the paper's three protocols (k-NN, linear probing, fine-tuning) and their
shared pieces, plus the reconstruction figures (the paper's Figure 2).

- `models`: the encoder or classifier to evaluate, from any checkpoint or random weights;
- `features`: frozen features of a whole split, gathered over processes;
- `knn`, `linear_probe`, `layer_decay`: what each protocol adds;
- `metrics`, `top_k_accuracy`: accuracy through `evaluate`, over every process's predictions;
- `results`: loaders, class names and results files shared by the evaluation scripts;
- `visualization`: masked, reconstructed and original images side by side.

Imports from: model, common, data, training, interop.
"""
