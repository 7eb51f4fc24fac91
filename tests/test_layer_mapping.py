"""Layer-mapping search: the GA on synthetic scores, the mapping format, and the proxy setting."""

import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import ml_collections
import pytest

from mobilebert_jax import default_config, save_pretrained, stages
from mobilebert_jax.data import sample_vocab_path
from mobilebert_jax.models import build_model, get_preset
from mobilebert_jax.objectives import parse_layer_mapping, uniform_layer_mapping
from mobilebert_jax.pretrained import init_params
from mobilebert_jax.search import layer_mapping as lm
from mobilebert_jax.stages.planner import resolve_stage
from test_finetune import vocab_words, write_sst2

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "layer_mapping_search.py")


def planted_score(planted, calls):
  """-L1 distance to a planted mapping; records every call and fails on a repeated one."""
  def score(mapping):
    assert mapping not in calls, f"{mapping} scored twice"
    calls.append(mapping)
    return -float(np.abs(np.subtract(mapping, planted)).sum())
  return score


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ga_finds_a_planted_monotone_mapping(seed):
  planted = (2, 5, 5, 11)
  calls = []
  result = lm.genetic_search(planted_score(planted, calls), 4, 12, population_size=12,
                             generations=12, seed=seed)
  assert result.best_mapping == planted and result.best_score == 0.0
  assert result.layer_mapping == "2,5,5,11"
  space = 1365  # non-decreasing maps of 4 layers onto 12: C(12 + 4 - 1, 4)
  assert result.num_evaluations == len(calls) <= 12 + 12 * 10 < space / 10
  assert all(list(m) == sorted(m) for m in calls)
  assert calls[0] == uniform_layer_mapping(4, 12)  # the uniform mapping seeds generation 0
  assert [h["generation"] for h in result.history] == list(range(13))
  best = [h["best_score"] for h in result.history]
  assert best == sorted(best) and best[-1] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ga_finds_a_planted_free_mapping(seed):
  planted = (9, 2, 11, 5)  # not monotone: only the free search can reach it
  calls = []
  result = lm.genetic_search(planted_score(planted, calls), 4, 12, monotone=False,
                             population_size=16, generations=15, seed=seed)
  assert result.best_mapping == planted
  assert result.num_evaluations == len(calls) <= 16 + 15 * 14 < 12 ** 4 / 50
  assert any(list(m) != sorted(m) for m in calls)


@pytest.mark.parametrize("monotone", [True, False])
def test_every_individual_is_valid_and_scored_once(monotone):
  calls = []

  def noisy(mapping):  # a rugged landscape that keeps the search moving around
    assert mapping not in calls
    calls.append(mapping)
    return float(np.random.default_rng(list(mapping)).random())

  result = lm.genetic_search(noisy, 3, 6, monotone=monotone, population_size=10, generations=20,
                             mutation_rate=0.5, crossover_kind="uniform", seed=3)
  order = "nondecreasing" if monotone else "any"
  for mapping in calls:
    assert parse_layer_mapping(mapping, 3, 6, order=order) == mapping
    assert all(isinstance(g, int) for g in mapping)
  assert len(calls) == len(set(calls)) == len(result.scores) == result.num_evaluations
  assert result.best_score == max(result.scores.values())
  if not monotone:
    assert any(list(m) != sorted(m) for m in calls)


def test_same_seed_same_result_and_a_cache_resumes():
  kwargs = dict(population_size=8, generations=6, seed=7)
  first_calls, cache = [], {}
  first = lm.genetic_search(planted_score((1, 3, 8, 8), first_calls), 4, 12, cache=cache,
                            **kwargs)
  again = lm.genetic_search(planted_score((1, 3, 8, 8), []), 4, 12, **kwargs)
  assert (again.best_mapping, again.history, again.scores) == (
      first.best_mapping, first.history, first.scores)
  other = lm.genetic_search(planted_score((1, 3, 8, 8), []), 4, 12, **dict(kwargs, seed=8))
  assert list(other.scores) != list(first.scores)
  # The filled cache answers every mapping: a rerun scores nothing and decides the same.
  assert cache == first.scores
  never = lambda mapping: pytest.fail(f"{mapping} scored again")
  resumed = lm.genetic_search(never, 4, 12, cache=cache, **kwargs)
  assert resumed.num_evaluations == 0
  assert (resumed.best_mapping, resumed.scores) == (first.best_mapping, first.scores)
  # A partial cache (an interrupted search): only the rest is scored.
  partial = dict(list(cache.items())[:10])
  calls = []
  resumed = lm.genetic_search(planted_score((1, 3, 8, 8), calls), 4, 12, cache=partial, **kwargs)
  assert set(calls) == set(first.scores) - set(list(cache)[:10])
  assert resumed.best_mapping == first.best_mapping


