"""The one trainer: runs the stages a config names (teacher pretraining, AKT/JKT/PKT, PD, TinyBERT).

Each stage is `config.<stage name>` with a `strategy` (see `mobilebert_jax.distill.strategies`),
the model it trains (`teacher` or `student`), `num_steps` and an `optimizer` block. The stage's
train step is jitted once over the device mesh with explicit shardings and a donated state; the
loop around it only feeds batches, checkpoints and logs. Workdir layout:

  workdir/config.json, metrics.jsonl, tensorboard/
  workdir/<stage>/checkpoints/<step>/   orbax checkpoints (state + data position), for resuming
  workdir/<stage>/final/                the stage's trained model (native, `load_pretrained`)
  workdir/teacher/, workdir/student/    the last trained teacher / student
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mobilebert_jax import pretrained
from mobilebert_jax.data import DataConfig, PretrainingDataset, ensure_prepared, prefetch_to_device
from mobilebert_jax.distill import strategies
from mobilebert_jax.models import ModelConfig, build_model, get_preset
from mobilebert_jax.parallel import sharding
from mobilebert_jax.training import optimizer as optim
from mobilebert_jax.training.checkpointing import Checkpointer
from mobilebert_jax.training.metrics import MetricsWriter, Throughput

log = logging.getLogger("mobilebert_jax")
ROLES = ("teacher", "student")
RESERVED_KEYS = ("stages", "teacher", "student", "data", "mesh", "checkpoint", "seed", "dtype",
                 "teacher_checkpoint", "student_checkpoint", "log_every_steps", "logical_rules",
                 "task", "init_checkpoint", "data_dir", "squad_data", "robustness",
                 "augmentation", "check_teacher_config", "quantization")
# Strategies that train a task head on downstream data (GLUE or SQuAD), and those whose trained
# model is scored on the task's dev data when the stage ends.
DOWNSTREAM_STRATEGIES = ("finetune", "squad", "task_intermediate", "task_prediction", "kdlsq")
GLUE_STRATEGIES = ("finetune", "task_intermediate", "task_prediction", "kdlsq")
EVALUATED_STRATEGIES = ("finetune", "squad", "task_prediction", "kdlsq")
PREPARED_DATA_DIR = "prepared_data"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainingDivergedError(RuntimeError):
  """A loss term became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass
class CompiledStage:
  """Everything one stage's loop needs (see `Trainer.build_stage`)."""
  name: str
  stage: Any
  role: str
  head: str
  model: nn.Module
  model_config: ModelConfig
  strategy: strategies.Strategy
  rng: jax.Array
  shardings: Any          # NamedShardings of the TrainState
  abstract_state: Any     # ShapeDtypeStructs with those shardings (for restoring)
  batch_sharding: Any
  teacher_params: Any     # on the mesh, or None
  init_state: Any         # jitted (params, rng) -> TrainState
  step_fn: Any            # jitted (state, teacher_params, batch) -> (state, metrics)


# ----------------------------------------------------------------------------- config


def stage_names(config) -> list[str]:
  """The stages to run, in order, validated against the config (before any compute)."""
  raw = config.stages
  names = [s.strip() for s in (raw.split(",") if isinstance(raw, str) else raw) if s.strip()]
  if not names:
    raise ValueError("config.stages names no stage")
  for name in names:
    if name in RESERVED_KEYS:
      raise ValueError(f"stage name {name!r} collides with the reserved config key {name!r}")
    if name not in config:
      raise ValueError(f"unknown stage {name!r}: config has no block config.{name} "
                       f"(config.stages={raw!r})")
    stage = config[name]
    strategies.check_strategy(stage.get("strategy"), f"config.{name}.strategy")
    role = stage.get("model", "student" if stage.strategy != "pretrain" else "teacher")
    if role not in ROLES:
      raise ValueError(f"config.{name}.model={role!r} is not one of {list(ROLES)}")
    if stage.strategy in strategies.DISTILLATION_STRATEGIES and role != "student":
      raise ValueError(f"config.{name}: strategy {stage.strategy!r} trains the student, "
                       f"but model={role!r}")
    if int(stage.get("num_steps", 0)) < 1:
      raise ValueError(f"config.{name}.num_steps must be >= 1, got {stage.get('num_steps')!r}")
  return names


