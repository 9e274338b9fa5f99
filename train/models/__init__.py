"""Every model a run can train, by name: `build_model("resnet50", 19)`, `list_models()`.

A new model is one new module here that calls `register_model`, imported below (or, from
outside, imported before `fit` runs); nothing else changes. The contract each model meets is in
docs/design.md.
"""

from train.models import plain, torchvision_encoders  # noqa: F401  (they register themselves)
from train.models.registry import (
    MODEL_SETTINGS,
    ModelError,
    arch_of,
    build_model,
    get_model_builder,
    list_models,
    model_card,
    model_from_config,
    pretrained_weights,
    register_model,
    settings_taken,
)
from train.models.weights import WeightsError

__all__ = ["MODEL_SETTINGS", "ModelError", "WeightsError", "arch_of", "build_model",
           "get_model_builder", "list_models", "model_card", "model_from_config",
           "pretrained_weights", "register_model", "settings_taken"]
