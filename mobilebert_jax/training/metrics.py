"""Metric sinks shared by every stage: JSON lines, TensorBoard and one console line per write.

`MetricsWriter.write(step, scalars, stage=...)` appends `{"step", "stage", **scalars}` to
`<workdir>/metrics.jsonl` (non-finite values become null so every line is valid JSON), adds the
scalars to TensorBoard under `<workdir>/tensorboard/<stage>/` and logs e.g.
  [distill] step 120/500 (24%) | loss 3.21 | lr 1.2e-03 | 12.3 steps/s | 4.1k tok/s |
      1.02k tok/s/device | MFU 41.5% | time step 96% data 1% checkpoint 3% compile 0% | eta 31s
on the "mobilebert_jax" logger. The ETA is `eta_seconds` from `Throughput` (a smoothed rate that
leaves out the compilation interval) or, when absent, the steps left over `steps_per_sec`; it is
stored in metrics.jsonl too. Only process 0 should write: pass `enabled=False` elsewhere.

`write_config` writes config.json, and to TensorBoard (`<workdir>/tensorboard/`) the flattened
config as a text table and as hparams. `closing_summary` is the text a run prints at its end.

Remote workdirs (`gs://...`, any URL `etils.epath` opens): object stores cannot append, so the
sinks write to a local mirror (`~/.cache/mobilebert_jax/workdirs/<scheme>/<path>`, seeded with the
remote metrics.jsonl so a resumed run appends to it) and upload the changed files - metrics.jsonl
and the TensorBoard event files - at most every `sync_every_s` seconds, on `flush` and on `close`.
config.json is written to the workdir directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import time
from typing import Any, Mapping

import numpy as np
from etils import epath

log = logging.getLogger("mobilebert_jax")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
EVAL_RESULTS_FILE = "eval_results.json"
TENSORBOARD_DIR = "tensorboard"
TOTAL_STEPS_KEY = "total_steps"
ETA_KEY = "eta_seconds"
_RESERVED = ("step", "stage")
# Console formatting: these keys are shown last, in this order, with their own units.
_RATES = (("steps_per_sec", "steps/s"), ("tokens_per_sec", "tok/s"),
          ("tokens_per_sec_per_device", "tok/s/device"))
_LR_KEYS = ("lr", "learning_rate")


def _scalar(key: str, value: Any) -> float | int:
  """A Python int/float from a Python, numpy or jax scalar; raises naming `key` otherwise."""
  try:
    array = np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(f"metric {key!r}: cannot convert {type(value).__name__} to a scalar") from e
  if array.size != 1 or array.dtype.kind not in "biuf":
    raise TypeError(f"metric {key!r} must be a real scalar, got shape {array.shape} "
                    f"dtype {array.dtype}: {value!r}")
  item = array.reshape(()).item()
  return int(item) if array.dtype.kind in "biu" else float(item)


def _json_value(value: float | int) -> float | int | None:
  return None if isinstance(value, float) and not math.isfinite(value) else value


def _compact(value: float) -> str:
  """3 significant digits with k/M/G suffixes for large magnitudes: 4123 -> '4.12k'."""
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.3g}{suffix}"
  return f"{value:.3g}"


def _duration(seconds: float) -> str:
  """A short duration: 45s, 1m20s, 2h05m, 3d04h."""
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  m, s = divmod(s, 60)
  if m < 60:
    return f"{m}m{s:02d}s"
  h, m = divmod(m, 60)
  if h < 24:
    return f"{h}h{m:02d}m"
  d, h = divmod(h, 24)
  return f"{d}d{h:02d}h"


def format_line(step: int, scalars: Mapping[str, float], stage: str,
                total_steps: int | None = None) -> str:
  """The console line for one write (see the module docstring)."""
  head = f"[{stage}] step {step}"
  if total_steps:
    head += f"/{total_steps} ({100 * int(step) // int(total_steps)}%)"
  parts = [head]
  times = {k: v for k, v in scalars.items() if k.startswith("time_") and k.endswith("_frac")}
  skip = {key for key, _ in _RATES} | {ETA_KEY, "mfu", "model_tflops_per_device"} | set(times)
  for key, value in scalars.items():
    if key in skip:
      continue
    if key in _LR_KEYS:
      parts.append(f"lr {value:.1e}")
    else:
      parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
  for key, unit in _RATES:
    if key in scalars:
      parts.append(f"{_compact(scalars[key])} {unit}")
  if "mfu" in scalars:
    parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
  if times:
    parts.append("time " + " ".join(f"{k[len('time_'):-len('_frac')]} {100 * v:.0f}%"
                                    for k, v in times.items()))
  eta = scalars.get(ETA_KEY)
  if eta is not None and math.isfinite(eta) and eta > 0:
    parts.append(f"eta {_duration(eta)}")
  return " | ".join(parts)


class MetricsWriter:
  """Writes scalars to metrics.jsonl, TensorBoard and the console; a no-op when not `enabled`."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               mirror_dir: str | None = None, sync_every_s: float = 60.0):
    """`mirror_dir` forces the local-mirror mode (the default for URL workdirs) with that
    directory as the mirror."""
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self.tensorboard = tensorboard
    self.remote = mirror_dir is not None or "://" in self.workdir
    self.local_dir = (os.fspath(mirror_dir) if mirror_dir is not None else
                      default_mirror_dir(self.workdir) if self.remote else self.workdir)
    self.path = os.path.join(self.local_dir, METRICS_FILE)
    self.sync_every_s = float(sync_every_s)
    self._synced: dict[str, tuple[float, int]] = {}  # local file -> (mtime, size) uploaded
    self._last_sync = time.monotonic()
    self._file = None
    self._summary_writers: dict[str, Any] = {}

  def write(self, step: int, scalars: Mapping[str, Any], *, stage: str) -> None:
    """Records `scalars` at `step` of `stage` in every sink."""
    if not self.enabled:
      return
    scalars = dict(scalars)
    total_steps = scalars.pop(TOTAL_STEPS_KEY, None)
    clash = [k for k in _RESERVED if k in scalars]
    if clash:
      raise ValueError(f"metric names {clash} are reserved in {self.path}; rename them")
    values = {key: _scalar(key, value) for key, value in scalars.items()}
    step = int(step)
    total = int(_scalar(TOTAL_STEPS_KEY, total_steps)) if total_steps is not None else None
    rate = values.get("steps_per_sec", 0.0)
    if total is not None and ETA_KEY not in values and rate > 0:
      values[ETA_KEY] = max(total - step, 0) / rate

    record = {"step": step, "stage": stage, **{k: _json_value(v) for k, v in values.items()}}
    if self._file is None:
      os.makedirs(self.local_dir, exist_ok=True)
      if self.remote:
        self._seed_mirror()
      self._file = open(self.path, "a", encoding="utf-8")
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()

    writer = self._summary_writer(stage)
    if writer is not None:
      for key, value in values.items():
        writer.add_scalar(key, value, global_step=step)

    log.info("%s", format_line(step, values, stage, total))
    if self.remote and time.monotonic() - self._last_sync >= self.sync_every_s:
      self.flush()

  def write_config(self, config: Any) -> None:
    """Writes `config` (ConfigDict, dict or dataclass) to workdir/config.json and to TensorBoard
    as a text table and hparams of its flattened values (`tensorboard/` itself, the parent of
    the stages' runs)."""
    if not self.enabled:
      return
    if hasattr(config, "to_json_best_effort"):
      text = config.to_json_best_effort(indent=2)
    else:
      if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
      if not isinstance(config, Mapping):
        raise TypeError(f"write_config to {self.workdir}: expected a ConfigDict, dict or "
                        f"dataclass, got {type(config).__name__}")
      text = json.dumps(dict(config), indent=2, sort_keys=True, default=repr)
    epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
    epath.Path(self.workdir, CONFIG_FILE).write_text(text + "\n")
    writer = self._summary_writer("")
    if writer is not None:
      flat = flatten_config(json.loads(text))
      writer.add_text("config", _config_table(flat))
      _add_hparams(writer, flat)

  def flush(self) -> None:
    """Flushes every sink; for a remote workdir, uploads what changed since the last upload."""
    if not self.enabled:
      return
    if self._file is not None:
      self._file.flush()
    for writer in self._summary_writers.values():
      writer.flush()
    if self.remote:
      self._upload()

  def close(self) -> None:
    if not self.enabled:
      return
    if self._file is not None:
      self._file.close()
      self._file = None
    for writer in self._summary_writers.values():
      writer.close()
    self._summary_writers.clear()
    if self.remote:
      self._upload()

  def _seed_mirror(self) -> None:
    """Starts the local metrics.jsonl from the remote one (a resumed run appends to it)."""
    remote = epath.Path(self.workdir, METRICS_FILE)
    if remote.exists() and not os.path.exists(self.path):
      with open(self.path, "w", encoding="utf-8") as f:
        f.write(remote.read_text())
    if os.path.exists(self.path):
      stat = os.stat(self.path)
      self._synced[self.path] = (stat.st_mtime, stat.st_size)

  def _upload(self) -> None:
    """Copies every new or changed file of the mirror to the same place in the workdir."""
    self._last_sync = time.monotonic()
    if not os.path.isdir(self.local_dir):
      return
    for root, _, files in os.walk(self.local_dir):
      for name in files:
        local = os.path.join(root, name)
        stat = os.stat(local)
        if self._synced.get(local) == (stat.st_mtime, stat.st_size):
          continue
        target = epath.Path(self.workdir, os.path.relpath(local, self.local_dir))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "rb") as f:
          target.write_bytes(f.read())
        self._synced[local] = (stat.st_mtime, stat.st_size)

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _summary_writer(self, subdir: str):
    """A writer for `tensorboard/<subdir>` (a stage, or "" for the config); None when disabled
    or tensorboardX is missing."""
    if not self.tensorboard:
      return None
    if subdir not in self._summary_writers:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      except ImportError:
        log.warning("tensorboardX is not installed: metrics go to %s only", self.path)
        self.tensorboard = False
        return None
      self._summary_writers[subdir] = SummaryWriter(
          logdir=os.path.join(self.local_dir, TENSORBOARD_DIR, subdir))
    return self._summary_writers[subdir]


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts to one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      flat.update(flatten_config(value, name + "."))
    else:
      flat[name] = value
  return flat


