"""Weights and models in and out: other implementations' checkpoints, exports, model cards and the Hub.

- `conversion`: official MAE, timm and transformers' ViTMAE checkpoints in; transformers' ViT and timm out;
- `hub`: the `from_pretrained` export folder and uploads to the Hub (in the background while training);
- `model_card`: the README.md of an export, with the metadata the Hub indexes.

Imports from: model, common, data, training.
"""
