"""Pretraining data: corpus preparation throughput and memory, training start-up, loader speed.

    python -m benchmarks.data_pipeline --out=data_pipeline.json            # 50 MB and 500 MB
    python -m benchmarks.data_pipeline --quick --out=/tmp/dp_quick.json    # smoke run, ~2 min

(--quick checks that everything runs; its figures do not test the goals: its 4 MB corpus is a
single shard, prepared by one worker.)

Corpora are synthetic and reproducible: a document joins a uniform random number in
`--doc_parts` (default 1-32, about 2,500 tokens on average) of the shipped sample text's 63
documents (about 150 tokens each), each part's sentences in a seeded random order, written in
BERT format (one sentence per line, blank line between documents) until the file reaches each of
`--sizes_mb` (the smaller corpus is a prefix of the larger). Long documents make the packing at
512 realistic. Everything lives in a temporary directory that is
removed at the end (`--keep` keeps it). The measurements:

1. Preparation throughput: the full `python -m mobilebert_jax.data.prepare` command (child
   process, `--num_workers` = the usable cores, `--shard_size_mb`, max_seq_length 128), tokens
   (the manifest's `num_tokens`) per second of the command's wall clock (process start to exit;
   the manifest's own `stats.tokens_per_second`, which starts after imports and vocab loading,
   is reported too). The peer, measured in the same run on the same sentences (every sentence
   of the first corpus, batches of `--raw_batch` sentences, add_special_tokens=False): the
   `tokenizers` library's raw batch encoding with its default thread parallelism (rayon, all
   cores): `Tokenizer.encode_batch` and, where the library has it, `encode_batch_fast`. Only
   the encode calls are timed (also reported: the rate including `[e.ids for e in out]`, the
   Python lists any user needs). Each raw rate is measured once before and once after the
   first preparation; their mean is the peer. Goal: prepare / raw >= 0.8.
2. Peak memory while preparing each corpus: the preparation's process tree (the command, its
   worker processes and multiprocessing's resource tracker) is polled every `--poll_s` through
   /proc; the peak of the tree's summed RSS is the figure (the peak of the summed PSS, which
   counts shared pages once, and the largest single process's max RSS from wait4 are reported
   too), with a timeline of the tree's RSS (the maximum of every 5 s). Goal: 500 MB peak within
   20% of the 50 MB one.
3. Training start-up: `python -m mobilebert_jax.main` (the demo config, `teacher_pretrain` only,
   2 steps, logging every step) on each prepared corpus (`--config.data.max_seq_length=128`, the
   length the corpora were prepared with; the demo models have 128 positions), from launch to
   the first line of `<workdir>/metrics.jsonl` (the first step's metrics); `--startup_repeats`
   alternating runs per corpus, median. The data part alone is measured too: a fresh process
   that imports the data package, builds `PretrainingDataset` and takes one batch. Goal: 500 MB
   within 10% of 50 MB.
4. Loader throughput: a child process pinned to CPU 0 (`os.sched_setaffinity`), grain in that
   process (`num_workers=0`), batches of `--loader_batch` with dynamic MLM masking, sequences
   per second over `--loader_seconds` after 3 warm-up batches: at max_seq_length 128 with 20
   predictions (from the first corpus prepared at 128) and at 512 with 76 and with 20
   predictions (the first corpus prepared again at 512). Goal: >= 2000 sequences/s. The
   pipeline's grain options as shipped, and as a what-if grain's defaults (`ReadOptions()`: 16
   read-ahead threads, 500 elements buffered; the elements here are whole batches). Then the
   loader's memory with a slow consumer (a pause of `--step_s` after each batch, standing for a
   training step, over 2 x `--loader_seconds`) at 512, both ways: RSS after the warm-up and at
   the end.

`--profile` adds cProfile runs (children, one core each): `prepare.prepare_shard` on the first
shard-sized chunk of the first corpus as a worker runs it (TOKENIZERS_PARALLELISM=false), and
`BatchBuilder.__call__` (20 batches) at 128 and 512; the top functions by own time go to the
table and the JSON.

The JSON (`--out`) holds the settings, the machine (CPU model from /proc/cpuinfo, cores,
library versions, cores busy before the run, the git commit and the sha256 of the data package's
files as run), every figure above with its raw values, the ratios against the goals and the
run's wall time.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

from benchmarks.reporting import write_report

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Smoke run: corpora of 4 and 16 MB, 4 MB shards, one start-up "
                  "run per corpus, 3 s per loader case (overrides --sizes_mb, --shard_size_mb, "
                  "--startup_repeats and --loader_seconds).")
flags.DEFINE_list("sizes_mb", ["50", "500"], "Synthetic corpus sizes in MB (1e6 bytes); the "
                  "first is the throughput corpus, the memory and start-up goals compare the "
                  "last with the first.")
flags.DEFINE_float("shard_size_mb", 8.0, "prepare --shard_size_mb (the CLI's default).")
flags.DEFINE_integer("num_workers", 0, "prepare --num_workers (0: the usable cores).")
flags.DEFINE_integer("raw_batch", 2048, "Sentences per raw encode_batch call (prepare's own "
                     "batch, mobilebert_jax.data.prepare.SENTENCE_BATCH).")
flags.DEFINE_float("poll_s", 0.1, "Memory polling interval of the preparation's process tree.")
flags.DEFINE_integer("startup_repeats", 2, "Training start-up runs per corpus (alternating).")
flags.DEFINE_integer("startup_timeout_s", 300, "Give up on a training start-up run after this.")
flags.DEFINE_integer("loader_batch", 256, "Loader batch size (sequences).")
flags.DEFINE_float("loader_seconds", 10.0, "Timed seconds per loader case.")
flags.DEFINE_float("step_s", 0.1, "The slow consumer's pause per batch (a training step): the "
                   "loader's memory while grain reads ahead, over 2 x --loader_seconds.")
flags.DEFINE_bool("profile", False, "Also cProfile prepare_shard and BatchBuilder.__call__.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic corpora.")
flags.DEFINE_list("doc_parts", ["1", "32"], "A synthetic document joins a uniform random number "
                  "in this inclusive range of shipped documents (about 150 tokens each).")
flags.DEFINE_string("tmpdir", "", "Where to put corpora and prepared data (default: a new "
                    "temporary directory under $TMPDIR).")
flags.DEFINE_bool("keep", False, "Keep the temporary directory.")
flags.DEFINE_float("wait_idle_s", 0.0, "Before starting, wait up to this long for the machine to "
                   "go idle (under 0.2 cores busy).")
flags.DEFINE_string("out", "data_pipeline.json", "JSON report path ('' to skip).")

GOALS = {"prepare_over_raw": 0.8, "memory_tolerance": 0.20, "startup_tolerance": 0.10,
         "loader_seq_per_s": 2000.0}
PREP_LENGTH = 128  # the length of the throughput / memory / start-up corpora
TIMELINE_S = 5  # the RSS timeline's window (seconds)
GRAIN_DEFAULTS = (16, 500)  # grain.ReadOptions() defaults: read-ahead threads, buffered elements


def _options_label(options) -> str:
  if options is None:
    return "as shipped (the pipeline's own ReadOptions)"
  return f"num_threads={options[0]}, prefetch_buffer_size={options[1]} (grain's defaults)"


# ---------------------------------------------------------------------------------------------
# Machine and corpora.

def machine_info() -> dict:
  """CPU model and flags from /proc/cpuinfo, core counts, load and library versions."""
  import importlib.metadata as md
  cpu = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if ":" in line:
          key, value = (s.strip() for s in line.split(":", 1))
          if key in ("model name", "cpu family", "model", "stepping") and key not in cpu:
            cpu[key] = value
          if key == "flags" and "avx512" not in cpu:
            cpu["avx512"] = "avx512f" in value.split()
  except OSError:
    pass
  versions = {}
  for name in ("tokenizers", "grain", "array_record", "numpy", "jax", "transformers"):
    try:
      versions[name] = md.version(name)
    except md.PackageNotFoundError:
      versions[name] = None
  return {"platform": platform.platform(), "python": platform.python_version(),
          "cpu_model": cpu.get("model name"), "cpu_family": cpu.get("cpu family"),
          "cpu_model_number": cpu.get("model"), "avx512": cpu.get("avx512"),
          "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
          "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
          "load_average": list(os.getloadavg()), "versions": versions,
          "env": {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}}


def code_state() -> dict:
  """The git commit and the sha256 (12 hex digits) of the data package's files as run (the
  working tree may hold uncommitted changes)."""
  import hashlib
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = None
  files = {}
  data = os.path.join(root, "mobilebert_jax", "data")
  for name in sorted(os.listdir(data)):
    if name.endswith(".py"):
      with open(os.path.join(data, name), "rb") as f:
        files[name] = hashlib.sha256(f.read()).hexdigest()[:12]
  return {"git_commit": commit, "data_files_sha256": files}


def _machine_busy_s() -> float:
  """CPU seconds every core of the machine has been busy since boot (from /proc/stat)."""
  with open("/proc/stat") as f:
    values = [int(v) for v in f.readline().split()[1:]]
  return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
  import resource
  return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                              resource.getrusage(resource.RUSAGE_CHILDREN)))


class OthersMeter:
  """Cores kept busy by processes other than this run (machine-wide busy time minus this
  process's and its waited-for children's CPU time), per phase: how clean each figure is."""

  def __init__(self):
    self.phases: dict[str, float] = {}
    self._mark()

  def _mark(self):
    self.t, self.busy, self.own = time.perf_counter(), _machine_busy_s(), _own_cpu_s()

  def phase(self, name: str) -> None:
    t, busy, own = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
    others = max((busy - self.busy) - (own - self.own), 0.0) / max(t - self.t, 1e-9)
    self.phases[name] = round(others, 2)
    if others > 0.2:
      print(f"  warning: other processes kept {others:.2f} cores busy during {name}")
    self._mark()


def wait_idle(limit_s: float) -> float:
  """Waits (up to `limit_s`) until under 0.2 cores are busy; returns the last reading."""
  deadline = time.perf_counter() + limit_s
  busy = cpu_busy()
  while busy > 0.2 and time.perf_counter() < deadline:
    print(f"waiting for the machine to go idle ({busy} cores busy)")
    time.sleep(10)
    busy = cpu_busy()
  return busy


def cpu_busy(seconds: float = 1.0) -> float:
  """Cores busy machine-wide over `seconds` (from /proc/stat), before this run adds load."""
  def sample():
    with open("/proc/stat") as f:
      values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)
  busy0, total0 = sample()
  time.sleep(seconds)
  busy1, total1 = sample()
  return round((busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1), 2)


def read_documents(path: str) -> list[list[str]]:
  """The documents of a BERT-format text file (stripped sentences; blank lines separate)."""
  docs, current = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        current.append(line)
      elif current:
        docs.append(current)
        current = []
  if current:
    docs.append(current)
  return docs


def make_corpora(directory: str, sizes_mb: list[float], seed: int, parts: tuple[int, int]
                 ) -> list[dict]:
  """Writes one BERT-format file per size (the smaller ones prefixes of the largest): documents
  of `parts` (inclusive range, uniform) shipped documents drawn at random, each part's sentences
  in a random order."""
  import numpy as np
  from mobilebert_jax.data import sample_text_path
  docs = read_documents(str(sample_text_path()))
  rng = np.random.default_rng(seed)
  handles = []
  for size in sorted(sizes_mb):
    path = os.path.join(directory, f"corpus_{size:g}mb.txt")
    handles.append((int(size * 1e6), size, path, open(path, "w", encoding="utf-8")))
  start = time.perf_counter()
  out, written, n_docs = [], 0, 0
  while handles:
    lines = []
    for d in rng.integers(len(docs), size=int(rng.integers(parts[0], parts[1] + 1))):
      sentences = docs[d]
      lines.extend(sentences[i] for i in rng.permutation(len(sentences)))
    text = "\n".join(lines) + "\n\n"
    for _, _, _, f in handles:
      f.write(text)
    written += len(text.encode("utf-8"))
    n_docs += 1
    while handles and written >= handles[0][0]:
      _, size, path, f = handles.pop(0)
      f.close()
      out.append({"size_mb": size, "path": path, "bytes": os.path.getsize(path),
                  "documents": n_docs})
  listing = ", ".join(f"{c['size_mb']:g} MB ({c['documents']} documents)" for c in out)
  print(f"corpora: {listing} in {time.perf_counter() - start:.1f}s")
  return sorted(out, key=lambda c: sizes_mb.index(c["size_mb"]))


# ---------------------------------------------------------------------------------------------
# 1. Raw tokenizer rate.

def read_sentences(path: str) -> list[str]:
  return [s for doc in read_documents(path) for s in doc]


def raw_rate(tokenizer, method: str, sentences: list[str], batch: int) -> dict:
  """Tokens/s of `tokenizer.<method>` over every sentence, in batches (encode calls timed; the
  rate including the extraction of the id lists also reported)."""
  encode = getattr(tokenizer, method)
  import resource
  encode(sentences[:batch], add_special_tokens=False)  # warm-up (thread pool, caches)
  t_encode = t_ids = 0.0
  usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  tokens = 0
  for i in range(0, len(sentences), batch):
    t0 = time.perf_counter()
    out = encode(sentences[i:i + batch], add_special_tokens=False)
    t1 = time.perf_counter()
    ids = [e.ids for e in out]
    t2 = time.perf_counter()
    tokens += sum(map(len, ids))
    t_encode += t1 - t0
    t_ids += t2 - t1
  usage1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
  return {"method": method, "tokens": tokens, "sentences": len(sentences),
          "encode_s": round(t_encode, 3), "ids_s": round(t_ids, 3),
          "cores_busy": round(cpu / (wall1 - wall0), 2),
          "tokens_per_s": tokens / t_encode, "tokens_per_s_with_ids": tokens / (t_encode + t_ids)}


def raw_pass(path: str, batch: int) -> list[dict]:
  from mobilebert_jax.data import load_tokenizer, sample_vocab_path
  tokenizer = load_tokenizer(sample_vocab_path()).backend_tokenizer
  sentences = read_sentences(path)
  methods = ["encode_batch"] + (["encode_batch_fast"] if hasattr(tokenizer, "encode_batch_fast")
                                else [])
  out = []
  for method in methods:
    r = raw_rate(tokenizer, method, sentences, batch)
    print(f"  raw {method}: {r['tokens_per_s']:,.0f} tokens/s ({r['tokens']:,} tokens, "
          f"{r['encode_s']:.1f}s; with ids {r['tokens_per_s_with_ids']:,.0f}; "
          f"{r['cores_busy']} cores busy)")
    out.append(r)
  return out


# ---------------------------------------------------------------------------------------------
# 2. A child process with its tree's memory polled through /proc.

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
  kids: dict[int, list[int]] = collections.defaultdict(list)
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        stat = f.read()
    except OSError:
      continue
    ppid = int(stat[stat.rindex(")") + 2:].split()[1])
    kids[ppid].append(int(name))
  return kids


def process_tree(pid: int) -> list[int]:
  kids = _children_map()
  tree, i = [pid], 0
  while i < len(tree):
    tree.extend(kids.get(tree[i], ()))
    i += 1
  return tree


def _rss(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/statm") as f:
      return int(f.read().split()[1]) * _PAGE
  except (OSError, IndexError, ValueError):
    return 0


def _pss(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/smaps_rollup") as f:
      for line in f:
        if line.startswith("Pss:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError):
    pass
  return 0


def _name(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      args = f.read().split(b"\0")
  except OSError:
    return "?"
  text = " ".join(a.decode(errors="replace") for a in args if a)
  if "multiprocessing" in text and "resource_tracker" in text:
    return "resource_tracker"
  if "multiprocessing" in text or "spawn_main" in text:
    return "worker"
  return "main"


def run_monitored(cmd: list[str], log_path: str, poll_s: float, env=None) -> dict:
  """Runs `cmd`; returns its wall time, rc, CPU time (wait4) and the peak of its process tree's
  summed RSS / PSS, with the per-process RSS at the RSS peak."""
  peak = {"rss": 0, "pss": 0, "at_peak": [], "samples": 0, "max_processes": 0}
  timeline: dict[int, float] = {}  # window of `TIMELINE_S` seconds -> max tree RSS (MiB)
  done = threading.Event()
  with open(log_path, "w") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def poll():
      while not done.is_set():
        tree = process_tree(proc.pid)
        rss = {p: _rss(p) for p in tree}
        total = sum(rss.values())
        pss = sum(_pss(p) for p in tree)
        peak["samples"] += 1
        peak["max_processes"] = max(peak["max_processes"], len([v for v in rss.values() if v]))
        peak["pss"] = max(peak["pss"], pss)
        window = int((time.perf_counter() - start) // TIMELINE_S)
        timeline[window] = max(timeline.get(window, 0.0), round(total / 2**20, 1))
        if total > peak["rss"]:
          peak["rss"] = total
          peak["at_peak"] = sorted(((_name(p), round(v / 2**20, 1)) for p, v in rss.items() if v),
                                   key=lambda x: -x[1])
          peak["at_peak_s"] = round(time.perf_counter() - start, 2)
        done.wait(poll_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{tail}")
  cpu = usage.ru_utime + usage.ru_stime
  return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
          "cpu_utilisation": round(cpu / wall / len(os.sched_getaffinity(0)), 3),
          "peak_tree_rss_mib": round(peak["rss"] / 2**20, 1),
          "peak_tree_pss_mib": round(peak["pss"] / 2**20, 1),
          "max_single_process_rss_mib": round(usage.ru_maxrss / 1024, 1),
          "processes_at_rss_peak": peak["at_peak"], "rss_peak_at_s": peak.get("at_peak_s"),
          "max_processes": peak["max_processes"], "memory_samples": peak["samples"],
          "rss_timeline_mib": [[w * TIMELINE_S, v] for w, v in sorted(timeline.items())]}


def prepare_corpus(corpus: dict, output: str, length: int, workers: int, shard_mb: float,
                   log_dir: str) -> dict:
  """Runs the prepare command on `corpus` (monitored) and reads its manifest."""
  cmd = [sys.executable, "-m", "mobilebert_jax.data.prepare", f"--input={corpus['path']}",
         f"--output={output}", f"--max_seq_length={length}", f"--num_workers={workers}",
         f"--shard_size_mb={shard_mb:g}"]
  log_path = os.path.join(log_dir, f"prepare_{corpus['size_mb']:g}mb_{length}.log")
  result = run_monitored(cmd, log_path, FLAGS.poll_s)
  with open(os.path.join(output, "manifest.json")) as f:
    manifest = json.load(f)
  tokens = int(manifest["num_tokens"])
  result.update(
      size_mb=corpus["size_mb"], input_bytes=corpus["bytes"], max_seq_length=length,
      num_workers=workers, shard_size_mb=shard_mb, num_shards=len(manifest["shards"]),
      num_tokens=tokens, num_records=int(manifest["num_records"]),
      num_documents=int(manifest["num_documents"]),
      prepared_bytes=sum(int(s["size_bytes"]) for s in manifest["shards"]),
      tokens_per_s=tokens / result["wall_s"],
      manifest_seconds=manifest["stats"]["seconds"],
      manifest_tokens_per_s=manifest["stats"]["tokens_per_second"],
      shard_seconds=[s["seconds"] for s in manifest["shards"]],
      command=" ".join(cmd[1:]))
  print(f"  prepare {corpus['size_mb']:g} MB @{length}: {result['wall_s']:.1f}s, "
        f"{result['tokens_per_s']:,.0f} tokens/s ({tokens:,} tokens, {result['num_shards']} "
        f"shards, CPU {100 * result['cpu_utilisation']:.0f}%), peak tree RSS "
        f"{result['peak_tree_rss_mib']:.0f} MiB (PSS {result['peak_tree_pss_mib']:.0f})")
  return result


# ---------------------------------------------------------------------------------------------
# 3. Training start-up.

def training_startup(prepared_dir: str, workdir: str, log_path: str) -> dict:
  """Seconds from launching the trainer to the first line of its metrics.jsonl."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "mobilebert_jax.main", f"--workdir={workdir}",
         f"--config.data.prepared_dir={prepared_dir}",
         f"--config.data.max_seq_length={PREP_LENGTH}", "--config.stages=teacher_pretrain",
         "--config.teacher_pretrain.num_steps=2",
         "--config.teacher_pretrain.optimizer.warmup_steps=1", "--config.log_every_steps=1"]
  metrics = os.path.join(workdir, "metrics.jsonl")
  first = None
  with open(log_path, "w") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
      while first is None:
        if os.path.exists(metrics):
          with open(metrics) as f:
            if "\n" in f.read():
              first = time.perf_counter() - start
              break
        if proc.poll() is not None:
          break
        if time.perf_counter() - start > FLAGS.startup_timeout_s:
          break
        time.sleep(0.02)
      proc.wait(timeout=max(FLAGS.startup_timeout_s - (time.perf_counter() - start), 10))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    total = time.perf_counter() - start
  if first is None:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"training start-up on {prepared_dir} wrote no metrics (rc "
                       f"{proc.returncode}):\n{tail}")
  return {"first_metrics_s": round(first, 2), "process_s": round(total, 2),
          "returncode": proc.returncode, "command": " ".join(cmd[1:])}


