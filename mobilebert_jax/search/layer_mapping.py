"""Layer-mapping search for TinyBERT general distillation (Jiao et al., 2020): a genetic algorithm.

A layer mapping assigns each of the M student layers a teacher layer in 1..N (the `layer_mapping`
of a `tinybert` stage, e.g. "2,4,7,10"). The search has two parts:

* `genetic_search`: the GA itself, pure Python/numpy and deterministic given its seed. The first
  population is the uniform mapping, the `initial` ones and random ones; every generation keeps the
  `elite` best, and fills up with children of tournament-selected parents (one-point or uniform
  crossover, then per-layer mutation that moves a layer to a neighbouring or a random other teacher
  layer). With `monotone=True` every individual is repaired (sorted) into a non-decreasing mapping,
  `monotone=False` searches free mappings. Higher scores are better; no mapping is scored twice
  (a `cache` of mapping -> score is reused and filled, so a search resumes).
* `ProxyScorer`: the proxy setting that scores one mapping: a short TinyBERT general distillation
  on a sample of the corpus, then short fine-tunings on a few GLUE tasks, each a run of the
  project's `Trainer` in `workdir/mapping_<2-4-7-10>/`; the score is the mean of the tasks' dev
  scores. Finished mapping runs are reused by a rerun.

    python -m mobilebert_jax.search.layer_mapping --config=configs/layer_mapping_search.py \
        --workdir=DIR --config.teacher_checkpoint=BERT_BASE_DIR --config.proxy.data_dir=GLUE_DIR

writes `DIR/layer_mapping.json` ({"layer_mapping": "2,4,7,10", "score", "history", "scores", ...},
rewritten after every generation); the full distillation then reads the mapping with
`--config.general.layer_mapping=2,4,7,10` (configs/tinybert_general_distill.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import ml_collections
import numpy as np
from etils import epath

from mobilebert_jax import data as data_lib
from mobilebert_jax.data.records import write_json, write_text_atomic
from mobilebert_jax.default_config import optimizer
from mobilebert_jax.downstream import get_task, glue_score
from mobilebert_jax.objectives.tinybert import parse_layer_mapping, uniform_layer_mapping
from mobilebert_jax.pretrained import checkpoint_config
from mobilebert_jax.stages import Trainer, model_config, stage_names

log = logging.getLogger("mobilebert_jax")

LayerMapping = tuple[int, ...]
CROSSOVERS = ("one_point", "uniform")
RESULT_FILE = "layer_mapping.json"
SCORE_FILE = "score.json"
CORPUS_FILE = "proxy_corpus.txt"
RUN_PREFIX = "mapping_"
FINETUNE_STAGE = "finetune"
# The keys of the config blocks the search reads (`config.ga`, `config.proxy`).
GA_KEYS = ("population_size", "generations", "monotone", "mutation_rate", "crossover_rate",
           "crossover", "elite", "tournament_size", "seed", "initial")
PROXY_KEYS = ("num_steps", "corpus_documents", "tasks", "data_dir", "finetune_steps",
              "finetune_batch_size", "finetune_learning_rate", "finetune_warmup_fraction",
              "cleanup")


# ----------------------------------------------------------------------------- mappings


def format_layer_mapping(mapping: Sequence[int]) -> str:
  """The comma string `parse_layer_mapping` and a stage's `layer_mapping` read: "2,4,7,10"."""
  values = list(mapping)
  if not values:
    raise ValueError("layer mapping is empty")
  for i, g in enumerate(values):
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)):
      raise ValueError(f"layer mapping {mapping!r}: entry {i} ({g!r}) is not an int")
  return ",".join(str(int(g)) for g in values)


def _order(monotone: bool) -> str:
  return "nondecreasing" if monotone else "any"


def _repair(genes: Iterable[int], monotone: bool) -> LayerMapping:
  """A valid individual: sorted (non-decreasing) in monotone mode, as is otherwise."""
  genes = [int(g) for g in genes]
  return tuple(sorted(genes)) if monotone else tuple(genes)


def random_mapping(rng: np.random.Generator, num_student_layers: int, num_teacher_layers: int,
                   monotone: bool = True) -> LayerMapping:
  """A random mapping: every student layer draws a teacher layer uniformly (sorted if monotone)."""
  return _repair(rng.integers(1, num_teacher_layers + 1, size=num_student_layers), monotone)