def stage_role(stage) -> str:
  return stage.get("model", "student" if stage.strategy != "pretrain" else "teacher")


def model_config(entry, where: str) -> ModelConfig:
  """A ModelConfig from a config block: optional `preset` (+ `tiny`) then field overrides."""
  values = dict(entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else entry)
  preset, tiny = values.pop("preset", None), values.pop("tiny", False)
  base = get_preset(preset, tiny_variant=tiny) if preset else ModelConfig()
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"{where}: unknown model config keys {unknown}; valid keys: {sorted(known)}")
  try:
    return base.replace(**values)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


# ----------------------------------------------------------------------------- arrays


def put_global(tree: Any, shardings: Any) -> Any:
  """Places host arrays (identical on every process) onto global shardings."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def to_host(tree: Any) -> Any:
  """Fully-replicated host copies of (possibly sharded, multi-host) arrays."""
  from jax.experimental import multihost_utils
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def state_shardings(boxed_state: Any, mesh, rules) -> Any:
  """NamedShardings for every leaf of a boxed abstract state (replicated where unannotated)."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_state), rules)
  shapes = nn.meta.unbox(boxed_state)
  return jax.tree.map(lambda x, spec: NamedSharding(mesh, sharding.fit_spec(x.shape, spec, mesh)),
                      shapes, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def all_finite(metrics: Mapping[str, Any]) -> str | None:
  """The first non-finite metric name, or None."""
  for key, value in metrics.items():
    if not np.all(np.isfinite(np.asarray(value))):
      return key
  return None


def copy_matching(dst: dict, src: Mapping, path: str = "") -> list[str]:
  """Copies subtrees of `src` into `dst` (in place) where structure and shapes match."""
  copied = []
  for key, value in src.items():
    if key not in dst:
      continue
    if isinstance(value, Mapping):
      if isinstance(dst[key], Mapping):
        sub = copy_matching(dst[key], value, f"{path}{key}/")
        copied += sub
    elif np.shape(dst[key]) == np.shape(value):
      dst[key] = np.asarray(value)
      copied.append(path + key)
  return copied


def state_layout(abstract_boxed_params: Any, tx: optax.GradientTransformation, rng: jax.Array,
                 mesh, rules) -> tuple[Any, Any, Any]:
  """How a TrainState of these (boxed, abstract) parameters lies on the mesh.

  Returns (init_state, shardings, abstract_state): `init_state(params, rng)` jitted onto the
  shardings (a fresh optimizer state at step 0), the NamedShardings of every state leaf, and
  ShapeDtypeStructs carrying them (what a checkpoint restores onto).
  """
  def init_state(params, key):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=key)

  abstract_boxed_state = jax.eval_shape(init_state, abstract_boxed_params, rng)
  shardings = state_shardings(abstract_boxed_state, mesh, rules)
  abstract_state = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      nn.meta.unbox(abstract_boxed_state), shardings)
  return jax.jit(init_state, out_shardings=shardings), shardings, abstract_state


def make_train_step(loss_fn, tx: optax.GradientTransformation, schedule, accum: int = 1):
  """The one training step: `train_step(state, context, batch) -> (state, metrics)`.

  `loss_fn(params, context, batch, rng, step) -> (loss, metrics)`; `context` is whatever the
  loss reads besides the trained parameters (the frozen teacher, a search's candidate paths).
  Metrics gain loss, grad_norm, param_norm and learning_rate. Jit it with the state donated.
  """
  def train_step(state: TrainState, context, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)

    def objective(params):
      return loss_fn(params, context, batch, step_rng, state.step)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # param_norm catches an update that made the weights non-finite before it is saved.
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params),
                   learning_rate=schedule(state.step // accum))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


# ----------------------------------------------------------------------------- the trainer


class _StopRequest:
  """Set by SIGTERM/SIGINT: the loop saves at the current step and returns."""

  def __init__(self):
    self.signal = None

  def __call__(self, signum, frame):
    self.signal = signum
    log.warning("received signal %d: saving a checkpoint at the current step, then exiting", signum)

  def agreed(self) -> bool:
    """Whether any process was signalled; every process calls this at every step, so all of
    them stop (and save collectively) at the same step even if their signals arrive apart."""
    local = self.signal is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(local, np.int32))))

  @contextlib.contextmanager
  def installed(self):
    previous = {}
    try:
      for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, self)
    except ValueError:  # not the main thread: signals stay with the caller
      pass
    try:
      yield self
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


