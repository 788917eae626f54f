"""Masked Autoencoders (He et al., 2021) for the Hugging Face ecosystem.

Importing the package registers the models with transformers' Auto classes, so
`AutoModel.from_pretrained(path)` works without `trust_remote_code` wherever it is installed.

The package in layers, the lowest first; a module imports only from its own layer and those below it
(tests/test_layout.py checks this, and each sub-package's docstring says what it holds):
- model: `configuration_mae` and `modeling_mae`, the remote-code pair, which import only each other;
- common: `errors` (mistakes the user can fix, as one line) and `arguments` (the scripts' flags);
- `data`, `training`, `interop`, `evaluation`, `loops`, `studies`;
- then the scripts in run_scripts/. docs/architecture.md follows one batch through them.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_mae import MAE_PRESETS, MAEConfig, load_config, parse_overrides
from .modeling_mae import (
    MAEForImageClassification,
    MAEForPreTraining,
    MAEForPreTrainingOutput,
    MAEModel,
    MAEModelOutput,
    MAEPreTrainedModel,
    build_image_processor,
)

AutoConfig.register(MAEConfig.model_type, MAEConfig, exist_ok=True)
AutoModel.register(MAEConfig, MAEModel, exist_ok=True)
AutoModelForPreTraining.register(MAEConfig, MAEForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(MAEConfig, MAEForImageClassification, exist_ok=True)

__all__ = [
    "MAE_PRESETS",
    "MAEConfig",
    "MAEForImageClassification",
    "MAEForPreTraining",
    "MAEForPreTrainingOutput",
    "MAEModel",
    "MAEModelOutput",
    "MAEPreTrainedModel",
    "build_image_processor",
    "load_config",
    "parse_overrides",
]