def _move(g: int, rng: np.random.Generator, num_teacher_layers: int) -> int:
  """Another teacher layer for one student layer: a neighbour (half the time) or any other."""
  if num_teacher_layers == 1:
    return g
  if rng.random() < 0.5:
    step = 1 if rng.random() < 0.5 else -1
    return g + step if 1 <= g + step <= num_teacher_layers else g - step
  other = int(rng.integers(1, num_teacher_layers))
  return other + (other >= g)


def mutate(mapping: Sequence[int], rng: np.random.Generator, num_teacher_layers: int,
           rate: float, monotone: bool = True) -> LayerMapping:
  """Moves each student layer, with probability `rate`, to another teacher layer (at least one
  layer when `rate` > 0); then repairs."""
  moved = rng.random(len(mapping)) < rate
  if rate > 0 and not moved.any():
    moved[rng.integers(len(mapping))] = True
  genes = [_move(g, rng, num_teacher_layers) if m else g for g, m in zip(mapping, moved)]
  return _repair(genes, monotone)


def crossover(a: Sequence[int], b: Sequence[int], rng: np.random.Generator,
              kind: str = "one_point", monotone: bool = True) -> LayerMapping:
  """One-point (a's layers up to a random cut, then b's) or uniform (a coin per layer)
  crossover of two parents; the child is repaired."""
  if kind not in CROSSOVERS:
    raise ValueError(f"crossover must be one of {CROSSOVERS}, got {kind!r}")
  if len(a) < 2:
    return _repair(a, monotone)
  if kind == "one_point":
    cut = int(rng.integers(1, len(a)))
    return _repair(tuple(a[:cut]) + tuple(b[cut:]), monotone)
  take_a = rng.random(len(a)) < 0.5
  return _repair([x if t else y for x, y, t in zip(a, b, take_a)], monotone)


# ----------------------------------------------------------------------------- the GA


@dataclasses.dataclass
class SearchResult:
  """What `genetic_search` found.

  best_mapping / best_score: the best mapping scored (ties: the first scored).
  history: one record per generation (0 = the initial population): the best so far, the
    generation's best and mean score, how many mappings were scored so far and how many
    `score_fn` calls the generation made.
  scores: every mapping this search scored (from `score_fn` or the cache), in scoring order.
  num_evaluations: calls to `score_fn` (the rest came from the cache).
  """
  best_mapping: LayerMapping
  best_score: float
  history: list[dict]
  scores: dict[LayerMapping, float]
  num_evaluations: int

  @property
  def layer_mapping(self) -> str:
    """The best mapping as the comma string a `tinybert` stage's `layer_mapping` reads."""
    return format_layer_mapping(self.best_mapping)

  def to_json(self) -> dict:
    """A JSON-ready dict (mappings as comma strings)."""
    return {"layer_mapping": self.layer_mapping, "score": self.best_score,
            "history": self.history, "num_evaluations": self.num_evaluations,
            "scores": {format_layer_mapping(m): s for m, s in self.scores.items()}}


def _check_search_args(population_size, generations, mutation_rate, crossover_rate, crossover_kind,
                       elite, tournament_size) -> None:
  def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
  for name, value, low in (("population_size", population_size, 2), ("generations", generations, 0),
                           ("elite", elite, 0), ("tournament_size", tournament_size, 1)):
    if not is_int(value) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  if elite >= population_size:
    raise ValueError(f"elite={elite} must be smaller than population_size={population_size} "
                     "(otherwise no child is ever bred)")
  for name, value in (("mutation_rate", mutation_rate), ("crossover_rate", crossover_rate)):
    if not 0.0 <= float(value) <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {value!r}")
  if crossover_kind not in CROSSOVERS:
    raise ValueError(f"crossover must be one of {CROSSOVERS}, got {crossover_kind!r}")


