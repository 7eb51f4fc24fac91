"""Background-thread prefetch of host batches into global jax Arrays."""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, Mapping

_ITEM, _END, _ERROR = 0, 1, 2


def data_sharding(axis_name: str = "data"):
  """A NamedSharding that splits the leading (batch) axis over all devices (1-D mesh)."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(jax.devices(), (axis_name,))
  return NamedSharding(mesh, PartitionSpec(axis_name))


def to_global_arrays(batch: Mapping[str, Any], sharding: Any) -> dict[str, Any]:
  """Assembles global jax.Arrays from this process's rows of a batch (one sharding or a dict)."""
  import jax
  out = {}
  for key, value in batch.items():
    s = sharding[key] if isinstance(sharding, Mapping) else sharding
    out[key] = jax.make_array_from_process_local_data(s, value)
  return out


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _worker(it, source, has_state: bool, sharding, q: queue.Queue, stop: threading.Event) -> None:
  # Holds no reference to the DevicePrefetcher, so dropping it stops this thread (via __del__).
  try:
    for batch in it:
      if stop.is_set():
        return
      state = source.state() if has_state else None
      if not _put(q, stop, (_ITEM, to_global_arrays(batch, sharding), state)):
        return
    _put(q, stop, (_END, None, None))
  except BaseException as e:  # handed to the consumer, re-raised there
    _put(q, stop, (_ERROR, e, None))


class DevicePrefetcher:
  """Iterator of device batches filled `size` ahead by a daemon thread.

  Each host batch (a dict of numpy arrays holding this process's rows) becomes a dict of global
  `jax.Array`s via `jax.make_array_from_process_local_data`. If the source has `state()`
  (e.g. `PretrainingDataset`), `state()` here returns the source's state right after the last
  batch *handed out*, not after the ones fetched ahead, so checkpoints resume exactly.
  Call `close()` (or use `with`) to stop the thread early; do not advance the source directly
  while prefetching.
  """

  def __init__(self, iterator: Iterable[Mapping[str, Any]], size: int = 2, sharding: Any = None):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    has_state = callable(getattr(iterator, "state", None))
    self._state = iterator.state() if has_state else None
    sharding = sharding if sharding is not None else data_sharding()
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(
        target=_worker, name="device-prefetch", daemon=True,
        args=(iter(iterator), iterator, has_state, sharding, self._queue, self._stop))
    self._thread.start()

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._done:
      raise StopIteration
    kind, value, state = self._queue.get()
    if kind == _ITEM:
      self._state = state
      return value
    self._done = True
    if kind == _ERROR:
      raise value
    raise StopIteration

  def state(self) -> Any:
    """The source's state after the last batch returned by `next` (None without `state`)."""
    return None if self._state is None else dict(self._state)

  def close(self) -> None:
    """Stops the background thread and drops the batches fetched ahead."""
    self._stop.set()
    self._done = True
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5.0)

  def __del__(self):
    stop = getattr(self, "_stop", None)
    if stop is not None:
      stop.set()

  def __enter__(self) -> "DevicePrefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def prefetch_to_device(iterator: Iterable[Mapping[str, Any]], size: int = 2,
                       sharding: Any = None) -> DevicePrefetcher:
  """Prefetches `size` batches ahead onto devices as global jax Arrays.

  `sharding`: one `jax.sharding.Sharding` for every key, or a dict key -> Sharding (default:
  the leading axis split over all devices, see `data_sharding`). Each process passes its own
  rows; `jax.make_array_from_process_local_data` assembles the global batch.
  """
  return DevicePrefetcher(iterator, size=size, sharding=sharding)