def test_format_round_trips_through_parse_layer_mapping():
  assert lm.format_layer_mapping((2, 4, 7, 10)) == "2,4,7,10"
  assert lm.format_layer_mapping(np.array([3, 6, 9, 12])) == "3,6,9,12"
  rng = np.random.default_rng(0)
  for monotone in (True, False):
    for _ in range(20):
      mapping = lm.random_mapping(rng, 4, 12, monotone)
      text = lm.format_layer_mapping(mapping)
      order = "nondecreasing" if monotone else "any"
      assert parse_layer_mapping(text, 4, 12, order=order) == mapping
  with pytest.raises(ValueError, match="empty"):
    lm.format_layer_mapping(())
  with pytest.raises(ValueError, match="2.5"):
    lm.format_layer_mapping((1, 2.5))


def test_bad_mappings_and_arguments_name_the_value():
  score = lambda mapping: 0.0
  with pytest.raises(ValueError, match=r"3 entries, expected one per student layer \(4\)"):
    lm.genetic_search(score, 4, 12, initial=[(1, 2, 3)])
  with pytest.raises(ValueError, match=r"student layer 4 maps to teacher layer 13, outside"):
    lm.genetic_search(score, 4, 12, initial=["1,2,3,13"])
  with pytest.raises(ValueError, match="'5,4,3,2' is not nondecreasing"):
    lm.genetic_search(score, 4, 12, initial=["5,4,3,2"])
  assert lm.genetic_search(score, 4, 12, monotone=False, initial=["5,4,3,2"],
                           generations=0).scores.get((5, 4, 3, 2)) == 0.0
  with pytest.raises(ValueError, match="num_teacher_layers must be a positive int, got 0"):
    lm.genetic_search(score, 4, 0)
  with pytest.raises(ValueError, match="elite=4 must be smaller than population_size=4"):
    lm.genetic_search(score, 4, 12, population_size=4, elite=4)
  with pytest.raises(ValueError, match="crossover must be one of"):
    lm.genetic_search(score, 4, 12, crossover_kind="two_point")
  with pytest.raises(ValueError, match="NaN for layer mapping 3,6,9,12"):
    lm.genetic_search(lambda mapping: float("nan"), 4, 12)


# ----------------------------------------------------------------------------- the proxy setting


