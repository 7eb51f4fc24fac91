"""Checkpoints for every stage: one small wrapper around orbax's `CheckpointManager`.

A checkpoint holds two items written together under `<directory>/<step>/`:
  state: a pytree of (possibly sharded) jax.Arrays, e.g. a flax `TrainState`;
  extra: a small JSON dict (data-iterator position, stage name, ...).
Saves are asynchronous by default and only the last `keep` steps are kept. Orbax writes into a
temporary directory and renames it when complete, so readers only ever see finished checkpoints;
in multi-process runs every process calls `save` and orbax coordinates the writes.

`restore` takes an abstract state (`jax.ShapeDtypeStruct` leaves carrying a `NamedSharding` on the
current mesh) and lays the arrays out with those shardings, so a checkpoint written on one mesh
restores onto any other.

Faults a restart must survive:
  damaged step   each committed step gets `<step>/files.json` (every file's size; local
                 directories). `restore` checks a step against it, then reads it; a step that is
                 missing a file, holds a truncated or garbled one, or lost `state/_METADATA` is
                 renamed `<step>.damaged` (never deleted) with one warning line naming the file,
                 and the newest intact older step is restored. With none intact, restoring raises
                 `CheckpointDamagedError` naming the directory and each step's fault.
  failed save    a background save that failed (disk full, ...) raises `CheckpointSaveError` at
                 the next `check_save` (the loop calls it every step) naming the step, the
                 directory and the error; the steps committed before it are kept.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import os
import re
import sys
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger("mobilebert_jax")

_STATE = "state"
_EXTRA = "extra"
FILES = "files.json"  # in every committed step directory: {relative path: size in bytes}
DAMAGED_SUFFIX = ".damaged"
# Files every step has (orbax's StandardCheckpointHandler tree metadata, JsonCheckpointHandler's
# file): without them orbax reports a lost _METADATA as a model mismatch.
_REQUIRED = (f"{_STATE}/_METADATA", f"{_EXTRA}/metadata")
# Orbax's own markers, which restoring does not read (and which orbax may still be writing when
# files.json is): not listed there.
_UNLISTED = (FILES, "_CHECKPOINT_METADATA", "commit_success.txt")


class CheckpointDamagedError(RuntimeError):
  """No intact checkpoint step to restore (each one misses a file or cannot be read)."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (e.g. no space left on device); earlier steps are kept."""


class _Damaged(Exception):
  """A step's files are damaged; the message says which and how."""


def _reason(error: BaseException) -> str:
  """The innermost message of an exception's `raise ... from` chain, on one line, without
  tensorstore's JSON specs and source locations."""
  chain = []
  while error is not None and len(chain) < 10:
    chain.append(error)
    error = error.__cause__
  texts = [str(e).strip() for e in chain]
  text = next((t for t in reversed(texts) if t), type(chain[-1]).__name__)
  text = re.split(r"\s*\[(?:tensorstore_spec|source locations)", text)[0]
  text = " ".join(text.split())
  return text if len(text) <= 400 else text[:400] + " ..."


@contextlib.contextmanager
def _quiet_abandoned_reads() -> Iterator[None]:
  """Drops Python's "Exception ignored in <coroutine>" reports (each with tensorstore's whole
  spec) of the array reads orbax abandons once one read of a damaged step failed: that failure
  is reported once, by the caller."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not inspect.iscoroutine(unraisable.object):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()  # the abandoned reads are freed here, not after the hook is restored
    sys.unraisablehook = previous


def _is_resource_error(error: BaseException) -> bool:
  """Out of memory and the like: the reader's problem, not the checkpoint's."""
  text = _reason(error)
  return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in text or \
      "out of memory" in text.lower()


def _resolve(directory: str) -> str:
  """Absolute local path; URLs such as gs://bucket/dir pass through untouched."""
  directory = os.fspath(directory)
  if "://" in directory:
    return directory
  return os.path.abspath(os.path.expanduser(directory))


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path: tuple) -> str:
  return "/".join(_key_name(k) for k in path) or "<root>"


