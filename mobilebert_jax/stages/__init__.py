"""Stages: the strategy registry, `plan(config)` and the runner that trains a config's stages.

`mobilebert_jax.stages.registry` documents how to add a strategy; the built-in ones are
registered by importing this package.
"""

from mobilebert_jax.stages import builtin  # noqa: F401  (registers the built-in strategies)
from mobilebert_jax.stages.planner import Plan, PlanError, model_config, plan, stage_names
from mobilebert_jax.stages.registry import StageSpec, get, names, register, unregister
from mobilebert_jax.stages.runner import ConfigChangedError, Trainer, train_and_evaluate

__all__ = ["Plan", "PlanError", "StageSpec", "Trainer", "ConfigChangedError", "get",
           "model_config", "names", "plan", "register", "stage_names", "train_and_evaluate",
           "unregister"]
