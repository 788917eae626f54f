"""Masked Autoencoders (He et al., 2021) for the Hugging Face ecosystem.

Importing a model name from the package (`from modeling_mae import MAEModel`, or any name of `__all__`) registers the
models with transformers' Auto classes, so `AutoModel.from_pretrained(path)` works without `trust_remote_code`
wherever it is installed. The names load on first use (PEP 562): importing the package, or a light module of it such
as the scripts' flags (`arguments`), imports neither torch nor transformers' models, so that `--help` answers at once.

The package in layers, the lowest first; a module imports only from its own layer and those below it
(tests/test_layout.py checks this, and each sub-package's docstring says what it holds):
- model: `configuration_mae` and `modeling_mae`, the remote-code pair, which import only each other;
- common: `errors` (mistakes the user can fix, as one line), `arguments` (the scripts' flags) and `text` (the
  wording of printed lines);
- `data`, `training`, `interop`, `evaluation`, `loops`, `studies`;
- then the scripts in run_scripts/. docs/architecture.md follows one batch through them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# The package's names and the module that defines each.
_EXPORTS = {
    **dict.fromkeys(("MAE_PRESETS", "MAEConfig", "load_config", "parse_overrides"), "configuration_mae"),
    **dict.fromkeys(
        ("MAEForImageClassification", "MAEForPreTraining", "MAEForPreTrainingOutput", "MAEModel", "MAEModelOutput",
         "MAEPreTrainedModel", "build_image_processor"),
        "modeling_mae",
    ),
}

__all__ = sorted(_EXPORTS)


def register_auto_classes() -> None:
    """Register the config and the three models with transformers' Auto classes (again: a no-op)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForPreTraining,
    )

    from .configuration_mae import MAEConfig
    from .modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel

    AutoConfig.register(MAEConfig.model_type, MAEConfig, exist_ok=True)
    AutoModel.register(MAEConfig, MAEModel, exist_ok=True)
    AutoModelForPreTraining.register(MAEConfig, MAEForPreTraining, exist_ok=True)
    AutoModelForImageClassification.register(MAEConfig, MAEForImageClassification, exist_ok=True)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