def genetic_search(score_fn: Callable[[LayerMapping], float], num_student_layers: int,
                   num_teacher_layers: int, *, population_size: int = 16, generations: int = 10,
                   monotone: bool = True, mutation_rate: float = 0.15, crossover_rate: float = 0.8,
                   crossover_kind: str = "one_point", elite: int = 2, tournament_size: int = 4,
                   seed: int = 0, initial: Iterable[Any] = (),
                   cache: Optional[dict[LayerMapping, float]] = None,
                   log_fn: Optional[Callable[[dict], None]] = None) -> SearchResult:
  """Searches layer mappings (tuples of M teacher layers in 1..N) for the highest `score_fn`.

  Generation 0 is the uniform mapping, the `initial` mappings (anything `parse_layer_mapping`
  reads) and random ones, `population_size` in all; each of the `generations` that follow keeps
  the `elite` best and breeds the rest: two tournament winners (`tournament_size` drawn at
  random), crossover with probability `crossover_rate`, then mutation of each student layer with
  probability `mutation_rate` (at least one layer moves). A child already in the new generation
  or scored before is bred again (a few tries, then a random mapping is drawn). `score_fn` is
  called once per distinct mapping: scores are looked up in, and added to, `cache` (tuple ->
  score). `log_fn(record)` gets every generation's
  history record. Deterministic given `seed` (the cache changes no decision).
  """
  _check_search_args(population_size, generations, mutation_rate, crossover_rate, crossover_kind,
                     elite, tournament_size)
  order = _order(monotone)
  uniform = uniform_layer_mapping(num_student_layers, num_teacher_layers)
  seeds: list[LayerMapping] = []
  for value in (uniform, *initial):
    mapping = parse_layer_mapping(value, num_student_layers, num_teacher_layers, order=order)
    if mapping not in seeds:
      seeds.append(mapping)
  if len(seeds) > population_size:
    raise ValueError(f"{len(seeds)} initial mappings (the uniform one included) do not fit a "
                     f"population of {population_size}")
  rng = np.random.default_rng(seed)
  cache = {} if cache is None else cache
  scores: dict[LayerMapping, float] = {}
  calls = 0

  def evaluate(mapping: LayerMapping) -> float:
    nonlocal calls
    if mapping not in scores:
      if mapping in cache:
        value = float(cache[mapping])
      else:
        value = float(score_fn(mapping))
        calls += 1
        if math.isnan(value):
          raise ValueError(f"score_fn returned NaN for layer mapping "
                           f"{format_layer_mapping(mapping)}")
        cache[mapping] = value
      scores[mapping] = value
    return scores[mapping]

  def fresh(population: list[LayerMapping], make: Callable[[], LayerMapping]) -> LayerMapping:
    """An individual neither in `population` nor scored before, when a few tries find one."""
    for _ in range(10):
      child = make()
      if child not in population and child not in scores:
        return child
    child = random_mapping(rng, num_student_layers, num_teacher_layers, monotone)
    return child if child not in population else make()

  def tournament(population: list[LayerMapping]) -> LayerMapping:
    drawn = rng.integers(0, len(population), size=tournament_size)
    return population[max(drawn, key=lambda i: (scores[population[i]], -i))]

  def breed(population: list[LayerMapping]) -> LayerMapping:
    a, b = tournament(population), tournament(population)
    child = crossover(a, b, rng, crossover_kind, monotone) if rng.random() < crossover_rate else a
    return mutate(child, rng, num_teacher_layers, mutation_rate, monotone)

  population = list(seeds)
  while len(population) < population_size:
    population.append(fresh(population, lambda: random_mapping(
        rng, num_student_layers, num_teacher_layers, monotone)))

  history: list[dict] = []
  for generation in range(generations + 1):
    if generation > 0:
      ranked = sorted(range(len(population)), key=lambda i: (-scores[population[i]], i))
      parents, population = population, []
      for i in ranked:
        if len(population) < elite and parents[i] not in population:
          population.append(parents[i])
      while len(population) < population_size:
        population.append(fresh(population, lambda: breed(parents)))
    calls_before = calls
    values = [evaluate(m) for m in population]
    best = max(scores, key=scores.get)  # the first scored among equals
    record = {"generation": generation, "best_layer_mapping": format_layer_mapping(best),
              "best_score": scores[best], "generation_best_score": max(values),
              "mean_score": float(np.mean(values)), "scored": len(scores),
              "new_evaluations": calls - calls_before}
    history.append(record)
    log.info("layer-mapping search: generation %d/%d: best %s (score %.4g), generation best "
             "%.4g, mean %.4g; %d mappings scored (%d new)", generation, generations,
             record["best_layer_mapping"], record["best_score"], record["generation_best_score"],
             record["mean_score"], record["scored"], record["new_evaluations"])
    if log_fn is not None:
      log_fn(record)
  best = max(scores, key=scores.get)
  return SearchResult(best_mapping=best, best_score=scores[best], history=history,
                      scores=dict(scores), num_evaluations=calls)


