"""The stage runner: `plan` the config, then run its stages in order on the training core.

Each stage is `config.<stage name>` with a `strategy` from the stage registry
(`mobilebert_jax.stages.registry`), the model it trains (`teacher` or `student`), its length
(`num_steps`, or `num_epochs` on task data) and an `optimizer` block. The runner knows no
strategy by name: the registry entry says which heads, teacher and data a stage needs, its loss,
hooks, evaluator and exports. Workdir layout:

  workdir/config.json, metrics.jsonl, eval_results.json, tensorboard/
  workdir/<stage>/checkpoints/<step>/   orbax checkpoints (state + data position), for resuming
  workdir/<stage>/final/                the stage's trained model (native, `load_pretrained`)
  workdir/teacher/, workdir/student/    the last trained teacher / student
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from mobilebert_jax import model_files, pretrained
from mobilebert_jax.data import DataConfig, PretrainingDataset, ensure_prepared, sample_vocab_path
from mobilebert_jax.distill import etd
from mobilebert_jax.downstream import augmentation, get_task
from mobilebert_jax.downstream.finetune_data import GlueDataset, SquadDataset, TaggingDataset
from mobilebert_jax.models import build_model, num_params, to_canonical_layout, to_model_layout
from mobilebert_jax.parallel import sharding
from mobilebert_jax.stages.planner import (Plan, PlannedStage, optimizer_config, plan,
                                           with_execution_fields,
                                           stage_length)
from mobilebert_jax.training import core, goodput, operations
from mobilebert_jax.training import optimizer as optim
from mobilebert_jax.training.context import (EvalContext, Evaluation, LossContext, RoleState,
                                             StageEnv)
from mobilebert_jax.training.metrics import CONFIG_FILE, MetricsWriter, flatten_config

log = logging.getLogger("mobilebert_jax")
PREPARED_DATA_DIR = "prepared_data"
RESULTS_FILE = "eval_results.json"
# The training-cost entries `training_cost` adds to a stage's evaluation (`<stage><suffix>`).
TRAINING_COST_KEYS = ("_num_params", "_train_steps", "_train_flops")
# Keys that change how a run is operated, not what it trains: a rerun may change them freely.
OPERATIONAL_KEYS = ("allow_config_change", "log_every_steps", "checkpoint.", "data.num_workers",
                    "data.worker_buffer_size", "data.prepare_workers", "mesh.", "logical_rules",
                    "compilation_cache_dir", "peak_tflops", "profile")


def profile_steps(value: str, stage: str) -> tuple[int, int] | None:
  """The steps [start, stop) of `stage` that `config.profile` ("START:STOP" or
  "STAGE:START:STOP", "" = none) asks to trace; raises naming the value if malformed."""
  if not value:
    return None
  parts = str(value).split(":")
  if len(parts) == 3:
    if parts[0] != stage:
      return None
    parts = parts[1:]
  try:
    start, stop = (int(p) for p in parts)
  except ValueError:
    start = stop = -1
  if len(parts) != 2 or not 0 <= start < stop:
    raise ValueError(f"config.profile={value!r}: expected START:STOP or STAGE:START:STOP with "
                     "0 <= START < STOP")
  return start, stop


class ConfigChangedError(ValueError):
  """The workdir holds a run of another config."""


def config_diff(old: dict, new: dict) -> list[str]:
  """`key: old -> new` for every training-relevant key that differs."""
  a, b = flatten_config(old), flatten_config(new)
  lines = []
  for key in sorted(set(a) | set(b)):
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in OPERATIONAL_KEYS):
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return lines


class Trainer:
  """Runs `config.stages` in `workdir`; rerunning the same command resumes where it stopped."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.plan: Plan = plan(config)
    self.config = self.plan.config
    self.workdir = workdir if "://" in workdir else os.path.abspath(workdir)
    operations.use_compilation_cache(self.config.compilation_cache_dir, self.workdir)
    profile_steps(self.config.profile, "")  # a malformed value fails before any compute
    self.mesh, self.rules, self.dtype = self.plan.mesh, self.plan.rules, self.plan.dtype
    self.primary = jax.process_index() == 0
    self.writer = MetricsWriter(self.workdir, enabled=self.primary)
    self.stop = core.StopRequest()
    self.stopped = False  # a stop signal ended `run` early (`stop.report()` says where)
    self.roles = {role: RoleState(cfg) for role, cfg in self.plan.model_configs.items()}
    # What each role's model went through, for its metadata and model card: the stages that
    # trained it ({name, strategy, steps}), their dev metrics and its label names.
    self.lineage = {role: {"stages": [], "metrics": {}, "labels": None} for role in self.roles}
    self._prepared_dir: str | None = None
    self._load_checkpoints()
    first = self.plan.stages[0]  # data: files, emptiness and vocabulary, before any compile
    if first.spec.run is None:
      self.dataset_for(first).check_vocab_size(self.roles[first.role].config.vocab_size)

  # -- checkpoints the plan names (weights read here, after the plan) ------------

  def _load_checkpoints(self) -> None:
    cfg = self.config
    if cfg.teacher_checkpoint:
      config, head, params = pretrained.read_checkpoint(cfg.teacher_checkpoint)
      config = with_execution_fields(config, self.plan.model_configs["teacher"])
      self.roles["teacher"] = RoleState(config, head, params)
      if any(s.spec.data == "glue" for s in self.plan.stages) and head == "classification":
        task = get_task(cfg.task)
        if config.num_labels != task.num_labels:
          raise ValueError(f"config.teacher_checkpoint classifies {config.num_labels} labels "
                           f"but task {task.name!r} has {task.num_labels}")
    downstream = [s for s in self.plan.stages if s.spec.downstream]
    if downstream and cfg.init_checkpoint:
      spec = downstream[0].spec
      num_labels = get_task(cfg.task).num_labels if spec.name == "finetune" else None
      model, params = pretrained.load_pretrained(cfg.init_checkpoint, spec.head,
                                                 num_labels=num_labels)
      student = with_execution_fields(model.config, self.plan.model_configs["student"])
      self.roles["student"] = RoleState(
          student, spec.head, to_canonical_layout(core.to_host(params), model.config))

  # -- data ---------------------------------------------------------------------

  def tokenizer_dir(self) -> str:
    """Where the tokenizer comes from: data.vocab_path, the init checkpoint, or the shipped one."""
    vocab = self.config.data.vocab_path
    init = self.config.init_checkpoint
    if not vocab and init and epath.Path(init, "vocab.txt").exists():
      vocab = init
    if not vocab:
      vocab = str(sample_vocab_path())
    return vocab if epath.Path(vocab).is_dir() else os.path.dirname(vocab)

  def dataset_for(self, planned: PlannedStage, seed_offset: int = 0):
    """The stage's training data: GLUE, SQuAD, CoNLL tagging, or BERT pretraining examples
    (each stage its own order and masks)."""
    data, kind = self.config.data, planned.spec.data
    seed = int(data.seed) + planned.index + seed_offset
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if kind == "squad":
      sq = self.config.squad_data
      return SquadDataset(
          train_file=sq.train_file, dev_file=sq.dev_file, vocab_path=self.tokenizer_dir(),
          max_seq_length=int(data.max_seq_length), doc_stride=int(sq.doc_stride),
          max_query_length=int(sq.max_query_length), batch_size=int(data.batch_size),
          seed=seed, **where)
    if kind == "tagging":
      tg = self.config.tagging_data
      return TaggingDataset(
          train_file=tg.train_file, dev_file=tg.dev_file, vocab_path=self.tokenizer_dir(),
          max_seq_length=int(data.max_seq_length), batch_size=int(data.batch_size),
          tag_column=int(tg.tag_column), scheme=tg.scheme, seed=seed, **where)
    if kind == "glue":
      return GlueDataset(
          self.config.task, data_dir=self.config.data_dir, tfds_data_dir=data.tfds_data_dir,
          vocab_path=self.tokenizer_dir(), max_seq_length=int(data.max_seq_length),
          batch_size=int(data.batch_size), seed=seed, augment=self.augmenter(planned), **where)
    values = dict(data.to_dict(), prepared_dir=self.prepared_data_dir(), seed=seed)
    return PretrainingDataset(values, **where)

  def augmenter(self, planned: PlannedStage):
    """TinyBERT's data augmentation for a task-distillation stage when config.augmentation is
    enabled: MLM candidates from `augmentation.mlm_checkpoint` (a pretrained, not fine-tuned,
    model) and nearest neighbours in its token embeddings; cached in the workdir."""
    aug = self.config.augmentation
    if not aug.enabled or not planned.spec.needs_teacher:
      return None
    if not aug.mlm_checkpoint:
      raise ValueError("config.augmentation.enabled needs config.augmentation.mlm_checkpoint, a "
                       "pretrained model with an MLM head (e.g. the general teacher)")
    mlm_model, mlm_params = pretrained.load_pretrained(aug.mlm_checkpoint, "masked_lm")
    cache = aug.cache or os.path.join(self.workdir, f"augmented_{self.config.task}.jsonl")

    def augment(examples, tokenizer):
      return augmentation.load_or_augment(
          cache, examples, tokenizer, augmentation.mlm_predict_fn(mlm_model, mlm_params),
          augmentation.token_embedding_table(mlm_params), p_t=float(aug.p_t),
          n_aug=int(aug.n_aug) or None, task=self.config.task, k=int(aug.k),
          seed=int(self.config.seed), teacher=aug.mlm_checkpoint)
    return augment

  def prepared_data_dir(self) -> str:
    """The prepared pretraining data: config.data.prepared_dir, or the configured corpus
    prepared once into the workdir (`data.cache_dir`, default `workdir/prepared_data/`) and
    reused by every stage and rerun. Process 0 prepares first; the others then reuse its
    directory on a shared filesystem, or prepare the same one locally."""
    if self._prepared_dir is None:
      cfg = DataConfig.from_any(self.config.data)
      cache = os.path.join(self.workdir, PREPARED_DATA_DIR)
      if jax.process_count() > 1 and not cfg.prepared_dir:
        path = ensure_prepared(cfg, cache) if self.primary else None
        multihost_utils.sync_global_devices("mobilebert_jax: data prepared")
        self._prepared_dir = path or ensure_prepared(cfg, cache)
      else:
        self._prepared_dir = ensure_prepared(cfg, cache)
    return self._prepared_dir

  # -- the run ------------------------------------------------------------------

  def check_workdir(self) -> None:
    """Refuses a workdir that holds a run of a different config (unless
    config.allow_config_change), with the changed keys; records the config otherwise."""
    stored_path = epath.Path(self.workdir, CONFIG_FILE)
    new = json.loads(self.config.to_json_best_effort())
    started = any(epath.Path(self.workdir, s.name).exists() for s in self.plan.stages)
    if stored_path.exists() and started:
      old = json.loads(stored_path.read_text())
      changed = config_diff(old, new)
      if changed and not self.config.allow_config_change:
        raise ConfigChangedError(
            f"{self.workdir} holds a run of another config ({len(changed)} key(s) changed: "
            f"{'; '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}); use a fresh "
            "--workdir, or pass --config.allow_config_change=True to go on with the new config")
      if changed and self.primary:
        previous = len(list(epath.Path(self.workdir).glob("config.*.json")))
        history = epath.Path(self.workdir, f"config.{previous}.json")
        history.write_text(stored_path.read_text())
        log.warning("config changed (%s); the previous config is kept in %s", "; ".join(changed),
                    history)
    if self.primary:
      self.writer.write_config(self.config)
      operations.record_environment(self.workdir)

  def run(self) -> dict[str, str]:
    """Runs every stage; returns {role: directory of its final model} (and "architectures").

    Holds the workdir's lock throughout (`WorkdirLockedError` when another run has it). A stop
    signal ends the run at the next step, or before the next stage is built, with
    `self.stopped` set and `self.stop.report()` naming the checkpoint to resume from.
    """
    outputs = {}
    self.stopped = False
    with operations.workdir_lock(self.workdir), self.stop.installed(), \
        contextlib.closing(self.writer):
      self.check_workdir()
      for planned in self.plan.stages:
        if self.stop.agreed():  # the next stage is neither built nor compiled
          self.stop.saved = (planned.name, None, None)
          self.stopped = True
          log.warning("stopped before stage %r; rerun the same command to resume", planned.name)
          return outputs
        self.log_header(planned)
        if not self.run_stage(planned):
          self.stopped = True
          log.warning("stopped during stage %r; rerun the same command to resume", planned.name)
          return outputs
        exports = planned.spec.exports
        if exports == "model":
          outputs[planned.role] = self.export_role(planned)
        else:  # what the stage wrote itself, under its name without an extension
          key = os.path.splitext(os.path.basename(exports.format(stage=planned.name)))[0]
          outputs[planned.name if key == "final" else key] = os.path.join(
              self.workdir, exports.format(stage=planned.name))
    return outputs

  def log_header(self, planned: PlannedStage) -> None:
    spec, stage = planned.spec, planned.stage
    length = (f"{stage.num_steps} steps" if stage.num_steps
              else f"{stage.num_epochs:g} epochs")
    teacher = f", teacher head {spec.teacher_head}" if spec.needs_teacher else ""
    trains = (f"trains the {planned.role} ({spec.head} head)" if spec.exports == "model"
              else f"runs its own loop (writes {spec.exports.format(stage=planned.name)})")
    log.info("=== stage %d/%d %r: strategy %s %s on %s data, %s%s ===", planned.index + 1,
             len(self.plan.stages), planned.name, spec.name, trains, spec.data, length, teacher)

  def export_role(self, planned: PlannedStage) -> str:
    path = os.path.join(self.workdir, planned.role)
    self.save_model(path, planned.role, planned.name)
    return path

  def save_model(self, path: str, role: str, stage: str, **extra) -> None:
    """Writes `role`'s latest model as a native directory, with its lineage (stages, dev
    metrics, label names) in the metadata and model card."""
    state, lineage = self.roles[role], self.lineage[role]
    pretrained.save_pretrained(
        path, state.config, state.params, state.head, tokenizer_dir=self.tokenizer_dir(),
        extra={"stage": stage, "stages": lineage["stages"], "metrics": lineage["metrics"],
               **extra},
        labels=lineage["labels"] if state.head in pretrained.LABELLED_HEADS else None)

  def stage_env(self, planned: PlannedStage) -> StageEnv:
    return StageEnv(
        name=planned.name, index=planned.index, stage=planned.stage, config=self.config,
        workdir=self.workdir, mesh=self.mesh, rules=self.rules,
        batch_sharding=sharding.batch_sharding(self.mesh), teacher=self.roles["teacher"],
        student=self.roles["student"], writer=self.writer,
        dataset=functools.partial(self.dataset_for, planned), train=self.train_loop,
        tokenizer_dir=self.tokenizer_dir(), primary=self.primary,
        write_evaluation=functools.partial(self.write_evaluation, planned))

  def train_loop(self, name, num_steps, step_fn, state, dataset, checkpointer, batch_sharding,
                 **kwargs):
    """`core.train_loop` with this run's writer, stop signal, logging interval, device peak
    (for MFU, with `flops_per_step` from the caller) and profiled steps."""
    profile = profile_steps(self.config.profile, name)
    return core.train_loop(
        name, num_steps, step_fn, state, dataset, checkpointer, batch_sharding,
        writer=self.writer, stop=self.stop, log_every=int(self.config.log_every_steps),
        tokens_per_step=dataset.global_batch_size * int(self.config.data.max_seq_length),
        peak_tflops=goodput.peak_tflops(self.mesh.devices.flat[0],
                                        float(self.config.peak_tflops)),
        num_devices=int(self.mesh.size), profile=profile,
        profile_dir=os.path.join(self.workdir, name) if profile else None, **kwargs)

  def run_stage(self, planned: PlannedStage) -> bool:
    """Trains one stage to its end (True) or until a stop signal (False)."""
    if planned.spec.run is not None:
      return planned.spec.run(self.stage_env(planned))
    name, role, spec = planned.name, planned.role, planned.spec
    final_dir = os.path.join(self.workdir, name, "final")
    if pretrained.is_native_dir(final_dir):
      log.info("stage %r already finished; loading %s", name, final_dir)
      config, head, params = pretrained.read_checkpoint(final_dir)
      self.roles[role] = RoleState(config, head, params)
      meta = pretrained.read_native_meta(final_dir)
      self.lineage[role] = {"stages": meta.get("stages", []), "metrics": meta.get("metrics", {}),
                            "labels": (model_files.label_names(meta, config.num_labels)
                                       if "id2label" in meta else None)}
      return True

    dataset = self.dataset_for(planned)
    model_cfg = self.roles[role].config
    labels = getattr(dataset, "num_labels", None)
    if spec.data == "tagging" and model_cfg.num_labels != labels:  # the training file's tags
      model_cfg = model_cfg.replace(num_labels=labels)
      latest = self.roles[role]
      params = latest.params
      if params is not None and latest.head == spec.head:  # a classifier for other tags
        params = pretrained.adapt_params(params, latest.head, spec.head, model_cfg,
                                         seed=int(self.config.seed))
      self.roles[role] = RoleState(model_cfg, latest.head, params, latest.aux)
    dataset.check_vocab_size(model_cfg.vocab_size)
    if dataset.vocab_size < model_cfg.vocab_size:
      log.warning("stage %r: the tokenizer %s has %d tokens but the %s has vocab_size %d; set "
                  "config.data.vocab_path to the model's vocab if this is not intended", name,
                  dataset.vocab_path, dataset.vocab_size, role, model_cfg.vocab_size)
    stage = ml_collections.ConfigDict(planned.stage.to_dict())
    stage.num_steps = stage_length(stage, dataset.batches_per_epoch)
    if not planned.stage.num_steps:
      log.info("stage %r: %g epochs of %d batches = %d steps", name, float(stage.num_epochs),
               dataset.batches_per_epoch, stage.num_steps)
    built = self.build_stage(planned, stage)
    checkpointer = core.open_checkpointer(os.path.join(self.workdir, name, "checkpoints"),
                                          self.config.checkpoint)
    if checkpointer.latest_step() is not None:
      state, extra = checkpointer.restore(built.abstract_state)
      dataset.restore(extra["data"])
      log.info("stage %r: resumed from step %d", name, int(state.step))
    else:
      params = self.initial_params(planned, built, dataset)
      params["model"] = to_model_layout(params["model"], model_cfg)
      state = built.init_state(core.put_global(params, built.shardings.params), built.rng)

    masked = (int(self.config.data.max_predictions_per_seq)
              if spec.head in ("pretraining", "masked_lm") else 0)
    flops = goodput.train_step_flops(
        (model_cfg, built.abstract_state.params["model"]),
        (self.roles["teacher"].config, built.teacher_params) if built.teacher_params else None,
        batch=dataset.global_batch_size, length=int(self.config.data.max_seq_length),
        masked_per_sequence=masked)
    try:
      state = self.train_loop(name, int(stage.num_steps), built.step_fn, state, dataset,
                              checkpointer, built.batch_sharding, flops_per_step=flops,
                              context=lambda: built.teacher_params,
                              after_step=(functools.partial(spec.after_step, built.ctx)
                                          if spec.after_step else None))
    finally:
      checkpointer.close()
    if state is None:
      return False
    trained = RoleState(model_cfg, spec.head,
                        to_canonical_layout(core.to_host(state.params["model"]), model_cfg),
                        core.to_host(state.params["aux"]))
    self.roles[role] = trained
    lineage = self.lineage[role]
    lineage["stages"] = lineage["stages"] + [
        {"name": name, "strategy": spec.name, "steps": int(stage.num_steps)}]
    if getattr(dataset, "label_names", None) is not None:
      lineage["labels"] = list(dataset.label_names)
    if spec.evaluate is not None:  # before the final model: a stage is done once evaluated
      result = spec.evaluate(EvalContext(
          stage=stage, config=self.config, model=built.ctx.model, params=trained.params,
          aux=trained.aux, dataset=dataset, teacher=self.roles["teacher"],
          predict=functools.partial(self.predictor, built)))
      result.metrics.update(self.training_cost(planned, built, dataset, int(stage.num_steps),
                                               trained.params))
      self.write_evaluation(planned, int(stage.num_steps), result)
      lineage["metrics"] = {**lineage["metrics"], **{
          k: v for k, v in result.metrics.items() if not k.endswith(TRAINING_COST_KEYS)}}
    if spec.save_aux is not None and self.primary:
      spec.save_aux(trained.aux, final_dir)
    self.save_model(final_dir, role, name, strategy=spec.name)  # marks the stage done
    return True

  def training_cost(self, planned: PlannedStage, built: "BuiltStage", dataset, num_steps: int,
                    params) -> dict[str, float]:
    """`<stage>_num_params`, `<stage>_train_steps` and `<stage>_train_flops` (XLA's count of
    one compiled train step, all devices, x the steps; absent where the backend has none): the
    cost side of an accuracy-per-compute comparison."""
    name = planned.name
    params_key, steps_key, flops_key = (name + suffix for suffix in TRAINING_COST_KEYS)
    cost = {params_key: float(num_params(params)), steps_key: float(num_steps)}
    local = {k: v for k, v in dataset.arrays.items()}
    batch = {k: jax.ShapeDtypeStruct((dataset.global_batch_size,) + np.shape(v)[1:],
                                     np.asarray(v).dtype, sharding=built.batch_sharding)
             for k, v in local.items()}
    flops = core.step_flops(built.step_fn, built.abstract_state, built.teacher_params, batch)
    if flops is not None:
      cost[flops_key] = flops * num_steps
    return cost

  def predictor(self, built: "BuiltStage", forward, params, model=None):
    """`arrays -> outputs` of `forward(params, batch)` on the mesh (see `EvalContext`); params
    are laid out like the stage's model, or like `model` when given (e.g. the teacher)."""
    model = model or built.ctx.model
    params = to_model_layout(params, model.config)
    if model is built.ctx.model:
      shardings = built.shardings.params["model"]
    else:
      boxed = jax.eval_shape(lambda: pretrained.init_params(model, model.config,
                                                            jax.random.PRNGKey(0), boxed=True))
      shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
    params = core.put_global(params, shardings)
    jitted = jax.jit(forward)
    size = int(self.config.data.batch_size)
    return lambda arrays: core.batched_predict(jitted, params, arrays, size,
                                               built.batch_sharding)

  def write_evaluation(self, planned: PlannedStage, step: int, result: Evaluation) -> None:
    """Merges the metrics into eval_results.json, writes the files (process 0) and logs."""
    if not self.primary:
      return
    for relative, text in result.files.items():
      path = epath.Path(self.workdir, relative)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text)
    path = epath.Path(self.workdir, RESULTS_FILE)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(result.metrics)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True))
    self.writer.write(step, result.metrics, stage=planned.name)
    log.info("%s: %s", planned.name, result.metrics)

  # -- building a stage ---------------------------------------------------------

  def teacher_on_mesh(self, planned: PlannedStage):
    """The frozen teacher a distillation stage reads: (model, params on the mesh)."""
    spec = planned.spec
    teacher = self.roles["teacher"]
    model = build_model(teacher.config, spec.teacher_head, dtype=self.dtype)
    host = teacher.params
    if teacher.head != spec.teacher_head:
      if spec.teacher_head != "pretraining":
        raise ValueError(f"stage {planned.name!r} ({spec.name}) needs a teacher with a "
                         f"{spec.teacher_head!r} head (a fine-tuned model), but the teacher is a "
                         f"{teacher.head!r} model")
      host = pretrained.adapt_params(host, teacher.head, spec.teacher_head, teacher.config)
    host = to_model_layout(host, teacher.config)
    boxed = jax.eval_shape(lambda: pretrained.init_params(model, teacher.config,
                                                          jax.random.PRNGKey(0), boxed=True))
    return model, core.put_global(host, sharding.logical_shardings(boxed, self.mesh, self.rules))

  def build_stage(self, planned: PlannedStage, stage) -> "BuiltStage":
    """Models, loss context, optimizer, shardings and the jitted train step of one stage.
    Nothing is initialised or compiled yet (`init_state` and `step_fn` compile on first call)."""
    spec, role = planned.spec, planned.role
    model_cfg = self.roles[role].config
    model = build_model(model_cfg, spec.head, dtype=self.dtype)
    teacher_model = teacher_params = None
    if spec.needs_teacher:
      teacher_model, teacher_params = self.teacher_on_mesh(planned)
    ctx = LossContext(stage=stage, model=model, teacher_model=teacher_model)
    rng = jax.random.PRNGKey(int(self.config.seed) + 1000 * planned.index)

    def boxed_params(key):
      model_key, aux_key = jax.random.split(key)
      return {"model": pretrained.init_params(model, model_cfg, model_key, boxed=True),
              "aux": spec.aux_init(ctx, aux_key) if spec.aux_init else {}}

    abstract_boxed_params = jax.eval_shape(boxed_params, rng)
    params_shape = nn.meta.unbox(abstract_boxed_params)
    multiplier_fn = None
    if spec.multipliers is not None:
      multiplier_fn = lambda step: spec.multipliers(ctx, step, params_shape)
    opt_cfg = optimizer_config(stage, int(stage.num_steps))
    tx, schedule = optim.create_optimizer(opt_cfg, multiplier_fn)
    init_state, shardings, abstract_state = core.state_layout(abstract_boxed_params, tx, rng,
                                                              self.mesh, self.rules)
    batch_sh = sharding.batch_sharding(self.mesh)
    loss = functools.partial(spec.loss, ctx)
    train_step = core.make_train_step(loss, tx, schedule, int(opt_cfg.grad_accum_steps))
    teacher_sh = (jax.tree.map(lambda x: x.sharding, teacher_params)
                  if teacher_params is not None else None)
    return BuiltStage(ctx=ctx, rng=rng, shardings=shardings, abstract_state=abstract_state,
                      batch_sharding=batch_sh, teacher_params=teacher_params,
                      init_state=init_state,
                      step_fn=core.jit_train_step(train_step, shardings, teacher_sh, batch_sh))

  def initial_params(self, planned: PlannedStage, built: "BuiltStage", dataset) -> dict:
    """Parameters a stage starts from: the role's latest model, a checkpoint, a sub-network of
    the teacher (`init_from_teacher`: ETD, first-order importance on the first
    `etd_num_batches` global batches of `dataset`), or a fresh init (for students, with
    embeddings and heads copied from the teacher where shapes match, `copy_from_teacher`);
    extras from `aux_from` (on a real batch) or `aux_init`."""
    spec, stage, role, name = planned.spec, planned.stage, planned.role, planned.name
    ctx = built.ctx
    model_key, aux_key = jax.random.split(built.rng)
    latest = self.roles[role]
    seed = int(self.config.seed)
    if latest.params is not None:
      model = latest.params
      if latest.head != spec.head:  # e.g. fine-tuning the student a PD stage just trained
        model = pretrained.adapt_params(latest.params, latest.head, spec.head, latest.config,
                                        seed=seed)
      log.info("stage %r: starting from the %s trained so far", name, role)
    elif self.config[f"{role}_checkpoint"]:
      loaded, model = pretrained.load_pretrained(self.config[f"{role}_checkpoint"], "pretraining")
      model = to_canonical_layout(core.to_host(model), loaded.config)
    elif role == "student" and stage.init_from_teacher:
      teacher = self.roles["teacher"]
      batches = None
      if stage.init_from_teacher == "etd_impt" and stage.etd_importance == "first_order":
        count = min(int(stage.etd_num_batches), dataset.batches_per_epoch)
        batches = (dataset.get_global_batch(0, i) for i in range(count))  # same on every process
      model = etd.init_student_from_teacher(
          stage.init_from_teacher, teacher.config, teacher.params, latest.config,
          student_head=spec.head, batches=batches, importance=stage.etd_importance,
          layer_mapping=stage.etd_layer_mapping, seed=seed, where=f"stage {name!r}")
    else:  # drawn unscanned: scan_layers changes how the model compiles, not its init
      unscanned = latest.config.replace(scan_layers=False)
      model = jax.tree.map(np.asarray, pretrained.init_params(
          build_model(unscanned, spec.head), unscanned, model_key))
      teacher = self.roles["teacher"]
      if role == "student" and stage.copy_from_teacher and teacher.params is not None:
        copied = copy_teacher_parts(model, teacher.params, teacher_head=teacher.head,
                                    same_norm=teacher.config.normalization ==
                                    latest.config.normalization)
        log.info("stage %r: copied %d tensors (embeddings and heads) from the teacher", name,
                 len(copied))
    if spec.aux_from is not None:  # e.g. LSQ steps from the real weights and data
      sample = {k: v[:dataset.local_batch_size] for k, v in dataset.arrays.items()}
      aux = spec.aux_from(ctx, to_model_layout(model, latest.config), sample)
    else:
      aux = spec.aux_init(ctx, aux_key) if spec.aux_init else {}
    return {"model": model, "aux": jax.tree.map(np.asarray, aux)}