def _config_table(flat: Mapping[str, Any]) -> str:
  """A markdown table of flattened config values (JSON-formatted), sorted by key."""
  rows = ["| key | value |", "|---|---|"]
  for key in sorted(flat):
    value = json.dumps(flat[key], default=repr).replace("|", "\\|")
    rows.append(f"| {key} | {value} |")
  return "\n".join(rows)


def _add_hparams(writer, flat: Mapping[str, Any]) -> None:
  """Records `flat` as the hparams of this TensorBoard run (a session start only: TensorBoard
  finds the metrics in the stage runs below it); skipped when tensorboardX lacks hparams."""
  try:
    from tensorboardX.summary import hparams  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  values = {}
  for key, value in flat.items():
    if isinstance(value, (bool, int, float, str)):
      values[key] = value
    elif value is not None and value != {}:
      values[key] = json.dumps(value, default=repr)  # lists: their JSON text
  _, session_start, _ = hparams(values, {})
  writer.file_writer.add_summary(session_start)


def default_mirror_dir(workdir: str) -> str:
  """The local mirror of a URL workdir: ~/.cache/mobilebert_jax/workdirs/<scheme>/<path>."""
  scheme, _, rest = workdir.partition("://")
  return os.path.join(os.path.expanduser("~"), ".cache", "mobilebert_jax", "workdirs", scheme,
                      rest.strip("/"))


