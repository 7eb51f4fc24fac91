"""The NAS-BERT stage: block-wise supernet training, pruning, search and extraction.

A stage with ``strategy="nas"`` (see configs/nas_bert.py) drives its own loop here
(`run_nas_stage(env)`, a `StageEnv`), on the training core: the run's mesh, data pipeline,
optimizer, jitted step (`make_train_step`), loop (`train_loop`: logging, checkpoints with exact
resume, stop signals) and checkpoints:

1. Train the supernet block-wise against the teacher (the latest trained or loaded one): every
   step samples one valid candidate path per block and minimises the summed block MSEs.
2. Every `prune_every` steps, score every valid candidate on `eval_batches` fixed batches and drop
   the worst `prune_fraction` per block, hidden size and parameter bin (`prune_bins` bins of
   similar cost, so that small budgets keep their candidates; `selection.prune`); the validity
   mask is part of every checkpoint.
3. At the end, score the survivors, get per-op latencies (the `latency_table` JSON given, or one
   measured on this device and saved to `<stage>/latency_table.json`), and for every budget
   (`param_budgets`, `latency_budgets_ms`) search the architecture with the lowest summed block
   loss (`selection.beam_search`).
4. Extract each architecture's weights from the supernet into `<stage>/<budget name>/` (a native
   checkpoint for `load_pretrained`) and list them in `<workdir>/architectures.json`.
"""

from __future__ import annotations

import json
import logging
import os
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mobilebert_jax import pretrained
from mobilebert_jax.models import Backbone, ModelConfig
from mobilebert_jax.data.prefetch import to_global_arrays
from mobilebert_jax.parallel import sharding
from mobilebert_jax.search import costs, selection, supernet
from mobilebert_jax.search.supernet import SearchSpace
from mobilebert_jax.training import optimizer as optim
from mobilebert_jax.training.core import (jit_train_step, make_train_step, put_global,
                                          state_layout, to_host)

log = logging.getLogger("mobilebert_jax")
ARCHITECTURES_FILE = "architectures.json"
# The nas stage's keys and defaults (the stage registry fills them in): the search space, the
# candidates and pruning (the accuracy proxy), the latency table and the budgets.
STAGE_KEYS = dict(
    num_layers=4, num_blocks=2, hidden_sizes=(32, 48, 64), mha_heads=(2, 4), ffn_sizes=(64, 128),
    conv_kernels=(3, 5), identity=True,
    max_candidates=512, prune_every=100, prune_fraction=0.5, prune_bins=1, min_keep=2,
    eval_batches=2,
    latency_table="", latency_batch_size=1, latency_seq_length=0, latency_repeats=10,
    param_budgets=(), latency_budgets_ms=(), beam_size=64)


def search_space(stage: ml_collections.ConfigDict, base: ModelConfig) -> SearchSpace:
  """The search space a `nas` stage config describes, on the student template `base`."""
  try:
    return SearchSpace(
        base=base, hidden_sizes=tuple(stage.hidden_sizes), mha_heads=tuple(stage.mha_heads),
        ffn_sizes=tuple(stage.ffn_sizes), conv_kernels=tuple(stage.conv_kernels),
        identity=bool(stage.identity), num_layers=int(stage.num_layers),
        num_blocks=int(stage.num_blocks))
  except (ValueError, AttributeError, KeyError) as e:
    raise ValueError(f"nas search space: {e}") from e


def budgets(stage) -> list[dict]:
  """The stage's budgets: one dict per entry of param_budgets / latency_budgets_ms."""
  out = [{"name": f"params_{int(b)}", "max_params": float(b)}
         for b in stage.param_budgets]
  out += [{"name": f"latency_{float(b):g}ms", "max_latency_ms": float(b)}
          for b in stage.latency_budgets_ms]
  if not out:
    raise ValueError("a nas stage needs at least one budget: param_budgets or latency_budgets_ms")
  return out


def check_stage(name: str, stage, teacher: ModelConfig, student: ModelConfig) -> SearchSpace:
  """Validates a nas stage config before any compute; returns its search space."""
  space = search_space(stage, student)
  budgets(stage)
  if teacher.num_layers % space.num_blocks:
    raise ValueError(f"config.{name}.num_blocks={space.num_blocks} does not divide the teacher's "
                     f"num_layers={teacher.num_layers}")
  if teacher.vocab_size != student.vocab_size:
    raise ValueError(f"config.{name}: teacher vocab_size={teacher.vocab_size} differs from the "
                     f"student's {student.vocab_size}")
  for key in ("prune_every", "prune_bins", "min_keep", "eval_batches", "max_candidates",
              "beam_size"):
    if int(stage[key]) < 1:
      raise ValueError(f"config.{name}.{key} must be >= 1, got {stage[key]!r}")
  return space


