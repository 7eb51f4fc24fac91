"""Running on pods: one run per workdir, and compiled programs kept across restarts.

  workdir_lock            `<workdir>/run.lock` while a run works there (process 0 takes it; the
                          holder's host, pid and start time inside). A second run refuses in one
                          line naming the holder; a lock whose holder is gone (its pid dead on
                          this host, the host rebooted, or no heartbeat from another host for
                          `stale_after_s`) is taken over with a warning.
  use_compilation_cache   JAX's persistent compilation cache in `<workdir>/compilation_cache` (or
                          `config.compilation_cache_dir`; "none": off), so a restarted run loads
                          its compiled steps instead of compiling them again.
  record_environment      `<workdir>/environment.json`: the installed versions of the packages
                          that decide the numerics (jax, jaxlib, libtpu, flax, optax, orbax, ...),
                          Python, the backend and devices, one entry per start; a restart on
                          other versions is logged with what changed.

Exit statuses of `mobilebert_jax.main`: 0 done, 1 an error (one line where it is a known fault:
a workdir in use, a checkpoint that cannot be saved or restored), 2 a bad config, 75 stopped by a
signal after saving a checkpoint (`core.EXIT_STOPPED`): rerun the same command to resume.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Iterator

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger("mobilebert_jax")

LOCK_FILE = "run.lock"
COMPILATION_CACHE_DIR = "compilation_cache"


class WorkdirLockedError(RuntimeError):
  """Another run works in this workdir."""


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def describe_holder(holder: dict) -> str:
  """`host H pid P since T (command)` of a lock's contents."""
  command = holder.get("command", "")
  return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} since "
          f"{holder.get('started', '?')}" + (f" ({command})" if command else ""))


class WorkdirLock:
  """`<workdir>/run.lock`: held from `acquire` to `release` by one run.

  Local workdirs: the file is also `flock`ed, so the kernel frees it when the holder dies and
  two runs starting together cannot both take it. The JSON inside names the holder and carries
  a heartbeat, renewed every `heartbeat_s` seconds, for hosts that share the workdir over a
  network filesystem or an object store (no flock there): another host's lock is stale once
  its heartbeat is `stale_after_s` seconds old.
  """

  def __init__(self, workdir: str, *, stale_after_s: float = 600.0, heartbeat_s: float = 60.0):
    self.workdir = os.fspath(workdir)
    self.remote = "://" in self.workdir
    self.path = (f"{self.workdir.rstrip('/')}/{LOCK_FILE}" if self.remote
                 else os.path.join(self.workdir, LOCK_FILE))
    self.stale_after_s = float(stale_after_s)
    self.heartbeat_s = float(heartbeat_s)
    self._fd: int | None = None
    self._held = False
    self._mine: dict = {}
    self._write_lock = threading.Lock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # -- the holder's record ------------------------------------------------------

  def _record(self) -> dict:
    now = time.time()
    started = self._mine.get("started") or datetime.datetime.fromtimestamp(
        now, datetime.timezone.utc).isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started,
            "boot_id": _boot_id(), "command": " ".join(sys.argv)[:300], "heartbeat": now}

  def _read(self) -> dict:
    try:
      if self._fd is not None:
        text = os.pread(self._fd, 1 << 16, 0).decode(errors="replace")
      else:
        text = epath.Path(self.path).read_text()
      return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
      return {}

  def _write(self, record: dict) -> None:
    data = json.dumps(record).encode()
    with self._write_lock:
      if self._fd is not None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)
      else:
        epath.Path(self.path).write_text(data.decode())

  def _stale(self, holder: dict, flocked: bool) -> str | None:
    """Why `holder`'s lock is stale, or None while it may still be held."""
    if holder.get("host") == socket.gethostname():
      if holder.get("pid") == os.getpid():
        return "this process"
      if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
        return "the host restarted since"
      if not isinstance(holder.get("pid"), int) or not _pid_alive(holder["pid"]):
        return f"process {holder.get('pid')} is gone"
      if flocked:
        return f"process {holder.get('pid')} does not hold the lock"
      return None
    age = time.time() - float(holder.get("heartbeat", 0) or 0)
    if age > self.stale_after_s:
      return f"no heartbeat for {age:.0f} s"
    return None

  def _refuse(self, holder: dict) -> WorkdirLockedError:
    who = describe_holder(holder) if holder else "another process"
    return WorkdirLockedError(
        f"workdir {self.workdir} is in use by {who}: lock file {self.path}; wait for that run "
        "to end or stop it, or use another --workdir")

  # -- taking and releasing -----------------------------------------------------

  def acquire(self) -> "WorkdirLock":
    """Takes the lock; raises `WorkdirLockedError` naming the holder if another run has it."""
    flocked = not self.remote
    if self.remote:
      holder = self._read() if epath.Path(self.path).exists() else {}
    else:
      os.makedirs(self.workdir, exist_ok=True)
      holder = self._open_and_flock()
    if holder:
      reason = self._stale(holder, flocked)
      if reason is None:
        self.release()
        raise self._refuse(holder)
      if reason != "this process":
        log.warning("taking over the stale lock %s of %s (%s)", self.path,
                    describe_holder(holder), reason)
    self._mine = self._record()
    self._write(self._mine)
    self._held = True
    if self.heartbeat_s > 0:
      self._stop.clear()
      self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                      daemon=True)
      self._thread.start()
    return self

  def _open_and_flock(self) -> dict:
    """Opens and flocks the local lock file (the one at the path, not one just removed by its
    releasing holder); returns its previous contents. Raises if another process flocks it."""
    for _ in range(10):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          os.close(fd)
          raise
        self._fd = fd
        holder = self._read()
        self._fd = None
        os.close(fd)
        raise self._refuse(holder) from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        self._fd = fd
        return self._read()
      os.close(fd)
    raise WorkdirLockedError(f"could not take the lock file {self.path}: it keeps being "
                             "replaced by another process")

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        self._write(dict(self._mine, heartbeat=time.time()))
      except OSError as e:  # a full or flaky disk must not kill the run
        log.warning("could not renew the heartbeat in %s: %s", self.path, e)

  def release(self) -> None:
    """Removes the lock file (if it is still this run's) and frees it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._held:
      holder = self._read()
      if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        try:
          epath.Path(self.path).unlink()
        except OSError as e:
          log.warning("could not remove the lock file %s: %s", self.path, e)
      self._held = False
    if self._fd is not None:
      os.close(self._fd)  # frees the flock
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


_entered: dict[str, int] = {}  # workdir -> depth of `workdir_lock` blocks open in this process


@contextlib.contextmanager
def workdir_lock(workdir: str, **kwargs) -> Iterator[WorkdirLock | None]:
  """Holds `<workdir>/run.lock` while the block runs. Only process 0 takes it (the workdir is
  shared); if it is refused, every process raises `WorkdirLockedError`. A block inside another
  one for the same workdir (e.g. `main` around `Trainer.run`) holds the outer one's lock."""
  key = workdir if "://" in workdir else os.path.abspath(workdir)
  if _entered.get(key):
    _entered[key] += 1
    try:
      yield None
    finally:
      _entered[key] -= 1
    return
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, **kwargs).acquire()
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    refused = multihost_utils.broadcast_one_to_all(np.asarray(error is not None, np.int32))
    if refused and error is None:
      error = WorkdirLockedError(f"workdir {workdir} is in use by another run (process 0 "
                                 f"names it; lock file {workdir}/{LOCK_FILE})")
  if error is not None:
    raise error
  _entered[key] = 1
  try:
    yield lock
  finally:
    _entered.pop(key, None)
    if lock is not None:
      lock.release()


