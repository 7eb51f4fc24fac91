"""The stage registry: one entry per training strategy, read by `plan` and the runner.

A stage is a config block `config.<name>` whose `strategy` names an entry here. The entry says
everything the runner needs and nothing else does:

  head, teacher_head  the head the trained model carries; the teacher's head (None: no teacher).
  data                what it reads: "pretraining" (MLM + NSP examples), "glue", "squad" or
                      "tagging" (CoNLL files, `config.tagging_data`).
  loss                `loss(ctx, params, teacher_params, batch, rng, step) -> (loss, metrics)`, a
                      top-level function with its formula in the docstring; `ctx` is a
                      `LossContext` (stage block, model, teacher model), params
                      {"model": ..., "aux": ...}.
  keys                the stage block's own keys with their defaults, and any common key
                      (`COMMON_KEYS`) whose default differs here; `plan` fills them all in and
                      rejects any other key.
  check               `check(name, stage, teacher_config, student_config)`: validation before
                      any compute (raise ValueError naming the key).
  aux_init, aux_from  extra trainable parameters (projections, LSQ steps): fresh
                      `aux_init(ctx, rng)`, or `aux_from(ctx, model_params, batch)` computed from
                      the starting weights and a real batch.
  multipliers         `multipliers(ctx, step, params) -> tree` of per-parameter learning-rate
                      multipliers (PKT freezes layers with it).
  after_step          `after_step(ctx, done, state)`, an optional per-step hook.
  evaluate            `evaluate(EvalContext) -> Evaluation` once the stage is trained.
  save_aux            `save_aux(aux, final_dir)`: extras written beside the final model.
  exports             "model" (the runner writes the trained model to `workdir/<role>/`), or
                      what a self-driving stage writes itself, relative to the workdir
                      ("architectures.json"; "{stage}/final" names the stage's directory).
  run                 a stage that drives its own loop: `run(StageEnv) -> finished` (NAS).
  scan_layers         whether its models may run their layers under `nn.scan`
                      (`ModelConfig.scan_layers`); False where it reads per-layer parameters.

Adding a strategy takes three things and no edit elsewhere:
  1. a loss function, e.g. in your own module:
       def my_loss(ctx, params, teacher_params, batch, rng, step):
         '''L = ...'''  (the formula)
  2. one entry: `register(StageSpec("my_strategy", loss=my_loss, keys={"alpha": 0.5}))`
     (at import time of that module);
  3. one config with a block `{strategy: "my_strategy", num_steps, optimizer, alpha}` named in
     `config.stages`.
The built-in entries live in `mobilebert_jax.stages.builtin`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

DATA_KINDS = ("pretraining", "glue", "squad", "tagging")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One strategy's registry entry (see the module docstring for each field)."""
  name: str
  loss: Callable | None = None
  head: str = "pretraining"
  teacher_head: str | None = None
  data: str = "pretraining"
  role: str = "student"
  keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  check: Callable[..., None] | None = None
  aux_init: Callable[..., dict] | None = None
  aux_from: Callable[..., dict] | None = None
  multipliers: Callable[..., Any] | None = None
  after_step: Callable[..., None] | None = None
  evaluate: Callable[..., Any] | None = None
  save_aux: Callable[[dict, str], None] | None = None
  exports: str = "model"
  run: Callable[..., bool] | None = None
  scan_layers: bool = True

  def __post_init__(self):
    if (self.loss is None) == (self.run is None):
      raise ValueError(f"stage {self.name!r}: give exactly one of loss (trained by the runner's "
                       "loop) or run (a stage that drives its own loop)")
    if self.data not in DATA_KINDS:
      raise ValueError(f"stage {self.name!r}: data={self.data!r} is not one of {list(DATA_KINDS)}")
    if self.exports != "model" and self.run is None:
      raise ValueError(f"stage {self.name!r}: exports={self.exports!r}: only a stage with `run` "
                       "writes its own outputs; one trained by the runner exports 'model'")

  @property
  def needs_teacher(self) -> bool:
    return self.teacher_head is not None

  @property
  def downstream(self) -> bool:
    """Whether it trains on a downstream task (and so counts its length in epochs)."""
    return self.data != "pretraining"


# Keys every stage block has (besides `strategy`), with their defaults. `model` defaults to the
# entry's role; `num_steps` 0 = derived from `num_epochs` x the task's training data
# (downstream stages only); `warmup_fraction` > 0 sets the optimizer's warm-up to that share of
# the steps; `copy_from_teacher` starts a fresh student from the teacher's embeddings, pooler
# and heads (`runner.copy_teacher_parts`; on by default only where the MobileBERT release
# copies them: jkt, pkt).
COMMON_KEYS: dict[str, Any] = {
    "model": "",
    "num_steps": 0,
    "num_epochs": 0.0,
    "warmup_fraction": 0.0,
    "copy_from_teacher": False,
    "init_from_teacher": "",
    "etd_importance": "first_order",
    "etd_num_batches": 8,
    "etd_layer_mapping": "uniform",
}

_REGISTRY: dict[str, StageSpec] = {}


def register(spec: StageSpec, *, replace: bool = False) -> StageSpec:
  """Adds `spec` under `spec.name` (an existing name needs `replace=True`); returns it."""
  if spec.name in _REGISTRY and not replace:
    raise ValueError(f"strategy {spec.name!r} is already registered")
  _REGISTRY[spec.name] = spec
  return spec


def unregister(name: str) -> None:
  """Removes a strategy (tests that register a toy one clean up with this)."""
  _REGISTRY.pop(name, None)


def get(name: str, where: str = "strategy") -> StageSpec:
  """The entry of strategy `name`; an unknown name is an error listing the registered ones."""
  if name not in _REGISTRY:
    raise ValueError(f"{where}: unknown strategy {name!r}; registered strategies: "
                     f"{sorted(_REGISTRY)}")
  return _REGISTRY[name]


def names() -> list[str]:
  """Every registered strategy."""
  return sorted(_REGISTRY)