# ----------------------------------------------------------------------------- the proxy setting


def check_block(block: Any, keys: Sequence[str], where: str) -> None:
  """Raises ValueError naming unknown or missing keys of a config block."""
  if block is None:
    raise ValueError(f"{where} is missing; it needs the keys {list(keys)}")
  unknown = sorted(set(block) - set(keys))
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {list(keys)}")
  missing = [k for k in keys if k not in block]
  if missing:
    raise ValueError(f"{where}: missing keys {missing}")


def parse_tasks(value: str, data_dir: str = "") -> list[tuple[str, str]]:
  """Proxy tasks from "sst2,mnli" or "sst2=DIR,mnli": (registry name, GLUE data dir) pairs;
  entries without "=DIR" use `data_dir` (empty: tensorflow-datasets `glue/<task>`)."""
  out = []
  for entry in [e.strip() for e in str(value).split(",") if e.strip()]:
    name, _, directory = entry.partition("=")
    try:
      task = get_task(name.strip())
    except KeyError as e:
      raise ValueError(f"config.proxy.tasks={value!r}: {e.args[0]}") from None
    directory = directory.strip() or data_dir or ""
    if directory and not epath.Path(directory).is_dir():
      raise FileNotFoundError(f"config.proxy.tasks: the data directory {directory!r} of task "
                              f"{task.name!r} does not exist")
    if task.name in [t for t, _ in out]:
      raise ValueError(f"config.proxy.tasks={value!r} names {task.name!r} twice")
    out.append((task.name, directory))
  if not out:
    raise ValueError(f"config.proxy.tasks={value!r} names no task")
  return out


def task_score(task: str, results: Mapping[str, float]) -> Optional[float]:
  """A task's dev score from eval_results.json values: its GLUE score (the mean of its official
  metrics), averaged over its evaluation splits (MNLI: matched and mismatched); None if absent."""
  task = get_task(task)
  per_split = []
  for split in task.eval_splits:
    values = {m: results[f"{split}_{m}"] for m in task.metrics if f"{split}_{m}" in results}
    if len(values) == len(task.metrics):
      per_split.append(glue_score(task, values))
  return float(np.mean(per_split)) if per_split else None