# ----------------------------------------------------------------------------- compilation cache


def use_compilation_cache(setting: str, workdir: str) -> str | None:
  """Points JAX's persistent compilation cache at `setting` (empty: `$JAX_COMPILATION_CACHE_DIR`
  if set, else `<workdir>/compilation_cache`; "none": no cache) and returns the directory.

  Call it before the first compile of the run. Every compiled program is cached (JAX's
  default keeps only those that took a second to compile, which leaves out every CPU step of
  a small model) unless `$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` says otherwise. Only
  process 0 writes entries; every process reads them.
  """
  setting = (setting or "").strip()
  current = jax.config.jax_compilation_cache_dir
  if setting.lower() == "none":
    if current is not None:
      jax.config.update("jax_compilation_cache_dir", None)
      compilation_cache.reset_cache()
    return None
  path = setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      workdir, COMPILATION_CACHE_DIR)
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
  if path != current:
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()  # the next compile opens this directory
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  log.info("compilation cache: %s", path)
  return path


ENVIRONMENT_FILE = "environment.json"
# Distributions whose versions decide what a run computes (those not installed are left out).
RECORDED_PACKAGES = ("jax", "jaxlib", "libtpu", "libtpu-nightly", "jax-cuda12-plugin",
                     "jax-cuda12-pjrt", "flax", "optax", "orbax-checkpoint", "grain",
                     "array-record", "numpy", "transformers", "tokenizers", "ml-collections",
                     "tensorflow-cpu", "tensorflow", "mobilebert_jax")


def installed_versions(names=RECORDED_PACKAGES) -> dict[str, str]:
  """{distribution: version} of the `names` that are installed (the benchmarks' reports use
  it too)."""
  from importlib import metadata
  versions = {}
  for name in names:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return versions


def record_environment(workdir: str) -> list[str]:
  """Appends this start's environment (package versions, Python, backend, device kind and
  count, processes) to `<workdir>/environment.json`; returns the version changes since the
  previous start (`name: old -> new`), which are logged as a warning. Process 0 only."""
  if jax.process_index() != 0:
    return []
  devices = jax.devices()
  entry = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": socket.gethostname(), "python": sys.version.split()[0],
           "packages": installed_versions(), "backend": jax.default_backend(),
           "device_kind": devices[0].device_kind, "devices": len(devices),
           "processes": jax.process_count()}
  path = epath.Path(workdir, ENVIRONMENT_FILE)
  history = []
  if path.exists():
    try:
      history = json.loads(path.read_text())
    except json.JSONDecodeError:
      log.warning("%s is not valid JSON; starting a new record", path)
  if not isinstance(history, list):
    history = []
  changes = []
  if history:
    before = dict(history[-1].get("packages", {}), python=history[-1].get("python"))
    now = dict(entry["packages"], python=entry["python"])
    changes = [f"{k}: {before.get(k, '<absent>')} -> {now.get(k, '<absent>')}"
               for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
  if changes:
    log.warning("this workdir's previous run used other versions (%s): results may differ from "
                "an uninterrupted run; pin them with launch/constraints/", "; ".join(changes))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(history + [entry], indent=2))
  return changes