def data_startup_child(spec: str) -> None:
  """(child) Import, PretrainingDataset construction and first batch times, as JSON."""
  start = time.perf_counter()
  spec = json.loads(spec)
  from mobilebert_jax.data import PretrainingDataset
  imported = time.perf_counter()
  ds = PretrainingDataset(dict(prepared_dir=spec["dir"], max_seq_length=spec["length"],
                               max_predictions_per_seq=10, batch_size=32, num_workers=0),
                          process_index=0, process_count=1)
  built = time.perf_counter()
  next(ds)
  first = time.perf_counter()
  print(json.dumps({"import_s": round(imported - start, 3), "dataset_s": round(built - imported, 3),
                    "first_batch_s": round(first - built, 3),
                    "total_s": round(first - start, 3), "num_examples": ds.num_examples}))


def run_child(function: str, spec: dict, env=None) -> dict:
  """Runs `function(json spec)` of this module in a fresh interpreter; returns its JSON line."""
  code = (f"import sys; from benchmarks.data_pipeline import {function}; "
          f"{function}(sys.argv[1])")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True,
                        text=True, cwd=root, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"{function} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# 4. Loader throughput.

def loader_child(spec: str) -> None:
  """(child, pinned to CPU 0) Sequences/s of PretrainingDataset with num_workers=0, as JSON."""
  spec = json.loads(spec)
  os.sched_setaffinity(0, {0})
  import resource
  from mobilebert_jax.data import PretrainingDataset
  if spec.get("read_options"):  # what-if: these grain ReadOptions instead of the pipeline's
    import grain
    to_iter = grain.MapDataset.to_iter_dataset
    threads, buffer = spec["read_options"]
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
    grain.MapDataset.to_iter_dataset = lambda self, *a, **k: to_iter(self, options)
  bs = spec["batch_size"]
  ds = PretrainingDataset(dict(prepared_dir=spec["dir"], max_seq_length=spec["length"],
                               max_predictions_per_seq=spec["predictions"], batch_size=bs,
                               num_workers=0), process_index=0, process_count=1)
  for _ in range(3):
    next(ds)
  if spec.get("step_s"):  # a slow consumer (a training step): memory of what grain buffers
    def rss():
      with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    rss0, start, k = rss(), time.perf_counter(), 0
    while time.perf_counter() - start < spec["seconds"]:
      next(ds)
      k += 1
      time.sleep(spec["step_s"])
    print(json.dumps({"batches": k, "seconds": round(time.perf_counter() - start, 2),
                      "rss_start_mib": round(rss0, 1), "rss_end_mib": round(rss(), 1),
                      "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return
  n = masked = tokens = 0
  start = time.perf_counter()
  while True:
    batch = next(ds)
    n += bs
    masked += float(batch["masked_lm_weights"].sum())
    tokens += int(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - start
    if elapsed >= spec["seconds"] and n >= 3 * bs:
      break
  print(json.dumps({"sequences": n, "seconds": round(elapsed, 3), "seq_per_s": n / elapsed,
                    "mean_predictions": masked / n, "mean_length": tokens / n,
                    "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "cpus": sorted(os.sched_getaffinity(0))}))


# ---------------------------------------------------------------------------------------------
# Profiles (--profile).

def _top(stats, n: int = 12) -> list[dict]:
  rows = []
  for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
    rows.append({"function": f"{os.path.basename(file)}:{line}({func})", "ncalls": ncalls,
                 "tottime_s": round(tottime, 3), "cumtime_s": round(cumtime, 3)})
  return sorted(rows, key=lambda r: -r["tottime_s"])[:n]


def profile_prepare_child(spec: str) -> None:
  """(child, CPU 0, TOKENIZERS_PARALLELISM=false) cProfile of prepare_shard on the first chunk."""
  import cProfile
  import pstats
  spec = json.loads(spec)
  os.sched_setaffinity(0, {0})
  from mobilebert_jax.data import prepare, sources
  vocab = prepare.VocabInfo.load(str(prepare.sample_vocab_path()), True)
  source = prepare.CorpusSource(input_files=spec["corpus"])
  # The first shard's chunk, as prepare_corpus cuts it (raw documents where the module reads
  # them so, else decoded ones).
  documents = (source.raw_documents() if hasattr(source, "raw_documents")
               else source.documents(sources.DecodeErrors()))
  docs, chars = next(prepare.chunk_documents(documents, int(spec["shard_size_mb"] * 2**20)))
  os.makedirs(spec["output"], exist_ok=True)
  # pylint: disable=protected-access
  job = prepare._ShardJob(vocab, spec["output"], spec["length"], 0.1, 1, 0, "profile",
                          parallel_tokenizer=False)
  prepare._tokenizer(job)
  # pylint: enable=protected-access
  profiler = cProfile.Profile()
  start = time.perf_counter()
  profiler.enable()
  info = prepare.prepare_shard(0, docs, job)
  profiler.disable()
  wall = time.perf_counter() - start
  stats = pstats.Stats(profiler)
  print(json.dumps({"what": "prepare.prepare_shard, one worker (one core)", "chars": chars,
                    "num_tokens": info["num_tokens"], "num_records": info["num_records"],
                    "wall_s": round(wall, 3), "tokens_per_s": info["num_tokens"] / wall,
                    "top": _top(stats)}))


def profile_loader_child(spec: str) -> None:
  """(child, CPU 0) cProfile of BatchBuilder.__call__ over 20 batches."""
  import cProfile
  import pstats
  spec = json.loads(spec)
  os.sched_setaffinity(0, {0})
  from mobilebert_jax.data import PretrainingDataset
  ds = PretrainingDataset(dict(prepared_dir=spec["dir"], max_seq_length=spec["length"],
                               max_predictions_per_seq=spec["predictions"],
                               batch_size=spec["batch_size"], num_workers=0),
                          process_index=0, process_count=1)
  builder = ds.builder
  builder(0)
  profiler = cProfile.Profile()
  start = time.perf_counter()
  profiler.enable()
  for step in range(1, 21):
    builder(step)
  profiler.disable()
  wall = time.perf_counter() - start
  print(json.dumps({"what": f"BatchBuilder.__call__ x20, length {spec['length']}, "
                    f"{spec['predictions']} predictions, batch {spec['batch_size']}",
                    "wall_s": round(wall, 3), "seq_per_s": 20 * spec["batch_size"] / wall,
                    "top": _top(pstats.Stats(profiler))}))


# ---------------------------------------------------------------------------------------------

def _within(a: float, b: float) -> float:
  """Relative difference of a against b."""
  return (a - b) / b


def print_report(r: dict) -> None:
  g = GOALS
  m = r["machine"]
  print()
  print(f"machine: {m['cpu_model']} (family {m['cpu_family']} model {m['cpu_model_number']}), "
        f"{m['usable_cpus']} usable of {m['cpu_count']} cores, {m['memory_gib']} GiB; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
  t = r["throughput"]
  print(f"\ncores kept busy by other processes, per phase: {r['others_cores_busy']}")
  print("\n1. preparation throughput (tokens/s) against the raw tokenizer (all cores)")
  raw = t["raw"]
  print("| what | tokens/s | " + " | ".join(f"/ raw {m}" for m in raw) + " |")
  print("|---|---|" + "---|" * len(raw))
  for method, v in raw.items():
    print(f"| raw {method}, mean of {len(v['passes'])} passes | {v['tokens_per_s']:,.0f} |"
          + " |" * len(raw))
  for p in r["prepare"]:
    for label, rate in (("command", p["tokens_per_s"]), ("manifest", p["manifest_tokens_per_s"])):
      print(f"| prepare {p['size_mb']:g} MB @{p['max_seq_length']} ({p['num_shards']} shards, "
            f"{label}) | {rate:,.0f} | "
            + " | ".join(f"{rate / v['tokens_per_s']:.2f}" for v in raw.values()) + " |")
  first = next(iter(raw))
  print(f"goal prepare / raw >= {g['prepare_over_raw']}: {t['ratio'][first]:.2f} against "
        f"{first} ({'met' if t['ratio'][first] >= g['prepare_over_raw'] else 'missed'})")
  print("\n2. peak memory while preparing (MiB)")
  print("| corpus | tree RSS | tree PSS | largest process | processes at peak |")
  print("|---|---|---|---|---|")
  for p in r["prepare"]:
    print(f"| {p['size_mb']:g} MB @{p['max_seq_length']} | {p['peak_tree_rss_mib']:.0f} | "
          f"{p['peak_tree_pss_mib']:.0f} | {p['max_single_process_rss_mib']:.0f} | "
          f"{p['processes_at_rss_peak']} |")
  mem = r["memory"]
  for p in r["prepare"]:
    print(f"tree RSS timeline {p['size_mb']:g} MB @{p['max_seq_length']} (max per "
          f"{TIMELINE_S} s): " + " ".join(f"{v:.0f}" for _, v in p["rss_timeline_mib"]))
  print(f"largest / smallest corpus tree RSS: {mem['change']:+.1%} "
        f"({'met' if abs(mem['change']) <= g['memory_tolerance'] else 'missed'}, goal within "
        f"{g['memory_tolerance']:.0%})")
  print("\n3. training start-up (s, launch to first metrics line; median)")
  print("| corpus | start-up | runs | data only: import / dataset / first batch |")
  print("|---|---|---|---|")
  for s in r["startup"]:
    d = s["data_only"]
    print(f"| {s['size_mb']:g} MB | {s['median_s']:.2f} | {s['runs_s']} | "
          f"{d['import_s']:.2f} / {d['dataset_s']:.3f} / {d['first_batch_s']:.3f} |")
  st = r["startup_change"]
  print(f"largest / smallest corpus start-up: {st:+.1%} "
        f"({'met' if abs(st) <= g['startup_tolerance'] else 'missed'}, goal within "
        f"{g['startup_tolerance']:.0%})")
  print("\n4. loader throughput, one core, num_workers=0")
  print("| length | predictions | grain read options | batch | mean length | sequences/s | "
        "max RSS MiB | goal >= 2000 |")
  print("|---|---|---|---|---|---|---|---|")
  for l in r["loader"]:
    print(f"| {l['length']} | {l['predictions']} | {l['grain_read_options']} | "
          f"{l['batch_size']} | {l['mean_length']:.0f} | {l['seq_per_s']:,.0f} | "
          f"{l['max_rss_mib']:.0f} | "
          f"{'met' if l['seq_per_s'] >= g['loader_seq_per_s'] else 'missed'} |")
  print(f"\nloader memory with a slow consumer (pause per batch, batch "
        f"{r['settings']['loader_batch']}, length 512, 76 predictions)")
  print("| grain read options | pause s | batches | RSS after warm-up MiB | RSS at end MiB |")
  print("|---|---|---|---|---|")
  for l in r["loader_slow_consumer"]:
    print(f"| {l['grain_read_options']} | {l['step_s']} | {l['batches']} | "
          f"{l['rss_start_mib']:.0f} | {l['rss_end_mib']:.0f} |")
  for p in r.get("profiles", []):
    print(f"\nprofile: {p['what']}: {p['wall_s']:.2f}s")
    for row in p["top"]:
      print(f"  {row['tottime_s']:7.3f}s own {row['cumtime_s']:7.3f}s cum {row['ncalls']:>8} "
            f"{row['function']}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  run_start = time.perf_counter()
  if FLAGS.quick:
    sizes = [4.0, 16.0]
    shard_mb, startup_repeats, loader_seconds = 4.0, 1, 3.0
    slow_seconds = 2 * loader_seconds
  else:
    sizes = [float(s) for s in FLAGS.sizes_mb]
    shard_mb, startup_repeats = FLAGS.shard_size_mb, FLAGS.startup_repeats
    loader_seconds = FLAGS.loader_seconds
  slow_seconds = 2 * loader_seconds
  workers = FLAGS.num_workers or len(os.sched_getaffinity(0))
  parts = (int(FLAGS.doc_parts[0]), int(FLAGS.doc_parts[-1]))
  machine = machine_info()
  tmp = FLAGS.tmpdir or tempfile.mkdtemp(prefix="mbj_data_bench_")
  os.makedirs(tmp, exist_ok=True)
  print(f"working in {tmp}")
  machine["cores_busy_before"] = wait_idle(FLAGS.wait_idle_s)
  machine["code"] = code_state()
  if machine["cores_busy_before"] > 0.2:
    print(f"warning: {machine['cores_busy_before']} cores busy before the run: other processes "
          "are running, the figures will be low and noisy")
  report = {"benchmark": "data_pipeline", "machine": machine, "goals": GOALS,
            "settings": {"quick": FLAGS.quick, "sizes_mb": sizes, "shard_size_mb": shard_mb,
                         "num_workers": workers, "raw_batch": FLAGS.raw_batch,
                         "prepare_max_seq_length": PREP_LENGTH, "poll_s": FLAGS.poll_s,
                         "startup_repeats": startup_repeats, "loader_batch": FLAGS.loader_batch,
                         "loader_seconds": loader_seconds, "seed": FLAGS.seed,
                         "doc_parts": list(parts)}}
  try:
    corpora = make_corpora(tmp, sizes, FLAGS.seed, parts)
    report["corpora"] = [{k: c[k] for k in ("size_mb", "bytes", "documents")} for c in corpora]
    first = corpora[0]
    prepared = {}
    others = OthersMeter()
    report["others_cores_busy"] = others.phases

    # 1 + 2: raw peer before and after the first preparation; each preparation monitored.
    print("1. raw tokenizer rate, pass 1")
    raw_passes = [raw_pass(first["path"], FLAGS.raw_batch)]
    others.phase("raw pass 1")
    print("1./2. preparation")
    prep_rows = []
    out = os.path.join(tmp, f"prepared_{first['size_mb']:g}mb_{PREP_LENGTH}")
    prep_rows.append(prepare_corpus(first, out, PREP_LENGTH, workers, shard_mb, tmp))
    prepared[first["size_mb"]] = out
    others.phase(f"prepare {first['size_mb']:g} MB")
    print("1. raw tokenizer rate, pass 2")
    raw_passes.append(raw_pass(first["path"], FLAGS.raw_batch))
    others.phase("raw pass 2")
    for corpus in corpora[1:]:
      out = os.path.join(tmp, f"prepared_{corpus['size_mb']:g}mb_{PREP_LENGTH}")
      prep_rows.append(prepare_corpus(corpus, out, PREP_LENGTH, workers, shard_mb, tmp))
      prepared[corpus["size_mb"]] = out
      others.phase(f"prepare {corpus['size_mb']:g} MB")
    out512 = os.path.join(tmp, f"prepared_{first['size_mb']:g}mb_512")
    prep_rows.append(prepare_corpus(first, out512, 512, workers, shard_mb, tmp))
    others.phase(f"prepare {first['size_mb']:g} MB @512")
    report["prepare"] = prep_rows

    raw = {}
    for i, method in enumerate(r["method"] for r in raw_passes[0]):
      runs = [p[i] for p in raw_passes]
      raw[method] = {"tokens_per_s": sum(r["tokens_per_s"] for r in runs) / len(runs),
                     "tokens_per_s_with_ids":
                         sum(r["tokens_per_s_with_ids"] for r in runs) / len(runs),
                     "passes": runs}
    prep_rate = prep_rows[0]["tokens_per_s"]
    report["throughput"] = {
        "prepare_tokens_per_s": prep_rate,
        "prepare_manifest_tokens_per_s": prep_rows[0]["manifest_tokens_per_s"],
        "raw": raw,
        "ratio": {m: prep_rate / v["tokens_per_s"] for m, v in raw.items()},
        "ratio_manifest": {m: prep_rows[0]["manifest_tokens_per_s"] / v["tokens_per_s"]
                           for m, v in raw.items()},
        "ratio_largest_corpus": {m: prep_rows[len(corpora) - 1]["tokens_per_s"]
                                 / v["tokens_per_s"] for m, v in raw.items()},
    }
    small, large = prep_rows[0], prep_rows[len(corpora) - 1]
    report["memory"] = {
        "smallest_mib": small["peak_tree_rss_mib"], "largest_mib": large["peak_tree_rss_mib"],
        "change": _within(large["peak_tree_rss_mib"], small["peak_tree_rss_mib"]),
        "change_pss": _within(large["peak_tree_pss_mib"], small["peak_tree_pss_mib"])}

    # 3: training start-up, alternating corpora.
    report["load_average_before_startup"] = list(os.getloadavg())
    print("3. training start-up")
    runs = collections.defaultdict(list)
    for rep in range(startup_repeats):
      for corpus in corpora:
        res = training_startup(prepared[corpus["size_mb"]], os.path.join(tmp, "workdir"),
                               os.path.join(tmp, f"train_{corpus['size_mb']:g}mb_{rep}.log"))
        print(f"  {corpus['size_mb']:g} MB run {rep}: first metrics after "
              f"{res['first_metrics_s']:.2f}s (process {res['process_s']:.1f}s)")
        runs[corpus["size_mb"]].append(res)
    startup = []
    for corpus in corpora:
      values = sorted(r["first_metrics_s"] for r in runs[corpus["size_mb"]])
      median = (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2
      data_only = run_child("data_startup_child", {"dir": prepared[corpus["size_mb"]],
                                                   "length": PREP_LENGTH})
      startup.append({"size_mb": corpus["size_mb"], "median_s": median,
                      "runs_s": [r["first_metrics_s"] for r in runs[corpus["size_mb"]]],
                      "runs": runs[corpus["size_mb"]], "data_only": data_only})
    report["startup"] = startup
    others.phase("training start-up")
    report["startup_change"] = _within(startup[-1]["median_s"], startup[0]["median_s"])

    # 4: loader.
    print("4. loader throughput")
    loader = []
    # None: the ReadOptions mobilebert_jax.data.pipeline passes itself; GRAIN_DEFAULTS: what
    # grain does without them (ReadOptions() = 16 read-ahead threads, 500 elements buffered).
    cases = [(128, 20, None), (512, 76, None), (512, 20, None), (128, 20, GRAIN_DEFAULTS),
             (512, 76, GRAIN_DEFAULTS)]
    for length, predictions, options in cases:
      directory = prepared[first["size_mb"]] if length == PREP_LENGTH else out512
      res = run_child("loader_child", {"dir": directory, "length": length,
                                       "predictions": predictions,
                                       "batch_size": FLAGS.loader_batch,
                                       "seconds": loader_seconds, "read_options": options})
      res.update(length=length, predictions=predictions, batch_size=FLAGS.loader_batch,
                 grain_read_options=_options_label(options))
      print(f"  {length} / {predictions} predictions, grain {res['grain_read_options']}: "
            f"{res['seq_per_s']:,.0f} sequences/s (mean length {res['mean_length']:.0f}, "
            f"{res['mean_predictions']:.1f} predictions, max RSS {res['max_rss_mib']:.0f} MiB)")
      loader.append(res)
    report["loader"] = loader
    slow = []
    for options in (None, GRAIN_DEFAULTS):
      res = run_child("loader_child", {"dir": out512, "length": 512, "predictions": 76,
                                       "batch_size": FLAGS.loader_batch, "seconds": slow_seconds,
                                       "step_s": FLAGS.step_s, "read_options": options})
      res.update(length=512, predictions=76, batch_size=FLAGS.loader_batch, step_s=FLAGS.step_s,
                 grain_read_options=_options_label(options))
      print(f"  slow consumer ({FLAGS.step_s}s a step), grain {res['grain_read_options']}: RSS "
            f"{res['rss_start_mib']:.0f} -> {res['rss_end_mib']:.0f} MiB over {res['batches']} "
            "batches")
      slow.append(res)
    report["loader_slow_consumer"] = slow
    others.phase("loader")

    if FLAGS.profile:
      print("profiles")
      env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
      profiles = [run_child("profile_prepare_child",
                            {"corpus": first["path"], "shard_size_mb": shard_mb,
                             "length": PREP_LENGTH, "output": os.path.join(tmp, "profile")},
                            env=env)]
      for length, predictions, directory in ((128, 20, prepared[first["size_mb"]]),
                                             (512, 76, out512)):
        profiles.append(run_child("profile_loader_child",
                                  {"dir": directory, "length": length,
                                   "predictions": predictions,
                                   "batch_size": FLAGS.loader_batch}))
      report["profiles"] = profiles
      others.phase("profiles")
  finally:
    if FLAGS.keep:
      print(f"kept {tmp}")
    else:
      shutil.rmtree(tmp, ignore_errors=True)

  report["machine"]["load_average_end"] = list(os.getloadavg())
  report["wall_s"] = round(time.perf_counter() - run_start, 1)
  print_report(report)
  if FLAGS.out:
    write_report(FLAGS.out, report)


if __name__ == "__main__":
  app.run(main)