class ProxyScorer:
  """Scores layer mappings in the proxy setting; `scorer(mapping) -> float` (higher is better).

  For mapping g, in `workdir/mapping_<g1-g2-...>/`: `distill/` runs the config's one `tinybert`
  stage with `layer_mapping=g` for `proxy.num_steps` steps (warm-up scaled by the same factor)
  on the corpus sample `workdir/proxy_corpus.txt` (`proxy.corpus_documents` documents drawn
  from the configured corpus, `data.input_files` before `data.tfds_name`; 0 = the whole
  corpus); then `<task>/` fine-tunes the distilled
  student on each proxy task for `proxy.finetune_steps` steps (AdamW,
  `proxy.finetune_learning_rate`, `proxy.finetune_warmup_fraction` warm-up) and evaluates it
  on the dev data. The score, the mean of the tasks' dev scores, goes to `score.json`; a mapping
  with one is not trained again, and unfinished runs resume (the trainer's own resume).
  Everything checkable is checked at construction, before any compute.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir if "://" in workdir else os.path.abspath(workdir)
    self.proxy = config.get("proxy", None)
    self.order = _order(bool(config.get("ga", {}).get("monotone", True)))
    check_block(self.proxy, PROXY_KEYS, "config.proxy")
    names = stage_names(config)
    if len(names) != 1 or config[names[0]].strategy != "tinybert":
      raise ValueError(f"the proxy runs one 'tinybert' general-distillation stage, but "
                       f"config.stages={config.stages!r} names "
                       f"{[(n, config[n].strategy) for n in names]}")
    self.stage = names[0]
    for key in ("num_steps", "finetune_steps", "finetune_batch_size"):
      value = self.proxy[key]
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.proxy.{key} must be an int >= 1, got {value!r}")
    docs = self.proxy.corpus_documents
    if isinstance(docs, bool) or not isinstance(docs, int) or docs < 0 or docs == 1:
      raise ValueError(f"config.proxy.corpus_documents must be 0 (the whole corpus) or an int "
                       f">= 2 (next-sentence pairs need two documents), got {docs!r}")
    if not 0.0 <= float(self.proxy.finetune_warmup_fraction) <= 1.0:
      raise ValueError(f"config.proxy.finetune_warmup_fraction must be in [0, 1], got "
                       f"{self.proxy.finetune_warmup_fraction!r}")
    teacher = config.teacher_checkpoint
    if not teacher:
      raise ValueError("config.teacher_checkpoint is empty: the proxy distils from a pretrained "
                       "teacher; pass --config.teacher_checkpoint=DIR (native or Hugging Face)")
    self.num_teacher_layers = checkpoint_config(teacher).num_layers
    self.num_student_layers = model_config(config.student, "config.student").num_layers
    self.tasks = parse_tasks(self.proxy.tasks, self.proxy.data_dir)
    self.corpus = self._sample_corpus()

  # -- paths and configs --------------------------------------------------------

  def run_dir(self, mapping: Sequence[int]) -> str:
    """The directory of one mapping's runs: workdir/mapping_2-4-7-10."""
    return os.path.join(self.workdir, RUN_PREFIX + format_layer_mapping(mapping).replace(",", "-"))

  def _base(self) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(self.config.to_dict())
    for key in ("ga", "proxy"):
      if key in c:
        del c[key]
    return c

  def distill_config(self, mapping: Sequence[int]) -> ml_collections.ConfigDict:
    """The short general distillation of `mapping` on the corpus sample."""
    c = self._base()
    stage = c[self.stage]
    steps, full_steps = int(self.proxy.num_steps), int(stage.num_steps)
    stage.num_steps = steps
    stage.layer_mapping = format_layer_mapping(mapping)
    with stage.unlocked():
      stage.layer_mapping_order = self.order
    warmup = int(stage.optimizer.warmup_steps)
    stage.optimizer.warmup_steps = min(steps, int(round(warmup * steps / full_steps)))
    if self.corpus is not None:
      c.data.input_files = self.corpus
    if c.data.input_files:  # text files take precedence over tfds_name
      c.data.update(dict(tfds_name="", max_documents=0, prepared_dir="", require_prepared=False))
    # Every mapping's run reads the same corpus, prepared once for the whole search.
    c.data.cache_dir = c.data.cache_dir or os.path.join(self.workdir, "prepared_data")
    return c

  def finetune_config(self, student_dir: str, task: str,
                      data_dir: str) -> ml_collections.ConfigDict:
    """The short fine-tuning of a distilled student on one proxy task."""
    c = self._base()
    c.stages = FINETUNE_STAGE
    c.task = task
    c.data_dir = data_dir
    c.init_checkpoint = student_dir
    c.teacher_checkpoint = ""
    c.student_checkpoint = ""
    c.data.batch_size = int(self.proxy.finetune_batch_size)
    steps = int(self.proxy.finetune_steps)
    opt = optimizer(learning_rate=float(self.proxy.finetune_learning_rate), warmup_steps=0)
    opt.optimizer = "adamw"
    c[FINETUNE_STAGE] = ml_collections.ConfigDict(dict(
        strategy="finetune", model="student", num_steps=steps, optimizer=opt,
        warmup_fraction=float(self.proxy.finetune_warmup_fraction)))
    return c

  def _sample_corpus(self) -> Optional[str]:
    """Writes `proxy.corpus_documents` documents of the corpus to workdir/proxy_corpus.txt once
    (`data.input_files`, else the shipped sample text: a seeded random sample in corpus order;
    `data.tfds_name`: its first documents); None = the whole corpus."""
    n = int(self.proxy.corpus_documents)
    if n == 0:
      return None
    path = os.path.join(self.workdir, CORPUS_FILE)
    if epath.Path(path).exists():
      return path
    cfg = self.config.data
    if not cfg.input_files and not cfg.tfds_name and \
        cfg.prepared_dir:
      raise ValueError("config.proxy.corpus_documents samples documents from the raw corpus, "
                       "but the config names only data.prepared_dir: set data.input_files or "
                       "data.tfds_name too, or proxy.corpus_documents=0 to distil on the "
                       "prepared data")
    if cfg.tfds_name and not cfg.input_files:
      docs = data_lib.read_tfds_documents(
          cfg.tfds_name, cfg.tfds_data_dir, cfg.tfds_split,
          cfg.tfds_text_key, max_documents=n)
    else:
      docs = data_lib.read_text_documents(cfg.input_files
                                          or str(data_lib.sample_text_path()))
      if n < len(docs):
        rng = np.random.default_rng(int(self.config.seed))
        docs = [docs[i] for i in np.sort(rng.choice(len(docs), n, replace=False))]
    write_text_atomic(path, "\n\n".join("\n".join(doc) for doc in docs) + "\n")
    log.info("proxy corpus: %d documents in %s", len(docs), path)
    return path

  # -- scoring -------------------------------------------------------------------

  def finished(self) -> dict[LayerMapping, float]:
    """Scores of the mapping runs already finished in the workdir (for resuming a search)."""
    out = {}
    if not epath.Path(self.workdir).is_dir():
      return out
    for name in sorted(p.name for p in epath.Path(self.workdir).iterdir()):
      path = epath.Path(self.workdir, name, SCORE_FILE)
      if name.startswith(RUN_PREFIX) and path.exists():
        saved = json.loads(path.read_text())
        out[parse_layer_mapping(saved["layer_mapping"], self.num_student_layers,
                                self.num_teacher_layers, order="any")] = float(saved["score"])
    return out

  def __call__(self, mapping: Sequence[int]) -> float:
    # The tinybert strategy's own check (with this search's order): it must be distillable.
    mapping = parse_layer_mapping(tuple(mapping), self.num_student_layers,
                                  self.num_teacher_layers, order=self.order)
    name = format_layer_mapping(mapping)
    run = self.run_dir(mapping)
    score_path = os.path.join(run, SCORE_FILE)
    if epath.Path(score_path).exists():
      return float(json.loads(epath.Path(score_path).read_text())["score"])
    log.info("layer mapping %s: distilling for %d steps in %s", name, self.proxy.num_steps, run)
    distill_dir = os.path.join(run, "distill")
    outputs = Trainer(self.distill_config(mapping), distill_dir).run()
    if "student" not in outputs:
      raise RuntimeError(f"the proxy distillation in {distill_dir} stopped early; rerun to resume")
    scores = {}
    for task, data_dir in self.tasks:
      task_dir = os.path.join(run, task)
      log.info("layer mapping %s: fine-tuning on %s for %d steps", name, task,
               self.proxy.finetune_steps)
      done = Trainer(self.finetune_config(outputs["student"], task, data_dir), task_dir).run()
      if "student" not in done:
        raise RuntimeError(f"the proxy fine-tuning in {task_dir} stopped early; rerun to resume")
      results_path = epath.Path(task_dir, "eval_results.json")
      results = json.loads(results_path.read_text()) if results_path.exists() else {}
      scores[task] = task_score(task, results)
      if scores[task] is None:
        raise RuntimeError(f"{results_path} has no dev metrics for {task!r} (got "
                           f"{sorted(results)}); delete {task_dir} and rerun")
    score = float(np.mean(list(scores.values())))
    write_json(score_path, {"layer_mapping": name, "score": score, "tasks": scores})
    log.info("layer mapping %s: proxy score %.4f %s", name, score, scores)
    if self.proxy.cleanup:  # the checkpoints only served resuming; finals and results stay
      for path in [os.path.join(distill_dir, self.stage, "checkpoints")] + [
          os.path.join(run, task, FINETUNE_STAGE, "checkpoints") for task, _ in self.tasks]:
        if epath.Path(path).exists():
          epath.Path(path).rmtree()
    return score