@dataclasses.dataclass(frozen=True)
class BuiltStage:
  """One stage's pieces (see `Trainer.build_stage`)."""
  ctx: LossContext
  rng: jax.Array
  shardings: Any          # NamedShardings of the TrainState
  abstract_state: Any     # ShapeDtypeStructs with those shardings (for restoring)
  batch_sharding: Any
  teacher_params: Any     # on the mesh, or None
  init_state: Any         # jitted (params, rng) -> TrainState
  step_fn: Any            # jitted (state, teacher_params, batch) -> (state, metrics)


def copy_matching(dst: dict, src, path: str = "", skip=lambda path: False) -> list[str]:
  """Copies the leaves of `src` into `dst` (in place) where the path exists in both with the
  same shape and `skip(path)` is false; returns the copied paths."""
  copied = []
  if not (isinstance(src, dict) and isinstance(dst, dict)):
    return copied
  for key, value in src.items():
    where = f"{path}{key}"
    if key not in dst or skip(where):
      continue
    if isinstance(value, dict):
      copied += copy_matching(dst[key], value, f"{where}/", skip)
    elif not isinstance(dst[key], dict) and np.shape(dst[key]) == np.shape(value):
      dst[key] = np.asarray(value)
      copied.append(where)
  return copied


def copy_teacher_parts(student: dict, teacher: dict, teacher_head: str = "pretraining",
                       same_norm: bool = True) -> list[str]:
  """The teacher's embeddings, pooler and MLM/NSP heads copied into a fresh student where
  names and shapes match; returns the copied paths.

  As the release's layer-wise phase (run_pretraining.py with modeling.py
  `get_assignment_map_from_checkpoint(init_embedding=True)`): every teacher variable outside
  `bert/encoder` that the student has under the same name. The teacher's LayerNorm and the
  student's NoNorm have different names there (`LayerNorm` vs `FakeLayerNorm`), so backbone
  norms are copied only when both use the same normalization (`same_norm`); the MLM head's
  transform norm is a LayerNorm in both and is copied. A teacher without heads (`base`, e.g.
  transformers' BertModel) gives its embeddings and pooler; a tree with neither heads nor a
  backbone gives nothing.
  """
  copied = []
  for top in ("mlm", "nsp"):
    if teacher_head != "base" and top in teacher and top in student:
      copied += copy_matching(student[top], teacher[top], f"{top}/")
  backbone = teacher if teacher_head == "base" else teacher.get("backbone")
  if isinstance(backbone, dict) and "backbone" in student:
    skip = (lambda p: False) if same_norm else (lambda p: "norm" in p.rsplit("/", 1)[-1].lower())
    for sub in ("embeddings", "pooler"):
      if sub in backbone and sub in student["backbone"]:
        copied += copy_matching(student["backbone"][sub], backbone[sub], f"backbone/{sub}/",
                                skip)
  return copied


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Entry point used by `main`: runs every stage of `config` in `workdir`."""
  return Trainer(config, workdir).run()
