"""`plan(config)`: every stage validated before any compute and before any weights are read.

The plan resolves the config (each stage block gains its registry defaults; an unknown key is
an error naming it), builds the teacher's and the student's architectures (from the config
blocks, or from the configs of the checkpoints named, never their weights), and checks each stage
in order: its strategy, role, length, optimizer, teacher, architectures, ETD options, and that the
global batch splits over the devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mobilebert_jax import default_config, pretrained
from mobilebert_jax.distill import etd
from mobilebert_jax.downstream import get_task
from mobilebert_jax.downstream.metrics import TAGGING_SCHEMES
from mobilebert_jax.models import ModelConfig, get_preset
from mobilebert_jax.parallel import sharding
from mobilebert_jax.stages import registry
from mobilebert_jax.stages.registry import COMMON_KEYS, StageSpec
from mobilebert_jax.training import optimizer as optim
from mobilebert_jax.training.context import ROLES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Global keys that are not stage names: every key of the base config.
RESERVED_KEYS = tuple(default_config.base_config().keys())
# Global blocks whose missing keys take the defaults of `default_config.base_config`.
GLOBAL_BLOCKS = ("data", "squad_data", "tagging_data", "augmentation", "robustness",
                 "quantization", "mesh", "checkpoint")
# The architecture fields a teacher checkpoint must share with config.teacher.
SIZE_FIELDS = ("vocab_size", "embedding_size", "hidden_size", "intra_size", "num_layers",
               "num_heads", "intermediate_size", "num_ffn", "attention_input")
# How a model is computed, not what it is: these come from the run's config.teacher /
# config.student block even when the weights (and the rest of the architecture) come from a
# checkpoint, which records whatever the run that wrote it used.
EXECUTION_FIELDS = ("remat", "remat_policy", "scan_layers", "attention_probs_dtype")


def with_execution_fields(loaded: ModelConfig, configured: ModelConfig) -> ModelConfig:
  """`loaded` (a checkpoint's architecture) computed as `configured` says (`EXECUTION_FIELDS`)."""
  return loaded.replace(**{f: getattr(configured, f) for f in EXECUTION_FIELDS})


class PlanError(ValueError):
  """A config that cannot run; the message names the key or value at fault."""


@dataclasses.dataclass(frozen=True)
class PlannedStage:
  name: str
  index: int
  spec: StageSpec
  role: str
  stage: ml_collections.ConfigDict  # the block with every key


@dataclasses.dataclass(frozen=True)
class Plan:
  config: ml_collections.ConfigDict   # resolved: what runs and what config.json records
  stages: list[PlannedStage]
  model_configs: dict[str, ModelConfig]
  dtype: Any
  rules: tuple
  mesh: Any


# Widths equal to the hidden size in a BERT-style preset (no bottleneck): overriding only
# `hidden_size` moves them with it (a bottleneck preset's differ, and stay).
TIED_TO_HIDDEN = ("intra_size", "embedding_size")


def model_config(entry, where: str) -> ModelConfig:
  """A ModelConfig from a config block: optional `preset` (+ `tiny`) then the fields set
  (None-valued fields, the placeholders of `model_block`, keep the preset's value; widths the
  preset ties to `hidden_size` follow an override of it, `TIED_TO_HIDDEN`)."""
  values = dict(entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else entry)
  preset, tiny = values.pop("preset", None), values.pop("tiny", False)
  values = {k: v for k, v in values.items() if v is not None}
  try:
    base = get_preset(preset, tiny_variant=tiny) if preset else ModelConfig()
  except ValueError as e:
    raise PlanError(f"{where}.preset: {e}") from None
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise PlanError(f"{where}: unknown model config keys {unknown}; valid keys: {sorted(known)}")
  if "layer_ops" in values:
    values["layer_ops"] = tuple(values["layer_ops"])
  if "hidden_size" in values:  # widths the preset ties to the hidden size follow it
    for key in TIED_TO_HIDDEN:
      if key not in values and getattr(base, key) == base.hidden_size:
        values[key] = values["hidden_size"]
  try:
    return base.replace(**values)
  except ValueError as e:
    raise PlanError(f"{where}: {e}") from e


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every global key and global block key of `base_config` present
  (missing ones take their defaults); an unknown key inside a global block is an error."""
  base = default_config.base_config().to_dict()
  values = config.to_dict()
  for key, default in base.items():
    if key not in values:
      values[key] = default
    elif key in GLOBAL_BLOCKS:
      given = values[key]
      unknown = sorted(set(given) - set(default))
      if unknown:
        raise PlanError(f"config.{key}: unknown key(s) {unknown}; valid keys: {sorted(default)}")
      values[key] = dict(default, **given)
  return ml_collections.ConfigDict(values)


def stage_names(config) -> list[str]:
  """The stages `config.stages` names, in order (a comma-separated string or a list)."""
  raw = config.stages
  names = [s.strip() for s in (raw.split(",") if isinstance(raw, str) else raw) if s.strip()]
  if not names:
    raise PlanError("config.stages names no stage")
  for name in names:
    if name in RESERVED_KEYS:
      raise PlanError(f"stage name {name!r} collides with the reserved config key {name!r}")
    if name not in config:
      raise PlanError(f"unknown stage {name!r}: config has no block config.{name} "
                      f"(config.stages={raw!r})")
  return names


def resolve_stage(name: str, block) -> tuple[StageSpec, ml_collections.ConfigDict]:
  """The stage's registry entry and its block with every key (registry defaults filled in)."""
  if not isinstance(block, ml_collections.ConfigDict) or "strategy" not in block:
    raise PlanError(f"config.{name} must be a block with a `strategy`; registered strategies: "
                    f"{registry.names()}")
  try:
    spec = registry.get(block.strategy, f"config.{name}.strategy")
  except ValueError as e:
    raise PlanError(str(e)) from None
  defaults = dict(COMMON_KEYS, model=spec.role)
  defaults.update(spec.keys)
  given = block.to_dict()
  unknown = sorted(set(given) - set(defaults) - {"strategy", "optimizer"})
  if unknown:
    raise PlanError(f"config.{name}: unknown key(s) {unknown} for strategy {spec.name!r}; valid "
                    f"keys: {sorted(set(defaults) | {'strategy', 'optimizer'})}")
  if "optimizer" not in given:
    raise PlanError(f"config.{name}: no optimizer block")
  resolved = dict(defaults)
  resolved.update(given)
  return spec, ml_collections.ConfigDict(resolved)


def _checkpoint_config(path: str, where: str) -> ModelConfig:
  try:
    return pretrained.checkpoint_config(path)
  except (FileNotFoundError, ValueError) as e:
    raise PlanError(f"{where}={path!r}: {e}") from None


def _teacher_config(config) -> ModelConfig:
  """config.teacher, or the teacher checkpoint's architecture (checked against config.teacher
  unless check_teacher_config is False)."""
  configured = model_config(config.teacher, "config.teacher")
  path = config.teacher_checkpoint
  if not path:
    return configured
  loaded = _checkpoint_config(path, "config.teacher_checkpoint")
  diff = {f: (getattr(loaded, f), getattr(configured, f)) for f in SIZE_FIELDS
          if getattr(loaded, f) != getattr(configured, f)}
  if diff and config.check_teacher_config:
    detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
    fixes = " ".join(f"--config.teacher.{k}={a}" for k, (a, _) in diff.items())
    raise PlanError(f"teacher checkpoint {path} does not match config.teacher ({detail}); pass "
                    f"{fixes}, or --config.check_teacher_config=False to take the checkpoint's "
                    "architecture")
  return with_execution_fields(loaded, configured)


def plan(config: ml_collections.ConfigDict, devices=None) -> Plan:
  """Validates `config` (every stage, in order) and returns the resolved plan.

  Reads at most the configs of the checkpoints named (no weights) and the device list; raises
  `PlanError` with one line naming the key or value at fault.
  """
  resolved = with_defaults(config)
  names = stage_names(resolved)
  dtype_name = resolved.dtype
  if dtype_name not in DTYPES:
    raise PlanError(f"config.dtype={dtype_name!r} is not one of {sorted(DTYPES)}")
  try:
    mesh = sharding.create_mesh(dict(resolved.mesh), devices)
  except ValueError as e:
    raise PlanError(f"config.mesh: {e}") from None
  batch_shards = sharding.batch_shards(mesh)
  if int(resolved.data.batch_size) % batch_shards:
    raise PlanError(f"config.data.batch_size={resolved.data.batch_size} does not split over the "
                    f"mesh's {' x '.join(sharding.BATCH_AXES)} = {batch_shards} devices (mesh "
                    f"{dict(mesh.shape)}): use a multiple of {batch_shards}")
  if resolved.data.batch_size % jax.process_count():
    raise PlanError(f"config.data.batch_size={resolved.data.batch_size} does not split over "
                    f"{jax.process_count()} processes")

  stages = []
  for index, name in enumerate(names):
    spec, block = resolve_stage(name, resolved[name])
    resolved[name] = block
    stages.append(PlannedStage(name, index, spec, block.model, block))

  configured_student = model_config(resolved.student, "config.student")
  configs = {"teacher": _teacher_config(resolved), "student": configured_student}
  downstream = [s for s in stages if s.spec.downstream]
  glue = [s for s in downstream if s.spec.data == "glue"]
  if glue:
    try:
      task = get_task(resolved.task)
    except (KeyError, ValueError) as e:
      raise PlanError(f"config.task={resolved.task!r}: {e}") from None
  if any(s.spec.data == "tagging" for s in stages):
    check_tagging(resolved.tagging_data)
  if downstream and resolved.init_checkpoint:
    configs["student"] = with_execution_fields(
        _checkpoint_config(resolved.init_checkpoint, "config.init_checkpoint"), configured_student)
  if downstream and downstream[0].spec.name == "finetune":
    configs["student"] = configs["student"].replace(num_labels=task.num_labels)
  if resolved.student_checkpoint:  # the student's architecture is the checkpoint's (e.g. NAS)
    configs["student"] = with_execution_fields(
        _checkpoint_config(resolved.student_checkpoint, "config.student_checkpoint"),
        configured_student)

  has_teacher = bool(resolved.teacher_checkpoint)
  has_student = bool(resolved.student_checkpoint) or bool(downstream and
                                                          resolved.init_checkpoint)
  for planned in stages:
    name, spec, stage, role = planned.name, planned.spec, planned.stage, planned.role
    where = f"config.{name}"
    if role not in ROLES:
      raise PlanError(f"{where}.model={role!r} is not one of {list(ROLES)}")
    if spec.needs_teacher and role != "student":
      raise PlanError(f"{where}: strategy {spec.name!r} trains the student, but model={role!r}")
    if int(stage.num_steps) < 0 or (int(stage.num_steps) == 0 and not
                                    (spec.downstream and float(stage.num_epochs) > 0)):
      raise PlanError(f"{where}.num_steps must be >= 1 (or 0 with {where}.num_epochs > 0 on "
                      f"task data), got {stage.num_steps!r}")
    if not 0.0 <= float(stage.warmup_fraction) < 1.0:
      raise PlanError(f"{where}.warmup_fraction must be in [0, 1), got {stage.warmup_fraction!r}")
    try:
      optim.create_optimizer(optimizer_config(stage, max(int(stage.num_steps), 1)))
    except ValueError as e:
      raise PlanError(f"{where}.optimizer: {e}") from None
    if spec.needs_teacher and not has_teacher:
      raise PlanError(f"stage {name!r} ({spec.name}) needs a teacher: run a 'pretrain' stage for "
                      "the teacher first or set config.teacher_checkpoint")
    scanned = [r for r in ROLES if configs[r].scan_layers and
               (r == role or (r == "teacher" and spec.needs_teacher))]
    if scanned and not spec.scan_layers:
      raise PlanError(f"{where}: strategy {spec.name!r} reads per-layer parameters and does not "
                      f"run models under nn.scan; set --config.{scanned[0]}.scan_layers=False")
    if configs[role].scan_layers and spec.data == "glue" and resolved.quantization.ptq_eval:
      raise PlanError(f"config.quantization.ptq_eval quantizes per-layer parameters; set "
                      f"--config.{role}.scan_layers=False")
    try:
      etd.check_stage_options(stage, where, configs["teacher"], configs["student"], role=role,
                              has_teacher=has_teacher, has_student=has_student,
                              pretraining_data=not spec.downstream)
      if spec.check is not None:
        spec.check(name, stage, configs["teacher"], configs["student"])
    except PlanError:
      raise
    except ValueError as e:
      raise PlanError(str(e) if str(e).startswith("config.") else f"{where}: {e}") from None
    has_teacher = has_teacher or role == "teacher"
    has_student = has_student or role == "student"

  rules = tuple(tuple(r) for r in resolved.logical_rules) or sharding.LOGICAL_RULES
  return Plan(config=resolved, stages=stages, model_configs=configs, dtype=DTYPES[dtype_name],
              rules=rules, mesh=mesh)


def stage_length(stage, batches_per_epoch: int) -> int:
  """A stage's steps: `num_steps` when set (> 0), else ceil(num_epochs x batches per epoch)."""
  if int(stage.num_steps) > 0:
    return int(stage.num_steps)
  return max(1, math.ceil(float(stage.num_epochs) * batches_per_epoch))


def optimizer_config(stage, num_steps: int, warmup_steps: int | None = None
                     ) -> ml_collections.ConfigDict:
  """The stage's optimizer block for a run of `num_steps` micro-steps (warm-up
  `warmup_fraction` of the optimizer steps, num_steps // grad_accum_steps, when that is set)."""
  opt = ml_collections.ConfigDict(stage.optimizer.to_dict())
  opt.total_steps = int(num_steps)
  if float(stage.warmup_fraction) > 0:
    updates = int(num_steps) // int(opt.get("grad_accum_steps", 1))
    opt.warmup_steps = int(round(float(stage.warmup_fraction) * updates))
  return opt


def check_tagging(tagging) -> None:
  """A tagging stage needs `config.tagging_data.train_file` and `dev_file` and a known scheme."""
  for key in ("train_file", "dev_file"):
    if not tagging[key]:
      raise PlanError(f"config.tagging_data.{key} is empty: a tagging stage reads a CoNLL-format "
                      "file (token ... tag per line, blank line between sentences)")
  if tagging.scheme not in TAGGING_SCHEMES:
    raise PlanError(f"config.tagging_data.scheme={tagging.scheme!r} is not one of "
                    f"{list(TAGGING_SCHEMES)} (bio: span F1 for NER/chunking; accuracy: POS)")