# ----------------------------------------------------------------------------- the search


def parse_initial(value: Any) -> list[str]:
  """Extra first-generation mappings from ";"-separated comma strings ("1,2,3,4;3,6,9,12")."""
  if not value:
    return []
  if isinstance(value, str):
    return [v.strip() for v in value.split(";") if v.strip()]
  return list(value)


def load_scores(path: str, num_student_layers: int,
                num_teacher_layers: int) -> dict[LayerMapping, float]:
  """The {mapping: score} of a `layer_mapping.json` (empty if there is none)."""
  if not epath.Path(path).exists():
    return {}
  saved = json.loads(epath.Path(path).read_text())
  return {parse_layer_mapping(k, num_student_layers, num_teacher_layers, order="any"): float(v)
          for k, v in saved.get("scores", {}).items()}


def run_search(config: ml_collections.ConfigDict, workdir: str) -> SearchResult:
  """The GA of `config.ga` over the proxy setting of `config.proxy` (a `ProxyScorer`); writes
  workdir/layer_mapping.json after every generation. A rerun resumes: the scores of finished
  mapping runs and of that file are not computed again."""
  check_block(config.get("ga", None), GA_KEYS, "config.ga")
  ga = config.ga
  scorer = ProxyScorer(config, workdir)
  m_total, n_total = scorer.num_student_layers, scorer.num_teacher_layers
  path = os.path.join(scorer.workdir, RESULT_FILE)
  cache = load_scores(path, m_total, n_total)
  if cache:
    saved = json.loads(epath.Path(path).read_text())
    if saved.get("proxy") != config.proxy.to_dict():
      log.warning("%s was written with other proxy settings (%s); its scores are reused: use a "
                  "new workdir to score afresh", path, saved.get("proxy"))
  cache.update(scorer.finished())
  if cache:
    log.info("layer-mapping search: %d mappings already scored in %s", len(cache), scorer.workdir)
  history: list[dict] = []
  free = "" if ga.monotone else f" --config.{scorer.stage}.layer_mapping_order=any"
  usage = lambda mapping: f"--config.{scorer.stage}.layer_mapping={mapping}{free}"

  def write(record: dict, finished: bool) -> None:
    write_json(path, {
        "layer_mapping": record["best_layer_mapping"], "score": record["best_score"],
        "usage": usage(record["best_layer_mapping"]), "finished": finished,
        "num_student_layers": m_total, "num_teacher_layers": n_total,
        "ga": ga.to_dict(), "proxy": config.proxy.to_dict(), "history": history,
        "scores": {format_layer_mapping(m): s for m, s in cache.items()}})

  def log_fn(record: dict) -> None:
    history.append(record)
    write(record, finished=False)

  result = genetic_search(
      scorer, m_total, n_total, population_size=int(ga.population_size),
      generations=int(ga.generations), monotone=bool(ga.monotone),
      mutation_rate=float(ga.mutation_rate),
      crossover_rate=float(ga.crossover_rate), crossover_kind=ga.crossover, elite=int(ga.elite),
      tournament_size=int(ga.tournament_size), seed=int(ga.seed),
      initial=parse_initial(ga.initial), cache=cache, log_fn=log_fn)
  write(history[-1], finished=True)
  log.info("layer-mapping search: best %s (proxy score %.4f); wrote %s", result.layer_mapping,
           result.best_score, path)
  return result


def main(argv: Sequence[str]) -> None:
  """The CLI: runs `run_search` on --config in --workdir and prints how to use the result."""
  from absl import app, flags
  from absl import logging as absl_logging
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("mobilebert_jax").setLevel(logging.INFO)
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  result = run_search(config, workdir)
  stage = stage_names(config)[0]
  print(f"best layer mapping: {result.layer_mapping} (proxy score {result.best_score:.4f}; "
        f"{os.path.join(workdir, RESULT_FILE)})")
  print(f"full TinyBERT general distillation with it: python -m mobilebert_jax.main "
        f"--config=configs/tinybert_general_distill.py --workdir=DIR "
        f"--config.teacher_checkpoint={config.teacher_checkpoint} "
        f"--config.{stage}.layer_mapping={result.layer_mapping}"
        f"{'' if config.ga.monotone else f' --config.{stage}.layer_mapping_order=any'}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Search configuration file, e.g. "
                                  "configs/layer_mapping_search.py.", lock_config=True)
  flags.DEFINE_string("workdir", "workdir/layer_mapping_search",
                      "Directory for the proxy runs and layer_mapping.json.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