class _Scorer:
  """Per-block losses of candidate paths on fixed evaluation batches (the accuracy proxy)."""

  def __init__(self, space, teacher_cfg, teacher_params, batches):
    self.space, self.batches = space, batches
    boundaries = jax.jit(lambda t, b: supernet.teacher_boundaries(teacher_cfg, t, b,
                                                                  space.num_blocks))
    self.boundaries = [boundaries(teacher_params, b) for b in batches]
    self.losses = jax.jit(lambda p, bounds, b, paths: supernet.block_losses(space, p, bounds, b,
                                                                            paths))

  def __call__(self, params, candidates: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Losses [blocks, C]; +inf where a candidate is no longer valid."""
    scores = np.full(valid.shape, np.inf)
    for c in np.flatnonzero(valid.any(axis=0)):
      paths = jnp.asarray(candidates[:, c])
      total = sum(self.losses(params, bounds, batch, paths)
                  for bounds, batch in zip(self.boundaries, self.batches))
      scores[:, c] = np.where(valid[:, c], np.asarray(jax.device_get(total)) / len(self.batches),
                              np.inf)
    return scores


def run_nas_stage(env) -> bool:
  """Runs (or resumes) the nas stage of `env` (a `StageEnv`); False if a stop signal ended it."""
  name, stage = env.name, env.stage
  stage_dir = env.stage_dir
  out_path = os.path.join(env.workdir, ARCHITECTURES_FILE)
  if epath.Path(stage_dir, ARCHITECTURES_FILE).exists():
    log.info("stage %r already finished; architectures in %s", name, out_path)
    return True
  teacher_cfg = env.teacher.config
  space = check_stage(name, stage, teacher_cfg, env.student.config)
  mesh, rules = env.mesh, env.rules
  num_steps = int(stage.num_steps)

  teacher_backbone = env.teacher.params
  if env.teacher.head != "base":
    teacher_backbone = teacher_backbone["backbone"]
  teacher_boxed = jax.eval_shape(lambda: pretrained.init_params(
      Backbone(teacher_cfg), teacher_cfg, jax.random.PRNGKey(0), boxed=True))
  teacher_params = {"backbone": put_global(
      teacher_backbone, sharding.logical_shardings(teacher_boxed, mesh, rules))}

  candidates = supernet.candidate_paths(space, int(stage.max_candidates), env.seed)
  groups = prune_groups(space, candidates, int(stage.prune_bins))
  log.info("stage %r: %d blocks x %d layers, %d paths per block, %d candidates per block", name,
           space.num_blocks, space.layers_per_block, space.paths_per_block(), candidates.shape[1])
  replicated = NamedSharding(mesh, PartitionSpec())
  candidates_dev = jax.device_put(candidates, replicated)

  rng = jax.random.PRNGKey(env.seed + 1000 * env.index)
  abstract_boxed = jax.eval_shape(lambda k: supernet.init_supernet(space, teacher_cfg.hidden_size,
                                                                   k), rng)
  opt_cfg = ml_collections.ConfigDict(stage.optimizer.to_dict())
  opt_cfg.total_steps = num_steps
  tx, schedule = optim.create_optimizer(opt_cfg)
  init_state, shardings, abstract_state = state_layout(abstract_boxed, tx, rng, mesh, rules)

  def loss_fn(params, context, batch, step_rng, step):
    t_params, paths_all, valid = context
    boundaries = supernet.teacher_boundaries(teacher_cfg, t_params, batch, space.num_blocks)
    paths = supernet.sample_paths(step_rng, paths_all, valid)
    losses = supernet.block_losses(space, params, boundaries, batch, paths)
    metrics = {f"block_{b}_loss": losses[b] for b in range(space.num_blocks)}
    return jnp.sum(losses), metrics

  batch_sh = env.batch_sharding
  context_sh = (jax.tree.map(lambda x: x.sharding, teacher_params), replicated, replicated)
  step_fn = jit_train_step(make_train_step(loss_fn, tx, schedule, int(opt_cfg.grad_accum_steps)),
                           shardings, context_sh, batch_sh)

  dataset = env.dataset(0)
  dataset.check_vocab_size(space.base.vocab_size)
  eval_data = env.dataset(7919)  # other masking/order, same corpus
  eval_batches = [to_global_arrays(next(eval_data), batch_sh)
                  for _ in range(int(stage.eval_batches))]
  scorer = _Scorer(space, teacher_cfg, teacher_params, eval_batches)

  checkpointer = env.checkpointer()
  valid = np.ones(candidates.shape[:2], bool)
  if checkpointer.latest_step() is not None:
    state, extra = checkpointer.restore(abstract_state)
    dataset.restore(extra["data"])
    valid = np.asarray(extra["valid"], bool)
    if valid.shape != candidates.shape[:2]:
      raise ValueError(f"{checkpointer.directory}: the saved candidate mask {valid.shape} does not "
                       f"match this config's candidates {candidates.shape[:2]}; the search space "
                       "or max_candidates changed since the checkpoint")
    log.info("stage %r: resumed from step %d with %d valid candidates", name, int(state.step),
             int(valid.sum()))
  else:
    params = jax.tree.map(np.asarray, nn.meta.unbox(supernet.init_supernet(space,
                                                                           teacher_cfg.hidden_size,
                                                                           rng)))
    state = init_state(put_global(params, shardings.params), rng)
  mask_dev = [jax.device_put(valid, replicated)]
  prune_every, fraction = int(stage.prune_every), float(stage.prune_fraction)

  def after_step(done: int, state) -> None:
    nonlocal valid
    if done % prune_every or done >= num_steps:
      return
    scores = scorer(state.params, candidates, valid)
    valid = selection.prune(valid, scores, groups, fraction, int(stage.min_keep))
    mask_dev[0] = jax.device_put(valid, replicated)
    log.info("stage %r step %d: pruned to %s valid candidates per block", name, done,
             valid.sum(axis=1).tolist())
    env.writer.write(done, {"valid_candidates": float(valid.sum())}, stage=name)

  try:
    state = env.train(
        name, num_steps, step_fn, state, dataset, checkpointer, batch_sh,
        context=lambda: (teacher_params, candidates_dev, mask_dev[0]), after_step=after_step,
        extra=lambda: {"valid": valid.tolist()})
  finally:
    checkpointer.close()
  if state is None:
    return False

  scores = scorer(state.params, candidates, valid)
  table = latency_table(env, space)
  params = to_host(state.params)
  entries = []
  for budget in budgets(stage):
    found = search(space, candidates, valid, scores, table, budget,
                   beam_size=int(stage.beam_size))
    if found is None:
      log.warning("stage %r: no architecture fits budget %s", name, budget)
      continue
    hidden, ops, block_losses = found
    config, backbone = supernet.extract(space, params, hidden, ops,
                                        jax.random.PRNGKey(env.seed + len(entries)))
    path = os.path.join(stage_dir, budget["name"])
    pretrained.save_pretrained(path, config, backbone, "base", tokenizer_dir=env.tokenizer_dir,
                               extra={"stage": name, "budget": budget})
    entries.append({
        "budget": {k: v for k, v in budget.items() if k != "name"}, "name": budget["name"],
        "params": costs.model_params(config), "latency_ms": table.latency_ms(hidden, ops),
        "flops_per_sequence": costs.model_flops(config, int(env.config.data.max_seq_length)),
        "hidden_size": hidden, "ops": list(ops), "proxy_loss": float(sum(block_losses)),
        "block_losses": [float(x) for x in block_losses], "config": config.to_dict(),
        "checkpoint": path})
    log.info("stage %r: %s -> hidden %d, %s (%d params, %.3f ms, proxy loss %.4f)", name,
             budget["name"], hidden, ",".join(ops), entries[-1]["params"],
             entries[-1]["latency_ms"], entries[-1]["proxy_loss"])
  if not entries:
    raise ValueError(f"stage {name!r}: no architecture fits any budget {budgets(stage)}; raise "
                     "the budgets or widen the search space")
  if env.primary:
    text = json.dumps({"device": table.device, "architectures": entries}, indent=2)
    epath.Path(stage_dir, "scores.json").write_text(json.dumps(
        {"candidates": candidates.tolist(), "valid": valid.tolist(),
         "scores": np.where(np.isfinite(scores), scores, -1.0).tolist()}))
    epath.Path(out_path).write_text(text)
    epath.Path(stage_dir, ARCHITECTURES_FILE).write_text(text)  # marks the stage finished
  return True


def latency_table(env, space: SearchSpace) -> costs.LatencyTable:
  """The stage's latency table: the configured JSON, a cached one, or a fresh measurement."""
  stage = env.stage
  given = stage.latency_table
  cached = os.path.join(env.stage_dir, "latency_table.json")
  path = given or (cached if epath.Path(cached).exists() else "")
  if path:
    table = costs.LatencyTable.load(path)
  else:
    table = costs.measure_latency_table(
        space, batch_size=int(stage.latency_batch_size),
        seq_length=int(stage.latency_seq_length or env.config.data.max_seq_length),
        repeats=int(stage.latency_repeats), seed=env.seed)
    table = _same_on_every_process(table)
    if env.primary:
      table.save(cached)
    log.info("latency table measured on %s, saved to %s", table.device, cached)
  missing = table.covers(space)
  if missing:
    raise ValueError(f"latency table {path}: no entries for {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''}")
  return table


def _same_on_every_process(table: costs.LatencyTable) -> costs.LatencyTable:
  """Process 0's measurement everywhere (every process must pick the same architectures)."""
  if jax.process_count() == 1:
    return table
  keys = sorted((h, op) for h, ops in table.ops.items() for op in ops)
  values = np.asarray([table.ops[h][op] for h, op in keys] +
                      [table.embeddings[h] for h in sorted(table.embeddings)], np.float64)
  values = np.asarray(multihost_utils.broadcast_one_to_all(values))
  ops = {h: {} for h in table.ops}
  for (h, op), value in zip(keys, values):
    ops[h][op] = float(value)
  embeddings = dict(zip(sorted(table.embeddings), values[len(keys):].tolist()))
  return costs.LatencyTable(ops, embeddings, device=table.device, batch_size=table.batch_size,
                            seq_length=table.seq_length)


def prune_groups(space: SearchSpace, candidates: np.ndarray, bins: int) -> np.ndarray:
  """Pruning groups [blocks, C]: hidden size x `bins` equal-count bins of block parameters.

  Ranking within a group of similar cost keeps cheap paths alive for small budgets (pruning by
  loss alone would keep only the largest paths).
  """
  if bins < 1:
    raise ValueError(f"prune_bins must be >= 1, got {bins}")
  groups = np.zeros(candidates.shape[:2], np.int64)
  for block in range(candidates.shape[0]):
    for hi, hidden in enumerate(space.hidden_sizes):
      members = np.flatnonzero(candidates[block, :, 0] == hi)
      size = np.asarray([sum(costs.op_params(op, hidden)
                             for op in space.decode(candidates[block, c])[1]) for c in members])
      rank = np.empty(len(members), np.int64)
      rank[np.lexsort((members, size))] = np.arange(len(members))
      groups[block, members] = hi * bins + rank * bins // max(len(members), 1)
  return groups


def search(space: SearchSpace, candidates: np.ndarray, valid: np.ndarray, scores: np.ndarray,
           table: costs.LatencyTable, budget: dict, beam_size: int = 64
           ) -> tuple[int, tuple[str, ...], list[float]] | None:
  """The architecture (hidden, ops, block losses) with the lowest summed block loss in `budget`,
  over every hidden size; None when nothing fits."""
  limits = {}
  if "max_params" in budget:
    limits["params"] = budget["max_params"]
  if "max_latency_ms" in budget:
    limits["latency_ms"] = budget["max_latency_ms"]
  best = None
  for hi, hidden in enumerate(space.hidden_sizes):
    fixed = {"params": costs.model_params(space.model_config(hidden)),  # embeddings + pooler
             "latency_ms": table.embeddings_ms(hidden)}
    options = []
    for block in range(space.num_blocks):
      block_options = []
      for c in np.flatnonzero(valid[block] & (candidates[block, :, 0] == hi)):
        _, ops = space.decode(candidates[block, c])
        block_options.append(selection.Option(
            index=int(c), loss=float(scores[block, c]),
            costs={"params": sum(costs.op_params(op, hidden) for op in ops),
                   "latency_ms": sum(table.op_ms(op, hidden) for op in ops)}))
      options.append(block_options)
    found = selection.beam_search(options, limits, fixed, beam_size)
    if found is not None and (best is None or found[0] < best[0]):
      ops = sum((space.decode(candidates[b, o.index])[1] for b, o in enumerate(found[1])), ())
      best = (found[0], hidden, ops, [o.loss for o in found[1]])
  return None if best is None else best[1:]


def read_architectures(workdir: str) -> list[dict]:
  """The entries of `<workdir>/architectures.json` written by a nas stage."""
  path = os.path.join(workdir, ARCHITECTURES_FILE)
  try:
    return json.loads(epath.Path(path).read_text())["architectures"]
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist; run a nas stage first") from None