class Trainer:
  """Runs `config.stages` in `workdir`; rerunning the same command resumes where it stopped."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir if "://" in workdir else os.path.abspath(workdir)
    self.names = stage_names(config)
    self.dtype = DTYPES[config.get("dtype", "float32")]
    self.rules = tuple(config.get("logical_rules", None) or sharding.LOGICAL_RULES)
    self.mesh = sharding.create_mesh(dict(config.get("mesh", {})))
    batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if int(config.data.batch_size) % batch_shards:
      raise ValueError(f"config.data.batch_size={config.data.batch_size} does not split over the "
                       f"mesh's data x fsdp = {batch_shards} devices (mesh "
                       f"{dict(self.mesh.shape)}): use a multiple of {batch_shards}")
    self.primary = jax.process_index() == 0
    self.writer = MetricsWriter(self.workdir, enabled=self.primary)
    self.stop = _StopRequest()
    self.model_configs = {
        "teacher": model_config(config.teacher, "config.teacher"),
        "student": model_config(config.student, "config.student"),
    }
    self.latest: dict[str, dict | None] = {"teacher": None, "student": None}
    self.heads = {"teacher": "pretraining", "student": "pretraining"}  # head of `latest`
    self.latest_aux: dict[str, dict] = {"teacher": {}, "student": {}}  # e.g. LSQ steps
    self._prepared_dir: str | None = None
    self._check_inputs()

  # -- checks before any compute ------------------------------------------------

  def _check_inputs(self) -> None:
    cfg = self.config
    teacher_ckpt = cfg.get("teacher_checkpoint", "")
    if teacher_ckpt:
      loaded, self.heads["teacher"], params = pretrained.read_checkpoint(teacher_ckpt)
      configured = self.model_configs["teacher"]
      size_fields = ("vocab_size", "embedding_size", "hidden_size", "intra_size", "num_layers",
                     "num_heads", "intermediate_size", "num_ffn", "attention_input")
      diff = {f: (getattr(loaded, f), getattr(configured, f)) for f in size_fields
              if getattr(loaded, f) != getattr(configured, f)}
      if diff and cfg.get("check_teacher_config", True):
        detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise ValueError(f"teacher checkpoint {teacher_ckpt} does not match config.teacher "
                         f"({detail})")
      self.latest["teacher"] = params
      self.model_configs["teacher"] = loaded
    downstream = [cfg[n].strategy for n in self.names if cfg[n].strategy in DOWNSTREAM_STRATEGIES]
    if downstream:
      self._load_downstream_init(downstream[0])
      if cfg.get("teacher_checkpoint", "") and any(s in GLUE_STRATEGIES for s in downstream):
        self._check_task_labels(self.model_configs["teacher"], "config.teacher_checkpoint")
    student_ckpt = cfg.get("student_checkpoint", "")
    if student_ckpt:  # the student's architecture is the checkpoint's (e.g. a NAS result)
      self.model_configs["student"], _, _ = pretrained.read_checkpoint(student_ckpt)
    teacher_trained = bool(teacher_ckpt)
    student_started = (self.latest["student"] is not None
                       or bool(cfg.get("student_checkpoint", "")))
    from mobilebert_jax.distill import etd
    for name in self.names:
      stage = cfg[name]
      etd.check_stage_options(  # init_from_teacher: ETD extraction of the student
          stage, f"config.{name}", self.model_configs["teacher"], self.model_configs["student"],
          role=stage_role(stage), has_teacher=teacher_trained, has_student=student_started,
          pretraining_data=stage.strategy not in DOWNSTREAM_STRATEGIES)
      student_started = student_started or stage_role(stage) == "student"
      if stage.strategy == "nas":
        if not teacher_trained:
          raise ValueError(f"stage {name!r} (nas) needs a teacher: run a 'pretrain' stage for "
                           "the teacher first or set config.teacher_checkpoint")
        from mobilebert_jax.search import nas
        nas.check_stage(name, stage, self.model_configs["student"],
                        self.model_configs["teacher"])
      if stage.strategy in strategies.DISTILLATION_STRATEGIES:
        if not teacher_trained:
          raise ValueError(f"stage {name!r} ({stage.strategy}) needs a teacher: run a "
                           "'pretrain' stage for the teacher first or set config.teacher_checkpoint")
        strategies.check_pair(self.model_configs["teacher"], self.model_configs["student"],
                              stage.strategy)
      if stage_role(stage) == "teacher":
        teacher_trained = True
      opt_cfg = ml_collections.ConfigDict(stage.optimizer.to_dict())
      opt_cfg.total_steps = int(stage.num_steps)
      try:
        optim.create_optimizer(opt_cfg)
      except ValueError as e:
        raise ValueError(f"config.{name}.optimizer: {e}") from e
    # Data: file existence, emptiness and vocabulary size, before any compilation.
    first = self.names[0]
    self.dataset_for(first, 0).check_vocab_size(
        self.model_configs[stage_role(cfg[first])].vocab_size)

  def _load_downstream_init(self, strategy: str) -> None:
    """The model to fine-tune from config.init_checkpoint (native or Hugging Face) with the
    strategy's head (a classifier sized for config.task's labels, or the span head); without a
    checkpoint, fine-tuning starts from config.student at random."""
    head = strategies.head_for(strategy)
    num_labels = None
    if strategy == "finetune":
      from mobilebert_jax.downstream import get_task
      num_labels = get_task(self.config.get("task", "")).num_labels
    init = self.config.get("init_checkpoint", "")
    if not init:
      if num_labels is not None:
        self.model_configs["student"] = self.model_configs["student"].replace(
            num_labels=num_labels)
      return
    model, params = pretrained.load_pretrained(init, head, num_labels=num_labels)
    self.model_configs["student"] = model.config
    self.latest["student"] = to_host(params)
    self.heads["student"] = head

  def augmenter(self, name: str):
    """TinyBERT's data augmentation for a task-distillation stage when config.augmentation is
    enabled: MLM candidates from `augmentation.mlm_checkpoint` (a pretrained, not fine-tuned,
    model) and nearest neighbours in its token embeddings; cached in the workdir."""
    aug = self.config.get("augmentation", None)
    if not aug or not aug.get("enabled", False) or \
        self.config[name].strategy not in ("task_intermediate", "task_prediction"):
      return None
    if not aug.get("mlm_checkpoint", ""):
      raise ValueError("config.augmentation.enabled needs config.augmentation.mlm_checkpoint, a "
                       "pretrained model with an MLM head (e.g. the general teacher)")
    from mobilebert_jax.downstream import augmentation
    mlm_model, mlm_params = pretrained.load_pretrained(aug.mlm_checkpoint, "masked_lm")
    cache = aug.get("cache", "") or os.path.join(
        self.workdir, f"augmented_{self.config.get('task', '')}.jsonl")

    def augment(examples, tokenizer):
      return augmentation.load_or_augment(
          cache, examples, tokenizer, augmentation.mlm_predict_fn(mlm_model, mlm_params),
          augmentation.token_embedding_table(mlm_params), p_t=float(aug.p_t),
          n_aug=int(aug.n_aug), k=int(aug.k), seed=int(self.config.get("seed", 0)),
          max_seq_length=int(self.config.data.max_seq_length), teacher=aug.mlm_checkpoint)
    return augment

  def _check_task_labels(self, model_cfg: ModelConfig, where: str) -> None:
    from mobilebert_jax.downstream import get_task
    task = get_task(self.config.get("task", ""))
    if self.heads["teacher"] == "classification" and model_cfg.num_labels != task.num_labels:
      raise ValueError(f"{where} classifies {model_cfg.num_labels} labels but task "
                       f"{task.name!r} has {task.num_labels}")

  def dataset_for(self, name: str, index: int):
    """The stage's training data: GLUE for `finetune`, BERT pretraining examples otherwise."""
    if self.config[name].strategy == "squad":
      from mobilebert_jax.downstream.finetune_data import SquadDataset
      sq, data = self.config.squad_data, self.config.data
      return SquadDataset(
          train_file=sq.train_file, dev_file=sq.dev_file, vocab_path=self.tokenizer_dir(),
          max_seq_length=int(data.max_seq_length), doc_stride=int(sq.doc_stride),
          max_query_length=int(sq.max_query_length), batch_size=int(data.batch_size),
          seed=int(data.get("seed", 0)) + index, process_index=jax.process_index(),
          process_count=jax.process_count())
    if self.config[name].strategy in GLUE_STRATEGIES:
      from mobilebert_jax.downstream.finetune_data import GlueDataset
      data = self.config.data
      return GlueDataset(
          self.config.get("task", ""), data_dir=self.config.get("data_dir", ""),
          tfds_data_dir=data.get("tfds_data_dir", "") or "", vocab_path=self.tokenizer_dir(),
          max_seq_length=int(data.max_seq_length), batch_size=int(data.batch_size),
          seed=int(data.get("seed", 0)) + index, process_index=jax.process_index(),
          process_count=jax.process_count(), augment=self.augmenter(name))
    data = dict(self.config.data.to_dict(), prepared_dir=self.prepared_data_dir())
    data["seed"] = int(data.get("seed", 0)) + index  # each stage its own order and masks
    return PretrainingDataset(data, process_index=jax.process_index(),
                              process_count=jax.process_count())

  def prepared_data_dir(self) -> str:
    """The prepared pretraining data: config.data.prepared_dir, or the configured corpus
    prepared once into the workdir (`data.cache_dir`, default `workdir/prepared_data/`) and
    reused by every stage and rerun. Process 0 prepares first; the others then reuse its
    directory on a shared filesystem, or prepare the same one locally."""
    if self._prepared_dir is None:
      cfg = DataConfig.from_any(self.config.data)
      cache = os.path.join(self.workdir, PREPARED_DATA_DIR)
      if jax.process_count() > 1 and not cfg.prepared_dir:
        from jax.experimental import multihost_utils
        path = ensure_prepared(cfg, cache) if self.primary else None
        multihost_utils.sync_global_devices("mobilebert_jax: data prepared")
        self._prepared_dir = path or ensure_prepared(cfg, cache)
      else:
        self._prepared_dir = ensure_prepared(cfg, cache)
    return self._prepared_dir

  # -- stages -------------------------------------------------------------------

  def run(self) -> dict[str, str]:
    """Runs every stage; returns {role: directory of its final model}."""
    if self.primary:
      self.writer.write_config(self.config)
    outputs = {}
    with self.stop.installed(), contextlib.closing(self.writer):
      for index, name in enumerate(self.names):
        role = stage_role(self.config[name])
        if not self.run_stage(name, index):
          log.warning("stopped during stage %r; rerun the same command to resume", name)
          return outputs
        if self.config[name].strategy == "nas":
          from mobilebert_jax.search.nas import ARCHITECTURES_FILE
          outputs["architectures"] = os.path.join(self.workdir, ARCHITECTURES_FILE)
        else:
          outputs[role] = self.export_role(role, name)
    return outputs

  def export_role(self, role: str, stage: str) -> str:
    path = os.path.join(self.workdir, role)
    pretrained.save_pretrained(path, self.model_configs[role], self.latest[role],
                               self.heads[role], tokenizer_dir=self.tokenizer_dir(),
                               extra={"stage": stage})
    return path

  def tokenizer_dir(self) -> str:
    """Where the tokenizer comes from: data.vocab_path, the init checkpoint, or the shipped one."""
    vocab = self.config.data.get("vocab_path") or ""
    init = self.config.get("init_checkpoint", "")
    if not vocab and init and os.path.exists(os.path.join(init, "vocab.txt")):
      vocab = init
    if not vocab:
      from mobilebert_jax.data import sample_vocab_path
      vocab = str(sample_vocab_path())
    return vocab if os.path.isdir(vocab) else os.path.dirname(vocab)

  def build_stage(self, name: str, index: int) -> "CompiledStage":
    """Models, strategy, optimizer, shardings and the jitted train step of one stage.

    The teacher (for distillation strategies) is the latest trained or loaded one and is placed
    on the mesh here. Nothing is initialised or compiled yet: `init_state` and `step_fn` are
    jitted functions (compiled on first call)."""
    stage = self.config[name]
    role = stage_role(stage)
    mesh, rules = self.mesh, self.rules
    model_cfg = self.model_configs[role]
    head = strategies.head_for(stage.strategy)
    model = build_model(model_cfg, head, dtype=self.dtype)
    teacher_model = teacher_params = None
    if stage.strategy in strategies.DISTILLATION_STRATEGIES:
      teacher_cfg = self.model_configs["teacher"]
      teacher_head = strategies.teacher_head_for(stage.strategy)
      teacher_model = build_model(teacher_cfg, teacher_head, dtype=self.dtype)
      teacher_boxed = jax.eval_shape(lambda: pretrained.init_params(
          teacher_model, teacher_cfg, jax.random.PRNGKey(0), boxed=True))
      host_teacher = self.latest["teacher"]
      if self.heads["teacher"] != teacher_head:
        if teacher_head != "pretraining":
          raise ValueError(f"stage {name!r} ({stage.strategy}) needs a teacher with a "
                           f"{teacher_head!r} head (a fine-tuned model), but the teacher is a "
                           f"{self.heads['teacher']!r} model")
        host_teacher = pretrained.adapt_params(host_teacher, self.heads["teacher"], teacher_head,
                                               teacher_cfg)
      teacher_params = put_global(host_teacher,
                                  sharding.param_shardings(teacher_boxed, mesh, rules))
    strategy = strategies.build_strategy(stage, model, teacher_model)
    rng = jax.random.PRNGKey(int(self.config.get("seed", 0)) + 1000 * index)

    def boxed_params(key):
      model_key, aux_key = jax.random.split(key)
      return {"model": pretrained.init_params(model, model_cfg, model_key, boxed=True),
              "aux": strategy.aux_init(aux_key)}

    abstract_boxed_params = jax.eval_shape(boxed_params, rng)
    params_shape = nn.meta.unbox(abstract_boxed_params)
    opt_cfg = ml_collections.ConfigDict(stage.optimizer.to_dict())
    opt_cfg.total_steps = int(stage.num_steps)
    multiplier_fn = None
    if strategy.multipliers is not None:
      multiplier_fn = lambda step: strategy.multipliers(step, params_shape)
    tx, schedule = optim.create_optimizer(opt_cfg, multiplier_fn)
    accum = int(opt_cfg.get("grad_accum_steps", 1))

    init_state, shardings, abstract_state = state_layout(abstract_boxed_params, tx, rng, mesh,
                                                         rules)
    batch_sh = sharding.batch_sharding(mesh)

    train_step = make_train_step(strategy.loss_fn, tx, schedule, accum)
    teacher_sh = (jax.tree.map(lambda x: x.sharding, teacher_params)
                  if teacher_params is not None else None)
    return CompiledStage(
        name=name, stage=stage, role=role, head=head, model=model, model_config=model_cfg,
        strategy=strategy, rng=rng, shardings=shardings, abstract_state=abstract_state,
        batch_sharding=batch_sh, teacher_params=teacher_params,
        init_state=init_state,
        step_fn=jax.jit(train_step, in_shardings=(shardings, teacher_sh, batch_sh),
                        out_shardings=(shardings, None), donate_argnums=(0,)))

  def run_stage(self, name: str, index: int) -> bool:
    """Trains one stage to its end (True) or until a stop signal (False)."""
    stage = self.config[name]
    if stage.strategy == "nas":
      from mobilebert_jax.search.nas import run_nas_stage
      return run_nas_stage(self, name, index)
    role = stage_role(stage)
    final_dir = os.path.join(self.workdir, name, "final")
    if pretrained.is_native_dir(final_dir):
      log.info("stage %r already finished; loading %s", name, final_dir)
      _, self.heads[role], self.latest[role] = pretrained.read_checkpoint(final_dir)
      return True

    cs = self.build_stage(name, index)
    dataset = self.dataset_for(name, index)
    dataset.check_vocab_size(cs.model_config.vocab_size)
    if dataset.vocab_size < cs.model_config.vocab_size:
      log.warning("stage %r: the tokenizer %s has %d tokens but the %s has vocab_size %d; set "
                  "config.data.vocab_path to the model's vocab if this is not intended", name,
                  dataset.vocab_path, dataset.vocab_size, role, cs.model_config.vocab_size)
    checkpointer = Checkpointer(
        os.path.join(self.workdir, name, "checkpoints"),
        save_every_steps=int(self.config.checkpoint.save_every_steps),
        keep=int(self.config.checkpoint.get("keep", 3)),
        async_save=bool(self.config.checkpoint.get("async_save", True)))

    if checkpointer.latest_step() is not None:
      state, extra = checkpointer.restore(cs.abstract_state)
      dataset.restore(extra["data"])
      log.info("stage %r: resumed from step %d", name, int(state.step))
    else:
      params = self.initial_params(name, stage, role, cs.model, cs.model_config, cs.strategy,
                                   cs.rng, dataset=dataset)
      if cs.strategy.aux_from is not None:  # e.g. LSQ steps from the real weights and data
        sample = {k: v[:dataset.local_batch_size] for k, v in dataset.arrays.items()}
        params["aux"] = jax.tree.map(np.asarray, cs.strategy.aux_from(params["model"], sample))
      state = cs.init_state(put_global(params, cs.shardings.params), cs.rng)

    try:
      finished = self.loop(cs, state, dataset, checkpointer)
    finally:
      checkpointer.close()
    if finished and stage.strategy in EVALUATED_STRATEGIES:
      from mobilebert_jax.downstream import evaluation
      if stage.strategy == "kdlsq":
        evaluation.evaluate_lsq(cs, self.latest[role], self.latest_aux[role]["lsq_steps"],
                                dataset, os.path.join(self.workdir, name, "final"),
                                self.workdir, self.writer)
      elif stage.strategy in GLUE_STRATEGIES:
        evaluation.evaluate_glue(cs, self.latest[role], dataset, self.workdir, self.writer)
        teacher = None  # loyalty needs a classifier teacher (task distillation, or any pair)
        if self.latest["teacher"] is not None and self.heads["teacher"] == "classification":
          teacher_model = build_model(self.model_configs["teacher"], "classification")
          teacher = (teacher_model, self.latest["teacher"])
        evaluation.evaluate_teacher_student(cs, self.latest[role], dataset, self.workdir,
                                            teacher=teacher,
                                            attack_config=self.config.get("robustness", None))
        quant = self.config.get("quantization", None)
        if quant is not None and quant.get("ptq_eval", False):
          evaluation.evaluate_ptq(cs, self.latest[role], dataset, self.workdir, self.writer,
                                  quant)
      else:
        sq = self.config.squad_data
        evaluation.evaluate_squad(
            cs, self.latest[role], dataset, self.workdir, self.writer,
            version_2=bool(sq.version_2), n_best=int(sq.n_best),
            max_answer_length=int(sq.max_answer_length), null_threshold=float(sq.null_threshold))
    return finished

  def loop(self, cs: "CompiledStage", state, dataset, checkpointer) -> bool:
    """Trains the stage (`train_steps`) and saves its final model; False if it was stopped."""
    name, stage, role = cs.name, cs.stage, cs.role
    state = self.train_steps(name, int(stage.num_steps), cs.step_fn, state, dataset,
                             checkpointer, cs.batch_sharding, context=lambda: cs.teacher_params)
    if state is None:
      return False
    self.latest[role] = to_host(state.params["model"])
    self.latest_aux[role] = to_host(state.params["aux"])
    self.heads[role] = cs.head
    pretrained.save_pretrained(os.path.join(self.workdir, name, "final"),
                               self.model_configs[role], self.latest[role], cs.head,
                               tokenizer_dir=self.tokenizer_dir(),
                               extra={"stage": name, "strategy": stage.strategy})
    return True

  def train_steps(self, name: str, num_steps: int, step_fn, state, dataset, checkpointer,
                  batch_sh, *, context, after_step=None, extra=None):
    """Feeds batches to `step_fn(state, context(), batch)` up to `num_steps`, logging and
    checkpointing (with the data position) on the way; returns the final state, or None when a
    stop signal ended the run (after saving a checkpoint to resume from).

    `after_step(done, state)` runs after every step, before any checkpoint of that step (a
    search prunes its candidates there); `extra()` adds JSON values to every checkpoint.
    """
    log_every = int(self.config.get("log_every_steps", 50))
    tokens_per_step = dataset.global_batch_size * int(self.config.data.max_seq_length)
    pending: list[tuple[int, Any]] = []
    start = int(state.step)
    throughput = Throughput(start_step=start)
    prefetcher = prefetch_to_device(dataset, size=2, sharding=batch_sh)

    def check_pending() -> dict | None:
      last = None
      for step, metrics in pending:
        host = jax.device_get(metrics)
        bad = all_finite(host)
        if bad is not None:
          raise TrainingDivergedError(
              f"stage {name!r}: loss term {bad!r} is {float(np.asarray(host[bad]))} at step "
              f"{step}; stopping without saving (the last good checkpoint is kept in "
              f"{os.path.join(self.workdir, name, 'checkpoints')})")
        last = (step, host)
      pending.clear()
      return last

    def save(step, force=False):
      values = dict(extra() if extra is not None else {}, data=prefetcher.state(), stage=name)
      checkpointer.save(step, state, values, force=force)

    try:
      for step in range(start, num_steps):
        batch = next(prefetcher)
        state, metrics = step_fn(state, context(), batch)
        pending.append((step + 1, metrics))
        done = step + 1
        if after_step is not None:
          after_step(done, state)
        stopping = self.stop.agreed()
        if done % log_every == 0 or done == num_steps or stopping:
          last = check_pending()
          if last is not None:
            scalars = {k: float(np.asarray(v)) for k, v in last[1].items()}
            scalars.update(throughput.update(done, tokens_per_step), total_steps=num_steps)
            self.writer.write(done, scalars, stage=name)
        if checkpointer.should_save(done) or stopping:
          check_pending()
          save(done, force=stopping)
        if stopping and done < num_steps:
          checkpointer.wait_until_finished()
          return None
      check_pending()
      save(num_steps, force=True)
      checkpointer.wait_until_finished()
    finally:
      prefetcher.close()
      if hasattr(dataset, "close"):  # stops grain's worker processes
        dataset.close()
      self.writer.flush()
    return state

  def initial_params(self, name, stage, role, model, model_cfg, strategy, rng,
                     dataset=None) -> dict:
    """Parameters a stage starts from: the role's latest model, a checkpoint, a sub-network of
    the teacher (`init_from_teacher`: ETD, first-order importance on the first
    `etd_num_batches` global batches of `dataset`), or a fresh init (for students, with
    embeddings and heads copied from the teacher where shapes match)."""
    model_key, aux_key = jax.random.split(rng)
    params = {"model": None, "aux": jax.tree.map(np.asarray, strategy.aux_init(aux_key))}
    if self.latest[role] is not None:
      params["model"] = self.latest[role]
      head = strategies.head_for(stage.strategy)
      if self.heads[role] != head:  # e.g. fine-tuning the student a PD stage just trained
        params["model"] = pretrained.adapt_params(self.latest[role], self.heads[role], head,
                                                  model_cfg, seed=int(self.config.get("seed", 0)))
      log.info("stage %r: starting from the %s trained so far", name, role)
      return params
    ckpt = self.config.get(f"{role}_checkpoint", "")
    if ckpt:
      _, params["model"] = pretrained.load_pretrained(ckpt, "pretraining")
      params["model"] = to_host(params["model"])
      return params
    method = stage.get("init_from_teacher", "")
    if role == "student" and method:
      from mobilebert_jax.distill import etd
      importance = stage.get("etd_importance", "first_order")
      batches = None
      if method == "etd_impt" and importance == "first_order":
        count = min(int(stage.get("etd_num_batches", etd.DEFAULT_NUM_BATCHES)),
                    dataset.batches_per_epoch)
        batches = (dataset.get_global_batch(0, i) for i in range(count))  # same on every process
      params["model"] = etd.init_student_from_teacher(
          method, self.model_configs["teacher"], self.latest["teacher"], model_cfg,
          student_head=strategies.head_for(stage.strategy), batches=batches,
          importance=importance, layer_mapping=stage.get("etd_layer_mapping", "uniform"),
          seed=int(self.config.get("seed", 0)), where=f"stage {name!r}")
      return params
    fresh = jax.tree.map(np.asarray, pretrained.init_params(model, model_cfg, model_key))
    if role == "student" and stage.get("copy_from_teacher", True) and \
        self.latest["teacher"] is not None:
      teacher = self.latest["teacher"]
      copied = []
      for top in ("mlm", "nsp"):
        if top in teacher and top in fresh:
          copied += copy_matching(fresh[top], teacher[top], f"{top}/")
      for sub in ("embeddings", "pooler"):
        if sub in teacher["backbone"] and sub in fresh["backbone"]:
          copied += copy_matching(fresh["backbone"][sub], teacher["backbone"][sub],
                                  f"backbone/{sub}/")
      log.info("stage %r: copied %d tensors (embeddings and heads) from the teacher", name,
               len(copied))
    params["model"] = fresh
    return params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Entry point used by `main`: runs every stage of `config` in `workdir`."""
  return Trainer(config, workdir).run()
