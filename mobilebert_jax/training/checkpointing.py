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
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

_STATE = "state"
_EXTRA = "extra"


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
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _EXTRA: ocp.JsonCheckpointHandler()})

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
    return bool(self._manager.save(step, args=args, force=force))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every complete checkpoint step, ascending."""
    return sorted(self._manager.all_steps())

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Returns (state, extra) of `step` (default: latest) laid out like `abstract_state`.

    `abstract_state` leaves are `jax.ShapeDtypeStruct`s with a `.sharding` (concrete jax.Arrays
    are accepted and only their shape, dtype and sharding are used).
    """
    self._manager.reload()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
    if step is None:
      step = steps[-1]
    elif int(step) not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available steps: {steps}")
    step = int(step)
    target = self._abstract(abstract_state)
    self._check_fits(target, step)
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target),
                                 _EXTRA: ocp.args.JsonRestore()})
    restored = self._manager.restore(step, args=args)
    return restored[_STATE], dict(restored[_EXTRA] or {})

  def wait_until_finished(self) -> None:
    """Blocks until any in-flight asynchronous save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax resources."""
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
    except Exception:  # pylint: disable=broad-except
      return  # Unreadable metadata: leave the validation to orbax.
    stored = _leaves_by_path(getattr(metadata, "tree", metadata))
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
