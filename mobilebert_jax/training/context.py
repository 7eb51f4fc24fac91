"""What a stage is given: the per-role model state, the loss context, the environment of a
stage that drives its own loop, and what an evaluation returns.

These are plain containers shared by the stage runner (`mobilebert_jax.stages`) and the modules
it runs (`distill`, `downstream`, `search`, `quantization`); keeping them at the bottom lets every
arrow point down.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import ml_collections

from mobilebert_jax.models import ModelConfig
from mobilebert_jax.training.core import open_checkpointer
from mobilebert_jax.training.metrics import MetricsWriter

ROLES = ("teacher", "student")


@dataclasses.dataclass
class RoleState:
  """The latest model of one role (teacher or student): its architecture, the head its
  parameters carry, the host parameters (None until trained or loaded) and the trainable
  extras a stage learned beside them (e.g. LSQ step sizes)."""
  config: ModelConfig
  head: str = "pretraining"
  params: dict | None = None
  aux: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What a strategy's loss reads besides (params, teacher_params, batch, rng, step): the stage
  block (every key with its default), the trained model and the frozen teacher (or None)."""
  stage: ml_collections.ConfigDict
  model: nn.Module
  teacher_model: nn.Module | None = None


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """An evaluator's result: metrics ({name: float}, merged into `eval_results.json`) and files
  ({path relative to the workdir: text}); the caller writes both, on process 0."""
  metrics: dict[str, float]
  files: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What a stage's evaluator gets once its model is trained.

  `predict(forward, params, model=None)` returns `arrays -> {name: [N, ...]}`: the one batched,
  sharded prediction path (`forward(params, batch) -> {name: [B, ...]}`, params on host, laid out
  like the stage's model or `model`).
  `predict_logits(model, params)` is that path for a classifier's logits (`arrays -> [N, C]`).
  """
  stage: ml_collections.ConfigDict
  config: ml_collections.ConfigDict
  model: nn.Module
  params: dict
  aux: dict
  dataset: Any
  teacher: RoleState
  predict: Callable[..., Callable[[dict], dict]]

  def predict_logits(self, model: nn.Module, params: Any) -> Callable[[dict], Any]:
    def forward(p, batch):
      return {"logits": model.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                                    batch["token_type_ids"]).logits}
    run = self.predict(forward, params, model)
    return lambda arrays: run(arrays)["logits"]


@dataclasses.dataclass
class StageEnv:
  """The environment of a stage that drives its own loop (e.g. the NAS-BERT search): the mesh,
  the roles, the data, the training loop of `mobilebert_jax.training.core` with this run's
  writer and stop signal bound (`train(name, num_steps, step_fn, state, dataset, checkpointer,
  batch_sharding, context=..., after_step=..., extra=...)`), where to write, and
  `write_evaluation(step, Evaluation)` (merged into eval_results.json as any stage's)."""
  name: str
  index: int
  stage: ml_collections.ConfigDict
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  rules: Any
  batch_sharding: Any
  teacher: RoleState
  student: RoleState
  writer: MetricsWriter
  dataset: Callable[[int], Any]      # dataset(seed_offset) -> the stage's training data
  train: Callable[..., Any]
  tokenizer_dir: str
  primary: bool
  write_evaluation: Callable[[int, "Evaluation"], None] = lambda step, result: None

  @property
  def stage_dir(self) -> str:
    return os.path.join(self.workdir, self.name)

  @property
  def seed(self) -> int:
    return int(self.config.seed)

  def checkpointer(self):
    """The stage's checkpoints, `<workdir>/<stage>/checkpoints`."""
    return open_checkpointer(os.path.join(self.stage_dir, "checkpoints"), self.config.checkpoint)
