"""The training core beneath every stage: state, its layout on the mesh, the step and the loop.

Everything that trains (the stage runner, the NAS supernet search, the layer-mapping search's
runs, the benchmarks) builds on these pieces; this module knows nothing of strategies, tasks or
searches (nothing under `mobilebert_jax.training` imports `distill`, `downstream` or `search`).

  TrainState                  step, params, optimizer state and rng (a flax struct).
  state_layout                how a TrainState of some parameters lies on the mesh.
  make_train_step             the one step: loss, gradients, optimizer update, metrics.
  train_loop                  feeds batches to a jitted step; logs, checkpoints, stops on signal.
  batched_predict             the one sharded, batched forward pass used by every evaluator.
  put_global / to_host        host arrays onto global shardings and back (multi-host safe).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from mobilebert_jax.data.prefetch import prefetch_to_device
from mobilebert_jax.parallel import sharding
from mobilebert_jax.training import goodput
from mobilebert_jax.training.checkpointing import Checkpointer
from mobilebert_jax.training.metrics import MetricsWriter, Throughput

log = logging.getLogger("mobilebert_jax")


class TrainingDivergedError(RuntimeError):
  """A loss term became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# ----------------------------------------------------------------------------- arrays


def put_global(tree: Any, shardings: Any) -> Any:
  """Places host arrays (identical on every process) onto global shardings."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def to_host(tree: Any) -> Any:
  """Fully-replicated host copies of (possibly sharded, multi-host) arrays."""
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def all_finite(metrics: Mapping[str, Any]) -> str | None:
  """The first non-finite metric name, or None."""
  for key, value in metrics.items():
    if not np.all(np.isfinite(np.asarray(value))):
      return key
  return None


# ----------------------------------------------------------------------------- state and step


def state_layout(abstract_boxed_params: Any, tx: optax.GradientTransformation, rng: jax.Array,
                 mesh, rules) -> tuple[Callable, Any, Any]:
  """How a TrainState of these (boxed, abstract) parameters lies on the mesh.

  Returns (init_state, shardings, abstract_state): `init_state(params, rng)` jitted onto the
  shardings (a fresh optimizer state at step 0), the NamedShardings of every state leaf (the
  optimizer's moments follow their parameters' logical axes), and ShapeDtypeStructs carrying
  them (what a checkpoint restores onto).
  """
  def init_state(params, key):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=key)

  abstract_boxed_state = jax.eval_shape(init_state, abstract_boxed_params, rng)
  shardings = sharding.logical_shardings(abstract_boxed_state, mesh, rules)
  abstract_state = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      nn.meta.unbox(abstract_boxed_state), shardings)
  return jax.jit(init_state, out_shardings=shardings), shardings, abstract_state


def make_train_step(loss_fn, tx: optax.GradientTransformation, schedule, accum: int = 1):
  """The one training step: `train_step(state, context, batch) -> (state, metrics)`.

  `loss_fn(params, context, batch, rng, step) -> (loss, metrics)`; `context` is whatever the
  loss reads besides the trained parameters (the frozen teacher, a search's candidate paths).
  Metrics gain loss, grad_norm, param_norm and learning_rate (the schedule at the optimizer
  step, `step // accum`). Jit it with the state donated.
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


def jit_train_step(train_step, state_shardings, context_shardings, batch_sharding):
  """`train_step` jitted over the mesh with explicit shardings and the state donated."""
  return jax.jit(train_step, in_shardings=(state_shardings, context_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


def open_checkpointer(directory: str, checkpoint_config) -> Checkpointer:
  """A Checkpointer configured by a `config.checkpoint` block."""
  return Checkpointer(directory, save_every_steps=int(checkpoint_config.save_every_steps),
                      keep=int(checkpoint_config.keep),
                      async_save=bool(checkpoint_config.async_save))


# ----------------------------------------------------------------------------- the loop


# A run ended by a stop signal exits with this status (sysexits.h EX_TEMPFAIL: try again), after
# saving a checkpoint: a supervisor restarts it and the rerun resumes.
EXIT_STOPPED = 75


def _preemption_service() -> bool:
  """Whether jax's preemption service runs (`jax.distributed` with several processes): it
  catches SIGTERM on any process and agrees on a step to stop at in the background."""
  if jax.process_count() == 1:
    return False
  try:
    multihost_utils.reached_preemption_sync_point(0)
  except RuntimeError:  # jax_enable_preemption_service is off
    return False
  return True


class StopRequest:
  """A stop asked for by SIGTERM or SIGINT, acted on by every process at the same step.

  The loop calls `agreed()` at every step (and the runner before each stage); the first time
  it is true the loop saves a checkpoint at that step and returns. One process: the signal
  handler sets a flag, seen at the next step. Several processes: SIGTERM is left to jax's
  preemption service, which agrees on the step in the background (no step waits on a
  collective; the stop comes a step or two after the signal); SIGINT is forwarded to it as
  SIGTERM. Without that service every process all-gathers its flag at every check.
  `saved` records where the stop left the run: (stage, checkpoint step or None, directory).
  """

  def __init__(self):
    self.signal = None      # the signal this process received
    self.stopped = False    # every process agreed to stop
    self.saved: tuple[str, int | None, str | None] | None = None
    self._checks = 0
    self._preemption = False

  def __call__(self, signum, frame):
    self.signal = signum
    log.warning("received signal %d: saving a checkpoint at the next step, then exiting "
                "(status %d)", signum, EXIT_STOPPED)
    if self._preemption and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)  # to jax's preemption service: every process stops

  def agreed(self) -> bool:
    """Whether every process is to stop now; every process calls this the same number of times
    (at every step), so all of them stop, and save collectively, at the same step."""
    if self.stopped:
      return True
    self._checks += 1
    if jax.process_count() == 1:
      self.stopped = self.signal is not None
    elif self._preemption:
      self.stopped = bool(multihost_utils.reached_preemption_sync_point(self._checks))
    else:
      local = np.asarray(self.signal is not None, np.int32)
      self.stopped = bool(np.any(multihost_utils.process_allgather(local)))
    if self.stopped and self.signal is None:
      log.warning("a stop signal reached the run (on this or another process): saving a "
                  "checkpoint at this step, then exiting (status %d)", EXIT_STOPPED)
    return self.stopped

  def report(self) -> str:
    """One line for the console: what the stop saved and how to go on."""
    cause = (f"signal {self.signal}" if self.signal is not None
             else "a signal to one of the processes")
    stage, step, directory = self.saved or ("", None, None)
    if step is not None:
      where = (f"in stage {stage!r} at step {step}, saved in "
               f"{os.path.join(directory, str(step))}")
    elif directory:
      where = f"in stage {stage!r} before its first step (nothing new to save)"
    elif stage:
      where = f"before stage {stage!r} (the stages before it are finished)"
    else:
      where = "before training"
    return (f"stopped by {cause} {where}: rerun the same command to resume (exit status "
            f"{EXIT_STOPPED})")

  @contextlib.contextmanager
  def installed(self):
    """Handles SIGTERM and SIGINT while the block runs (SIGINT only where jax's preemption
    service takes SIGTERM)."""
    self._preemption = _preemption_service()
    previous = {}
    try:
      for sig in ((signal.SIGINT,) if self._preemption else (signal.SIGTERM, signal.SIGINT)):
        previous[sig] = signal.signal(sig, self)
    except ValueError:  # not the main thread: signals stay with the caller
      pass
    try:
      yield self
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


def train_loop(name: str, num_steps: int, step_fn, state, dataset, checkpointer: Checkpointer,
               batch_sharding, *, context: Callable[[], Any], writer: MetricsWriter,
               stop: StopRequest, log_every: int, tokens_per_step: int,
               after_step: Callable[[int, Any], None] | None = None,
               extra: Callable[[], dict] | None = None, flops_per_step: float | None = None,
               peak_tflops: float | None = None, num_devices: int = 1,
               profile: tuple[int, int] | None = None, profile_dir: str | None = None):
  """Feeds batches to `step_fn(state, context(), batch)` up to `num_steps`, logging every
  `log_every` steps and checkpointing (with the data position) on the way.

  Every log line carries steps/s, tokens/s and tokens/s per device (`num_devices`), the model
  FLOPs utilisation when `flops_per_step` (model FLOPs of one global step) and `peak_tflops`
  (per device) are known, and the fractions of wall time spent in steps, waiting for data,
  checkpointing and compiling (`goodput`). `profile` = (start, stop) captures a jax.profiler
  trace of steps [start, stop) into `profile_dir` (TensorBoard's profile plugin reads it).

  Returns the final state, or None when a stop signal ended the run (after saving a checkpoint
  to resume from, recorded in `stop.saved`). A non-finite metric raises `TrainingDivergedError`
  without saving; a failed checkpoint save raises `CheckpointSaveError` at the step after it
  failed.
  `after_step(done, state)` runs after every step, before any checkpoint of that step (a search
  prunes its candidates there); `extra()` adds JSON values to every checkpoint.
  """
  pending: list[tuple[int, Any]] = []
  start = int(state.step)
  throughput = Throughput(start_step=start, total_steps=num_steps)
  clock = goodput.WallClock()
  prefetcher = prefetch_to_device(dataset, size=2, sharding=batch_sharding)
  tracing = False

  def check_pending() -> tuple[int, dict] | None:
    last = None
    for step, metrics in pending:
      host = jax.device_get(metrics)
      bad = all_finite(host)
      if bad is not None:
        raise TrainingDivergedError(
            f"stage {name!r}: loss term {bad!r} is {float(np.asarray(host[bad]))} at step "
            f"{step}; stopping without saving (the last good checkpoint is kept in "
            f"{checkpointer.directory})")
      last = (step, host)
    pending.clear()
    return last

  def save(step, force=False):
    values = dict(extra() if extra is not None else {}, data=prefetcher.state(), stage=name)
    with clock.measure("checkpoint"):
      checkpointer.save(step, state, values, force=force)

  def log_line(done, host_metrics):
    scalars = {k: float(np.asarray(v)) for k, v in host_metrics.items()}
    rates = throughput.update(done, tokens_per_step)
    scalars.update(rates, total_steps=num_steps)
    scalars.update(goodput.utilisation(
        rates["steps_per_sec"], flops_per_step=flops_per_step, peak=peak_tflops,
        tokens_per_sec=rates["tokens_per_sec"], num_devices=num_devices))
    scalars.update(clock.fractions())
    writer.write(done, scalars, stage=name)

  try:
    if start < num_steps and stop.agreed():  # signalled while the stage was built: no step
      stop.saved = (name, checkpointer.latest_step(), checkpointer.directory)
      return None
    for step in range(start, num_steps):
      if profile is not None and step == profile[0]:
        jax.profiler.start_trace(profile_dir)
        tracing = True
      with clock.measure("data"):
        batch = next(prefetcher)
      with clock.measure("compile") if step == start else contextlib.nullcontext():
        state, metrics = step_fn(state, context(), batch)  # the first call compiles
      pending.append((step + 1, metrics))
      done = step + 1
      if after_step is not None:
        after_step(done, state)
      with clock.measure("checkpoint"):
        checkpointer.check_save()  # a failed background save stops the run here
      stopping = stop.agreed()
      if tracing and (done >= profile[1] or stopping or done == num_steps):
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        tracing = False
        log.info("stage %r: profiled steps %d-%d into %s", name, profile[0], done - 1,
                 profile_dir)
      if done % log_every == 0 or done == num_steps or stopping:
        last = check_pending()
        if last is not None:
          log_line(done, last[1])
      if checkpointer.should_save(done) or stopping:
        check_pending()
        save(done, force=stopping)
      if stopping and done < num_steps:
        with clock.measure("checkpoint"):
          checkpointer.wait_until_finished()
        stop.saved = (name, done, checkpointer.directory)
        return None
    check_pending()
    save(num_steps, force=True)
    checkpointer.wait_until_finished()
  finally:
    if tracing:
      jax.profiler.stop_trace()
    prefetcher.close()
    if hasattr(dataset, "close"):  # stops grain's worker processes
      dataset.close()
    writer.flush()
  return state


def step_flops(step_fn, *args) -> float | None:
  """Floating-point operations of one call of the jitted `step_fn` on `args` (arrays or
  `jax.ShapeDtypeStruct`s with shardings), from XLA's cost analysis of the compiled program
  (already compiled by a call with the same shapes: no second compile). The analysis is of one
  device's partition of the SPMD program, so it is scaled by the number of devices the
  arguments are laid out on (the mesh's, not every device of the host). None where the backend
  reports no count."""
  try:
    analysis = step_fn.lower(*args).compile().cost_analysis()
  except Exception as e:  # a backend without cost analysis must not fail a run
    log.warning("no cost analysis for the train step: %s", e)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  if flops is None or flops < 0:
    return None
  devices = max((len(x.sharding.device_set) for x in jax.tree.leaves(args)
                 if getattr(x, "sharding", None) is not None), default=1)
  return float(flops) * devices


# ----------------------------------------------------------------------------- prediction

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def batched_predict(forward: Callable[[Any, dict], dict], params: Any, arrays: Mapping[str, Any],
                    batch_size: int, batch_sharding, keys: tuple[str, ...] = INPUT_KEYS
                    ) -> dict[str, np.ndarray]:
  """`forward(params, batch) -> {name: [B, ...]}` (jitted) over every row of `arrays`, in
  global batches of `batch_size` placed on `batch_sharding`; the last batch is filled by
  wrapping around and the extra rows dropped. Returns float32 host arrays over all rows.

  `params` are already on the mesh (or replicated); every process passes the same arrays.
  """
  n = len(arrays[keys[0]])
  if n == 0:
    raise ValueError("no examples to predict")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  outputs = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size) % n
    batch = put_global({k: np.asarray(arrays[k])[rows] for k in keys},
                       {k: batch_sharding for k in keys})
    outputs.append(to_host(forward(params, batch)))
  return {f: np.concatenate([o[f] for o in outputs])[:n].astype(np.float32) for f in outputs[0]}