def search_config(tmp_path):
  """configs/layer_mapping_search.py at toy sizes: a random 2-layer teacher, a 2-layer student,
  3 distillation steps on 20 documents of the shipped corpus, 3 fine-tuning steps on SST-2, a
  population of 2."""
  spec = importlib.util.spec_from_file_location("layer_mapping_search", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.teacher = dict(preset="bert_base", vocab_size=2972, embedding_size=32, hidden_size=32,
                   intra_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                   max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
  c.student = dict(preset="tinybert_4l", vocab_size=2972, embedding_size=8, hidden_size=8,
                   intra_size=8, num_layers=2, num_heads=2, intermediate_size=16,
                   max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
  c.data.update(dict(tfds_name=None, max_seq_length=32, max_predictions_per_seq=5, batch_size=8))
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  c.checkpoint.update(dict(save_every_steps=1000, async_save=False))
  c.log_every_steps = 1000
  c.proxy.update(dict(num_steps=3, corpus_documents=20, tasks="sst2",
                      data_dir=str(tmp_path / "glue"), finetune_steps=3, finetune_batch_size=16))
  c.ga.update(dict(population_size=2, generations=0, elite=1))  # one generation: 2 mappings
  return c


def write_teacher(path, config):
  model_cfg = stages.model_config(config.teacher, "config.teacher")
  params = init_params(build_model(model_cfg, "pretraining"), model_cfg, jax.random.PRNGKey(0))
  save_pretrained(str(path), model_cfg, params, "pretraining",
                  tokenizer_dir=str(sample_vocab_path().parent))


def test_proxy_config_errors_come_before_any_compute(tmp_path):
  workdir = tmp_path / "search"
  c = search_config(tmp_path)
  with pytest.raises(ValueError, match="config.teacher_checkpoint is empty"):
    lm.run_search(c, str(workdir))
  c.teacher_checkpoint = str(tmp_path / "no_teacher")
  with pytest.raises(FileNotFoundError, match="no_teacher"):
    lm.run_search(c, str(workdir))
  write_teacher(tmp_path / "teacher", c)
  (tmp_path / "glue" / "SST-2").mkdir(parents=True)
  c.teacher_checkpoint = str(tmp_path / "teacher")
  bad = search_config(tmp_path)
  bad.teacher_checkpoint = c.teacher_checkpoint
  bad.proxy.num_stepz = 3
  with pytest.raises(ValueError, match=r"config.proxy: unknown keys \['num_stepz'\]"):
    lm.run_search(bad, str(workdir))
  bad = search_config(tmp_path)
  bad.teacher_checkpoint = c.teacher_checkpoint
  bad.ga.populaton_size = 3
  with pytest.raises(ValueError, match=r"config.ga: unknown keys \['populaton_size'\]"):
    lm.run_search(bad, str(workdir))
  for key, value, message in (("tasks", "sst2,sst3", "unknown GLUE task 'sst3'"),
                              ("data_dir", str(tmp_path / "no_glue"), "no_glue"),
                              ("corpus_documents", 1, "corpus_documents must be 0"),
                              ("num_steps", 0, "num_steps must be an int >= 1")):
    bad = search_config(tmp_path)
    bad.teacher_checkpoint = c.teacher_checkpoint
    bad.proxy[key] = value
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      lm.run_search(bad, str(workdir))
  assert not workdir.exists()
  c.ga.monotone = False  # free mappings: the distillation stage is told to accept any order
  write_sst2(tmp_path / "glue" / "SST-2", np.random.default_rng(0), vocab_words())
  free = lm.ProxyScorer(c, str(tmp_path / "free")).distill_config((2, 1))
  assert free.general.layer_mapping == "2,1" and free.general.layer_mapping_order == "any"
  c.ga.monotone = True
  scorer = lm.ProxyScorer(c, str(workdir))
  with pytest.raises(ValueError, match=r"layer 2 maps to teacher layer 3, outside \[1, 2\]"):
    scorer((1, 3))
  with pytest.raises(ValueError, match="is not nondecreasing"):
    scorer((2, 1))
  assert sorted(os.listdir(workdir)) == [lm.CORPUS_FILE]  # nothing trained


def test_proxy_search_end_to_end_and_rerun_reuses_the_runs(tmp_path, monkeypatch):
  write_sst2(tmp_path / "glue" / "SST-2", np.random.default_rng(0), vocab_words())
  (tmp_path / "glue" / "SST-2" / "test.tsv").unlink()  # dev scores only
  c = search_config(tmp_path)
  write_teacher(tmp_path / "teacher", c)
  c.teacher_checkpoint = str(tmp_path / "teacher")
  workdir = tmp_path / "search"
  result = lm.run_search(c, str(workdir))

  saved = json.loads((workdir / lm.RESULT_FILE).read_text())
  assert saved["finished"] and len(saved["history"]) == 1
  assert len(saved["scores"]) == result.num_evaluations == 2
  assert "1,2" in saved["scores"]  # the uniform mapping of 2 student onto 2 teacher layers
  assert saved["layer_mapping"] in saved["scores"]
  assert saved["score"] == max(saved["scores"].values()) == result.best_score
  assert saved["usage"] == f"--config.general.layer_mapping={saved['layer_mapping']}"
  assert parse_layer_mapping(saved["layer_mapping"], 2, 2) == result.best_mapping
  corpus = (workdir / lm.CORPUS_FILE).read_text().strip().split("\n\n")
  assert len(corpus) == 20
  for text, score in saved["scores"].items():
    run = workdir / f"mapping_{text.replace(',', '-')}"
    distilled = json.loads((run / "distill" / "config.json").read_text())
    assert distilled["general"]["layer_mapping"] == text
    assert distilled["general"]["num_steps"] == 3
    assert distilled["data"]["input_files"] == str(workdir / lm.CORPUS_FILE)
    finetuned = json.loads((run / "sst2" / "config.json").read_text())
    assert finetuned["init_checkpoint"] == str(run / "distill" / "student")
    dev = json.loads((run / "sst2" / "eval_results.json").read_text())["dev_accuracy"]
    assert json.loads((run / lm.SCORE_FILE).read_text())["score"] == score == dev
    assert not (run / "distill" / "general" / "checkpoints").exists()  # cleaned up

  # A rerun trains nothing: finished runs (or, without them, layer_mapping.json) are reused.
  class NoTraining:
    def __init__(self, *args, **kwargs):
      pytest.fail("a finished mapping was trained again")
  monkeypatch.setattr(lm, "Trainer", NoTraining)
  again = lm.run_search(c, str(workdir))
  assert (again.best_mapping, again.scores, again.num_evaluations) == (
      result.best_mapping, result.scores, 0)
  for text in saved["scores"]:
    shutil.rmtree(workdir / f"mapping_{text.replace(',', '-')}")
  again = lm.run_search(c, str(workdir))
  assert (again.best_mapping, again.scores, again.num_evaluations) == (
      result.best_mapping, result.scores, 0)


def test_tinybert_stage_reads_a_free_mapping_only_when_told():
  teacher = get_preset("bert_base", tiny_variant=True, num_layers=3)
  student = get_preset("tinybert_4l", tiny_variant=True)
  spec, stage = resolve_stage("general", ml_collections.ConfigDict(dict(
      strategy="tinybert", layer_mapping="3,1", num_steps=1,
      optimizer=default_config.optimizer(1e-3, 0))))
  with pytest.raises(ValueError, match="not nondecreasing"):
    spec.check("general", stage, teacher, student)
  stage.layer_mapping_order = "any"
  spec.check("general", stage, teacher, student)