class Throughput:
  """Steps/s and tokens/s over the interval since the last call, and `eta_seconds` when the
  total number of steps is known.

  The ETA is the steps left times a smoothed time per step: an exponential moving average
  (weight `smoothing` on the newest interval) over the intervals so far, leaving out the first
  interval after construction or `reset` (compilation, restoring) unless it is all there is.
  """

  def __init__(self, start_step: int = 0, total_steps: int | None = None, *,
               smoothing: float = 0.5):
    self.total_steps = total_steps
    self.smoothing = float(smoothing)
    self._sec_per_step: float | None = None
    self.reset(start_step)

  def reset(self, step: int) -> None:
    """Starts a new interval at `step` now (e.g. after restoring or a pause for evaluation)."""
    self._step = int(step)
    self._time = time.perf_counter()
    self._warmup = True

  def update(self, step: int, tokens_per_step: int,
             total_steps: int | None = None) -> dict[str, float]:
    """Rates since the previous `update` (or construction/`reset`), then starts a new interval;
    with `total_steps` (here or at construction) also `eta_seconds`."""
    now = time.perf_counter()
    steps = int(step) - self._step
    elapsed = now - self._time
    self._step, self._time = int(step), now
    if steps <= 0 or elapsed <= 0:
      return {"steps_per_sec": 0.0, "tokens_per_sec": 0.0}
    steps_per_sec = steps / elapsed
    rates = {"steps_per_sec": steps_per_sec,
             "tokens_per_sec": steps_per_sec * float(tokens_per_step)}
    interval = elapsed / steps
    if not self._warmup:
      self._sec_per_step = interval if self._sec_per_step is None else (
          self.smoothing * interval + (1.0 - self.smoothing) * self._sec_per_step)
    self._warmup = False
    total = total_steps if total_steps is not None else self.total_steps
    if total is not None:
      sec_per_step = self._sec_per_step if self._sec_per_step is not None else interval
      rates[ETA_KEY] = max(int(total) - int(step), 0) * sec_per_step
    return rates