def _leaves_by_path(tree: Any) -> dict[str, Any]:
  return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class _ManagerWithoutPreemptionChecks(ocp.CheckpointManager):
  """orbax's CheckpointManager, minus its own look at jax's preemption sync point.

  The sync point is one agreement per run, keyed by a counter each process passes; the
  training loop agrees its stop there (`core.StopRequest`) with its own counter and then saves
  with `force`. Were orbax to ask too, with its step numbers, the two counters would interleave
  and the processes could disagree on the step (a stop never seen, or one process saving alone
  until the save's barrier hangs).
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class Checkpointer:
  """Saves and restores (state, extra) pairs every `save_every_steps` steps, keeping the last `keep`."""

  def __init__(self, directory: str, *, save_every_steps: int, keep: int = 3,
               async_save: bool = True):
    if save_every_steps <= 0:
      raise ValueError(f"save_every_steps must be positive, got {save_every_steps}")
    if keep is not None and keep <= 0:
      raise ValueError(f"keep must be positive (or None to keep all), got {keep}")
    self.directory = _resolve(directory)
    self.save_every_steps = int(save_every_steps)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=self.save_every_steps,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    self._manager = _ManagerWithoutPreemptionChecks(
        self.directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _EXTRA: ocp.JsonCheckpointHandler()})
    self._in_flight: int | None = None  # a started save not yet seen committed

  def should_save(self, step: int) -> bool:
    """Whether `step` is a regular save step (a positive multiple of `save_every_steps`)."""
    return step > 0 and step % self.save_every_steps == 0

  def save(self, step: int, state: Any, extra: dict | None = None, *, force: bool = False) -> bool:
    """Starts saving `state` and `extra` at `step`; returns whether a save was started.

    Without `force`, only `should_save` steps newer than the latest checkpoint are saved. An
    existing step is never overwritten. With async saving this returns while the write continues.
    """
    step = int(step)
    if not force and not self.should_save(step):
      return False
    self.check_save()
    if step in self._manager.all_steps():
      return False
    extra = dict(extra or {})
    try:
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      raise TypeError(f"checkpoint extra for step {step} in {self.directory} is not "
                      f"JSON-serialisable: {e}; extra={extra!r}") from e
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                 _EXTRA: ocp.args.JsonSave(extra)})
    self.wait_until_finished()  # a previous save's error names its own step
    try:
      started = bool(self._manager.save(step, args=args, force=force))
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    if started:
      self._in_flight = step
      self.check_save()  # a synchronous save is committed already
    return started

  def check_save(self) -> int | None:
    """Surfaces the outcome of a background save that has finished: raises
    `CheckpointSaveError` if it failed, else records its files and returns its step. Returns
    None while it is still writing (or when none was started). Cheap: call it every step."""
    if self._in_flight is None or self._manager.is_saving_in_progress():
      return None
    return self._finish()

  def _finish(self) -> int | None:
    """Waits for the in-flight save; raises `CheckpointSaveError` if it failed."""
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if step is None:
        raise
      raise self._save_error(step, e) from e
    if step is not None:
      self._record_files(step)
    return step

  def _save_error(self, step: int, error: BaseException) -> CheckpointSaveError:
    kept = [s for s in self._manager.all_steps() if s != step]
    last = f"step {max(kept)} is the last good checkpoint" if kept else "no checkpoint is kept"
    return CheckpointSaveError(f"saving checkpoint step {step} to {self.directory} failed: "
                               f"{_reason(error)} ({last})")

  def _record_files(self, step: int) -> None:
    """Writes `<step>/files.json`: the size of every file of the committed step (process 0,
    local directories), what `restore` checks a step against."""
    step_dir = os.path.join(self.directory, str(step))
    if "://" in self.directory or jax.process_index() != 0 or not os.path.isdir(step_dir):
      return
    temporary = os.path.join(step_dir, f".{FILES}.tmp")
    try:
      sizes = {}
      for root, _, files in os.walk(step_dir):
        for name in files:
          path = os.path.join(root, name)
          if name not in _UNLISTED and path != temporary:
            sizes[os.path.relpath(path, step_dir)] = os.path.getsize(path)
      with open(temporary, "w") as f:
        json.dump(sizes, f, indent=0, sort_keys=True)
      os.replace(temporary, os.path.join(step_dir, FILES))
    except OSError as e:  # the checkpoint itself is complete: restoring just checks less
      log.warning("could not list the files of checkpoint %s: %s", step_dir, e)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every complete checkpoint step, ascending."""
    return sorted(self._manager.all_steps())

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Returns (state, extra) of `step` (default: the newest intact step) laid out like
    `abstract_state`.

    `abstract_state` leaves are `jax.ShapeDtypeStruct`s with a `.sharding` (concrete jax.Arrays
    are accepted and only their shape, dtype and sharding are used). Without `step`, damaged
    steps newer than an intact one are moved aside to `<step>.damaged` with a warning; with no
    intact step, or a damaged `step`, this raises `CheckpointDamagedError`. A state that does
    not fit the checkpoint (other leaves or shapes) raises ValueError and moves nothing.
    """
    self._manager.reload()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
    target = self._abstract(abstract_state)
    if step is not None:
      if int(step) not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                f"available steps: {steps}")
      try:
        return self._restore_step(target, int(step))
      except _Damaged as e:
        raise CheckpointDamagedError(f"checkpoint step {step} in {self.directory} is damaged: "
                                     f"{e}") from None
    damaged = []
    for candidate in reversed(steps):
      try:
        restored = self._restore_step(target, candidate)
      except _Damaged as e:
        damaged.append((candidate, str(e)))
        continue
      for bad, fault in damaged:
        self._move_aside(bad, fault, candidate)
      if damaged:
        self._manager.reload()
      return restored
    faults = "; ".join(f"step {s}: {fault}" for s, fault in damaged)
    raise CheckpointDamagedError(
        f"no intact checkpoint to restore in {self.directory} ({faults}); move the damaged step "
        "directories aside to start this stage over")

  def _restore_step(self, target: Any, step: int) -> tuple[Any, dict]:
    """Restores one step; raises `_Damaged` naming the fault when its files are damaged (on
    any process: every process agrees)."""
    fault = self._find_fault(step)
    restored = None
    if fault is None:
      self._check_fits(target, step)  # another model: the caller's error, not damage
      args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target),
                                   _EXTRA: ocp.args.JsonRestore()})
      with _quiet_abandoned_reads():
        try:
          restored = self._manager.restore(step, args=args)
        except Exception as e:  # pylint: disable=broad-except  # tensorstore raises many types
          if _is_resource_error(e):
            raise
          fault = f"reading it failed: {_reason(e)}"
          if "Truncated Zstd" in fault and "at byte 0;" in fault:
            fault += " (a data file under state/ is missing or empty)"
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.asarray(fault is not None, np.int32))
      if fault is None and np.any(flags):
        fault = "another process could not read its part"
    if fault is not None:
      raise _Damaged(fault)
    return restored[_STATE], dict(restored[_EXTRA] or {})

  def _find_fault(self, step: int) -> str | None:
    """The first missing, resized or unreadable file of `step` (checked against its
    files.json, when it has one), or None; reads no arrays."""
    step_dir = epath.Path(self.directory, str(step))
    listing = step_dir / FILES
    expected = {}
    if listing.exists():
      try:
        expected = json.loads(listing.read_text())
      except ValueError as e:
        return f"file {FILES} is not valid JSON ({e})"
    for relative in list(expected) + [r for r in _REQUIRED if r not in expected]:
      path = step_dir / relative
      if not path.exists():
        return f"file {relative} is missing"
      if relative in expected and not path.is_dir():
        size = path.stat().length
        if size != expected[relative]:
          return (f"file {relative} has {size} bytes but {expected[relative]} were saved "
                  "(truncated or overwritten)")
    try:
      json.loads((step_dir / _REQUIRED[0]).read_text())
    except (ValueError, UnicodeDecodeError) as e:
      return f"file {_REQUIRED[0]} is not valid JSON ({e})"
    return None

  def _move_aside(self, step: int, fault: str, restored: int) -> None:
    """Renames a damaged step directory to `<step>.damaged` (process 0) and says so once."""
    source = epath.Path(self.directory, str(step))
    target = epath.Path(self.directory, f"{step}{DAMAGED_SUFFIX}")
    n = 1
    while target.exists():
      target = epath.Path(self.directory, f"{step}{DAMAGED_SUFFIX}.{n}")
      n += 1
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mobilebert_jax: moved aside {source}")
    log.warning("checkpoint %s is damaged (%s): moved it aside to %s; resuming from step %d",
                source, fault, target, restored)

  def wait_until_finished(self) -> None:
    """Blocks until any in-flight asynchronous save has been committed; raises
    `CheckpointSaveError` if it failed."""
    self._finish()

  def close(self) -> None:
    """Waits for pending saves (raising `CheckpointSaveError` if one failed) and releases
    orbax resources."""
    try:
      self._finish()
    finally:
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _abstract(self, abstract_state: Any) -> Any:
    """Normalises leaves to ShapeDtypeStructs and checks that each carries a sharding."""

    def convert(path, leaf):
      if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
      if isinstance(leaf, jax.ShapeDtypeStruct) and getattr(leaf, "sharding", None) is None:
        raise ValueError(f"abstract_state leaf {_path_str(path)} (shape {leaf.shape}) has no "
                         f"sharding; restoring into {self.directory} needs one per array")
      return leaf

    return jax.tree_util.tree_map_with_path(convert, abstract_state)

  def _check_fits(self, target: Any, step: int) -> None:
    """Raises a ValueError naming the first leaf whose path or shape differs from the checkpoint."""
    try:
      metadata = self._manager.item_metadata(step)[_STATE]
    except Exception as e:  # pylint: disable=broad-except
      raise _Damaged(f"its metadata cannot be read: {_reason(e)}") from None
    stored = _leaves_by_path(getattr(metadata, "tree", metadata))
    if not stored:
      raise _Damaged(f"its {_REQUIRED[0]} lists no arrays")
    wanted = _leaves_by_path(target)
    where = f"checkpoint step {step} in {self.directory}"
    missing = sorted(set(wanted) - set(stored))
    if missing:
      raise ValueError(f"{where} has no leaf {missing[0]} (missing {len(missing)} leaves: "
                       f"{missing[:5]}); it holds {sorted(stored)[:10]}")
    unexpected = sorted(set(stored) - set(wanted))
    if unexpected:
      raise ValueError(f"{where} holds leaves that abstract_state lacks: {unexpected[:5]} "
                       f"({len(unexpected)} in all)")
    for path, leaf in wanted.items():
      want_shape = getattr(leaf, "shape", None)
      have_shape = getattr(stored[path], "shape", None)
      if want_shape is not None and have_shape is not None and \
          tuple(want_shape) != tuple(have_shape):
        raise ValueError(f"{where}: leaf {path} has shape {tuple(have_shape)} in the checkpoint "
                         f"but abstract_state expects {tuple(want_shape)}")