def read_metrics(path: str) -> list[dict]:
  """Reads a metrics.jsonl (or the one inside a workdir, local or remote) into a list of dicts."""
  path = os.fspath(path)
  if epath.Path(path).is_dir():
    path = os.path.join(path, METRICS_FILE)
  records = []
  with epath.Path(path).open("r") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON line: {e}") from e
  return records


def closing_summary(workdir: str, outputs: Mapping[str, str]) -> str:
  """The lines a run prints at its end: eval_results.json (with its scores), metrics.jsonl, the
  TensorBoard directory and command, and each output (`role` -> model directory,
  "architectures" -> the searched architectures' JSON file, a stage name -> what it wrote).
  Missing files are left out."""
  workdir = os.fspath(workdir)
  rows = []
  results = os.path.join(workdir, EVAL_RESULTS_FILE)
  if epath.Path(results).exists():
    rows.append(("eval results", results + _inline_results(results)))
  metrics = os.path.join(workdir, METRICS_FILE)
  if epath.Path(metrics).exists():
    rows.append(("metrics", metrics))
  tensorboard = os.path.join(workdir, TENSORBOARD_DIR)
  if epath.Path(tensorboard).exists():
    command = f"tensorboard --logdir={shlex.quote(tensorboard)}"
    rows.append(("tensorboard", f"{tensorboard}  ({command})"))
  for role, path in outputs.items():
    if role == "architectures":
      rows.append(("searched architectures", f"{path}  (each entry's checkpoint loads with "
                   "mobilebert_jax.load_pretrained)"))
    elif role not in ("teacher", "student"):  # a stage's own output (e.g. a CVT tagger)
      rows.append((f"{role} output", path))
    else:
      rows.append((f"{role} model", f"{path}  (mobilebert_jax.load_pretrained({path!r}))"))
  width = max((len(name) for name, _ in rows), default=0) + 1
  return "\n".join([f"run finished: {workdir}"] +
                   [f"  {name + ':':<{width}} {value}" for name, value in rows])


def _inline_results(path: str, limit: int = 6) -> str:
  """'  (dev_accuracy 0.842, dev_f1 0.871, +3 more)' from an eval_results.json; '' if empty."""
  try:
    results = json.loads(epath.Path(path).read_text())
  except (OSError, json.JSONDecodeError):
    return "  (unreadable)"
  if not isinstance(results, Mapping):
    return ""
  items = [f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
           for key, value in results.items()
           if isinstance(value, (int, float, str)) and not isinstance(value, bool)]
  if not items:
    return ""
  more = f", +{len(items) - limit} more" if len(items) > limit else ""
  return f"  ({', '.join(items[:limit])}{more})"
