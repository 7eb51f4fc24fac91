"""ETD (Extract Then Distill): start a smaller student from a sub-network of its teacher.

Chen et al. 2021, "Extract then Distill: Efficient and Effective Task-Agnostic BERT Distillation":
instead of a random initialisation, the student (fewer layers and/or narrower) gets a subset of
the teacher's parameters, which the paper reports saves about 70% of the distillation compute.

  depth  student layer m takes teacher layer g(m) of a layer mapping ("uniform" by default, or
         "2,4,6" / a sequence; `objectives.tinybert.parse_layer_mapping`).
  width  within every kept layer, the attention heads (and, when the head width shrinks, each
         kept head's query/key and value/output dimensions), the neurons of every feed-forward
         network and, for bottleneck models, the intra-block channels; and the hidden channels
         of the residual stream, shared by the embeddings, every layer, the pooler and the heads.
         ETD-Rand keeps a seeded random subset, ETD-Impt the most important units. Kept indices
         stay in the teacher's order.

Importance (`importance_scores`), one score per unit:

  first_order  sum over batches b of |a * dL_b/da| (Taylor / first-order importance, Molchanov
               et al. 2017, Michel et al. 2019: the absolute value is taken per batch, then
               accumulated, so effects of opposite sign on different batches do not cancel)
               for a multiplicative gate a on the unit, L_b being the teacher's MLM + NSP loss
               on pretraining batch b. A gate on a unit equals
               scaling the parameters that carry it, so at a = 1 the derivative is exactly
               sum(theta * dL/dtheta) over those parameters; no gate is added to the models:
                 head h            rows h of the attention output kernel (its context vectors);
                 query/key dim     the query kernel column and bias (h, d);
                 value/output dim  rows (h, d) of the attention output kernel;
                 FFN neuron j      row j of that FFN's output kernel (its activation);
                 hidden channel c  scale and bias c of every backbone norm producing a state of
                                   the residual stream (embedding output, each layer's
                                   attention/FFN outputs): one gate shared by all of them, since
                                   dropping c removes it from all of them;
                 intra channel c   the same within each layer's bottleneck block.
  magnitude    the L2 norm of every parameter entry attached to the unit (kernel rows/columns
               reading or writing it, biases, norm entries); needs no data.

Which axis of which parameter carries which unit is read from the models' logical axis
annotations (`models/layers.py`), so no list of parameters is repeated here.

Exactness: with equal sizes the student is the teacher. Dropping FFN neurons, heads or head
dimensions gives exactly the teacher with those units zeroed (the kept queries are scaled by
sqrt(d_student / d_teacher), so attention scores keep the teacher's 1 / sqrt(d_teacher)).
Dropping hidden or intra channels does so only where the norms are element-wise (`no_norm`):
a LayerNorm's statistics change with the channel set. Dropped layers are simply skipped.

Bottleneck teachers (IB-BERT, MobileBERT): layers, heads, head width, FFN neurons, intra and
hidden channels all extract; the token embedding width (`embedding_size`) cannot shrink when the
teacher widens it with `embedding_transformation`, and the tied MLM decoder then keeps the first
`embedding_size` hidden channels.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mobilebert_jax import objectives, pretrained
from mobilebert_jax.distill import strategies
from mobilebert_jax.models import ModelConfig, build_model

log = logging.getLogger(__name__)

INIT_CHOICES = ("", "etd_impt", "etd_rand")  # a stage's `init_from_teacher`
IMPORTANCE_KINDS = ("first_order", "magnitude")
METHODS = {"impt": "impt", "rand": "rand", "etd_impt": "impt", "etd_rand": "rand"}
DIM_ROLES = ("qk_dims", "vo_dims")  # per-head dimensions: the axis after a "heads" axis
# Sizes that must match, and sizes the student may shrink.
EQUAL_FIELDS = ("model_type", "normalization", "hidden_act", "trigram_input", "use_bottleneck",
                "attention_input", "num_ffn", "vocab_size", "type_vocab_size",
                "classifier_activation")
SHRINK_FIELDS = ("num_layers", "hidden_size", "intra_size", "num_heads", "intermediate_size",
                 "max_position_embeddings")
_MLM_KEYS = ("input_ids", "attention_mask", "token_type_ids", "masked_lm_positions",
             "masked_lm_ids", "masked_lm_weights")
_LAYER = re.compile(r"layer_(\d+)$")

Path = tuple[str, ...]
Roles = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class Selection:
  """The teacher units an extracted student keeps (sorted indices into the teacher's axes).

  `layers[m]` is the (0-based) teacher layer of student layer m. `units` holds "hidden" [H_s]
  and, stacked over student layers, "heads" [M, N_s], "qk_dims" / "vo_dims" [M, N_s, d_s]
  (per kept head), one entry per FFN ("ffn", "stacked_ffn_<i>") [M, F_s] and, for bottleneck
  models, "intra" [M, I_s] (and "attention_intra" [M, I_s], MobileBERT's q/k bottleneck).
  """
  layers: tuple[int, ...]
  units: Mapping[str, np.ndarray]

  def describe(self, teacher: ModelConfig) -> str:
    """One line with what was kept, e.g. for the training log."""
    u = self.units
    parts = [f"layers {[t + 1 for t in self.layers]} of {teacher.num_layers}",
             f"heads {u['heads'].shape[-1]}/{teacher.num_heads}",
             f"head dims {u['qk_dims'].shape[-1]}/{teacher.head_dim}",
             f"FFN neurons {u['ffn'].shape[-1]}/{teacher.intermediate_size}"
             + (f" (x{teacher.num_ffn} FFNs)" if teacher.num_ffn > 1 else ""),
             f"hidden channels {u['hidden'].shape[-1]}/{teacher.hidden_size}"]
    if "intra" in u:
      parts.append(f"intra channels {u['intra'].shape[-1]}/{teacher.intra_size}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- layout


def _layer_of(path: Path) -> int | None:
  for key in path:
    match = _LAYER.match(key)
    if match:
      return int(match.group(1))
  return None


def _axis_role(name: str | None, path: Path, axis: int, cfg: ModelConfig) -> str | None:
  """The unit an axis (logical name `name`, see models/layers.py) indexes, or None."""
  module = path[-2] if len(path) > 1 else ""
  if name in ("embed", "hidden_out"):
    return "hidden"
  if name == "intra":
    if not cfg.use_bottleneck:  # BERT: the attention/FFN block works at the hidden width
      return "hidden"
    if module.startswith("bottleneck_attention") or (
        module in ("query", "key") and cfg.attention_input == "shared_bottleneck"):
      return "attention_intra"
    return "intra"
  if name == "heads":
    return "heads"
  if name == "kv":
    return "qk_dims" if module in ("query", "key") else "vo_dims"
  if name == "mlp":
    return path[-3]  # the FFN: "ffn" or "stacked_ffn_<i>"
  if name == "vocab_extra":  # MobileBERT's decoder rows for hidden channels >= embedding_size
    return "hidden_extra"
  if module == "position_embeddings" and axis == 0:
    return "positions"
  return None  # vocab, labels, the token embedding width: never sliced


@functools.lru_cache(maxsize=32)
def _layout(cfg: ModelConfig, head: str) -> tuple[dict[Path, Roles], dict[Path, tuple]]:
  """({path: axis roles}, {path: shape}) of the parameters of `build_model(cfg, head)`."""
  model = build_model(cfg, head)
  boxed = jax.eval_shape(lambda: pretrained.init_params(model, cfg, jax.random.PRNGKey(0),
                                                        boxed=True))
  is_box = lambda x: isinstance(x, nn.Partitioned)
  names = traverse_util.flatten_dict(jax.tree.map(lambda b: tuple(b.names), boxed,
                                                  is_leaf=is_box))
  shapes = traverse_util.flatten_dict(nn.meta.unbox(boxed))
  roles = {path: tuple(_axis_role(n, path, i, cfg) for i, n in enumerate(axes))
           for path, axes in names.items()}
  return roles, {path: tuple(x.shape) for path, x in shapes.items()}


def _ffn_names(cfg: ModelConfig) -> list[str]:
  return [f"stacked_ffn_{i}" for i in range(cfg.num_ffn - 1)] + ["ffn"]


def _zero_scores(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Zero score arrays of every unit kind `cfg` has (see `importance_scores`)."""
  layers, heads, dim = cfg.num_layers, cfg.num_heads, cfg.head_dim
  scores = {"hidden": np.zeros(cfg.hidden_size), "heads": np.zeros((layers, heads)),
            "qk_dims": np.zeros((layers, heads, dim)), "vo_dims": np.zeros((layers, heads, dim))}
  for name in _ffn_names(cfg):
    scores[name] = np.zeros((layers, cfg.intermediate_size))
  if cfg.use_bottleneck:
    scores["intra"] = np.zeros((layers, cfg.intra_size))
    if cfg.attention_input == "shared_bottleneck":
      scores["attention_intra"] = np.zeros((layers, cfg.intra_size))
  return scores


def head_of(params: Mapping) -> str:
  """The model head a parameter tree belongs to (one of `models.HEADS`)."""
  if "backbone" not in params:
    return "base"
  for head, key in (("pretraining", "nsp"), ("classification", "classifier"),
                    ("question_answering", "qa_outputs"), ("masked_lm", "mlm")):
    if key in params:
      return head
  raise ValueError(f"cannot tell the model head of a parameter tree with keys {sorted(params)}")


def _flat_teacher(cfg: ModelConfig, params: Mapping) -> tuple[str, dict[Path, Roles], dict]:
  head = head_of(params)
  roles, shapes = _layout(cfg, head)
  flat = traverse_util.flatten_dict(dict(params))
  for path, shape in shapes.items():
    found = tuple(np.shape(flat[path])) if path in flat else None
    if found != shape:
      raise ValueError(f"teacher parameter {'/'.join(path)}: "
                       f"{'missing' if found is None else f'shape {found}'}, the teacher config "
                       f"gives {shape}")
  return head, roles, flat


# ----------------------------------------------------------------------------- importance


def _unit_sums(values: np.ndarray, roles: Roles, role: str) -> np.ndarray:
  """`values` summed over every axis but `role`'s (for per-head dims: the heads and dims axes),
  added up over the axes `role` occurs on (e.g. both sides of the pooler)."""
  total = 0.0
  for i, r in enumerate(roles):
    if r == role:
      keep = (i - 1, i) if role in DIM_ROLES else (i,)
      total = total + values.sum(axis=tuple(a for a in range(values.ndim) if a not in keep))
  return total


def _is_gate(path: Path, role: str) -> bool:
  """Whether theta * dL/dtheta of this parameter, along `role`, is part of the unit's gate."""
  module = path[-2]
  if role in ("heads", "vo_dims"):
    return path[-3:] == ("attention", "output", "kernel")
  if role == "qk_dims":
    return module == "query"
  if role in ("hidden", "intra", "attention_intra"):
    is_norm = module == "norm" or module.endswith("_norm")
    return is_norm and (_layer_of(path) is not None or "embeddings" in path)
  return module == "output"  # an FFN's output kernel: the rows of its neurons


def _accumulate(cfg: ModelConfig, roles: dict[Path, Roles], values: dict[Path, np.ndarray],
                gates_only: bool) -> dict[str, np.ndarray]:
  scores = _zero_scores(cfg)
  for path, axis_roles in roles.items():
    layer = _layer_of(path)
    for role in sorted({r for r in axis_roles if r in scores or r == "hidden_extra"}):
      if gates_only and not _is_gate(path, role):
        continue
      total = _unit_sums(values[path], axis_roles, role)
      if role == "hidden_extra":
        scores["hidden"][cfg.embedding_size:] += total
      elif role == "hidden":  # shared by every layer
        scores[role] += total
      else:
        scores[role][layer] += total
  return scores


def _mlm_loss(model: nn.Module, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
  out = strategies.apply_model(model, params, batch)  # deterministic: no dropout
  loss = objectives.mlm_loss(out.prediction_logits, batch["masked_lm_ids"],
                             batch["masked_lm_weights"])
  if getattr(out, "seq_relationship_logits", None) is not None:
    loss = loss + objectives.nsp_loss(out.seq_relationship_logits, batch["next_sentence_labels"])
  return loss


# Jitted once per teacher model (modules hash by their config): the model is static.
_loss_grad = jax.jit(jax.grad(_mlm_loss, argnums=1), static_argnums=0)


def batch_gradients(teacher_model: nn.Module, teacher_params: Any,
                    batches: Iterable[Mapping[str, Any]]) -> Iterator[Any]:
  """The gradient of the MLM (+ NSP) loss on each of `batches` in turn (host arrays)."""
  keys = _MLM_KEYS + (("next_sentence_labels",) if head_of(teacher_params) == "pretraining"
                      else ())
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), teacher_params)
  count = 0
  for batch in batches:
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(f"first-order importance needs pretraining batches; batch lacks {missing}")
    yield jax.device_get(_loss_grad(teacher_model, params,
                                    {k: jnp.asarray(batch[k]) for k in keys}))
    count += 1
  if not count:
    raise ValueError("first-order importance needs at least one batch")


def importance_scores(teacher_model: nn.Module | None, teacher_config: ModelConfig,
                      teacher_params: Mapping, batches: Iterable[Mapping[str, Any]] | None = None,
                      kind: str = "first_order") -> dict[str, np.ndarray]:
  """Importance of every teacher unit (see the module docstring for the definitions).

  Returns {"hidden": [H], "heads": [L, N], "qk_dims": [L, N, d], "vo_dims": [L, N, d],
  "ffn": [L, F], "stacked_ffn_<i>": [L, F] (num_ffn > 1), "intra": [L, I] and
  "attention_intra": [L, I] (bottleneck models)}. `first_order` needs `batches` of pretraining
  data (as `data.PretrainingDataset` yields) and a teacher with an MLM head (`teacher_model`
  may be None: it is then built in float32); `magnitude` needs neither.
  """
  if kind not in IMPORTANCE_KINDS:
    raise ValueError(f"importance kind {kind!r} is not one of {list(IMPORTANCE_KINDS)}")
  head, roles, flat = _flat_teacher(teacher_config, teacher_params)
  theta = {path: np.asarray(flat[path], np.float64) for path in roles}
  if kind == "magnitude":
    sums = _accumulate(teacher_config, roles, {p: np.square(x) for p, x in theta.items()},
                       gates_only=False)
    return {k: np.sqrt(v) for k, v in sums.items()}
  if head not in ("pretraining", "masked_lm"):
    raise ValueError(f"first-order importance needs a teacher with an MLM head ('pretraining' or "
                     f"'masked_lm'), but the teacher is a {head!r} model; use kind='magnitude'")
  if batches is None:
    raise ValueError("first-order importance needs batches of pretraining data; pass batches "
                     "or use kind='magnitude'")
  model = teacher_model if teacher_model is not None else build_model(teacher_config, head)
  scores = None
  for grads in batch_gradients(model, teacher_params, batches):
    flat_grads = traverse_util.flatten_dict(grads)
    products = {p: x * np.asarray(flat_grads[p], np.float64) for p, x in theta.items()}
    batch = {k: np.abs(v) for k, v in _accumulate(teacher_config, roles, products,
                                                  gates_only=True).items()}
    scores = batch if scores is None else {k: scores[k] + batch[k] for k in scores}
  return scores


# ----------------------------------------------------------------------------- selection


def check_compatible(teacher: ModelConfig, student: ModelConfig) -> None:
  """Raises ValueError, naming the field and both values, if `student` is not a sub-network
  shape of `teacher`."""
  for config, who in ((teacher, "teacher"), (student, "student")):
    if getattr(config, "layer_ops", ()):
      raise ValueError(f"ETD: the {who}'s layer_ops={config.layer_ops!r} (a NAS architecture) "
                       "cannot be extracted; ETD needs the usual transformer layers")
  for field in EQUAL_FIELDS:
    t, s = getattr(teacher, field), getattr(student, field)
    if t != s:
      raise ValueError(f"ETD: student {field}={s!r} must equal the teacher's {field}={t!r}")
  for field in SHRINK_FIELDS:
    t, s = getattr(teacher, field), getattr(student, field)
    if s > t:
      raise ValueError(f"ETD: student {field}={s} exceeds the teacher's {field}={t}; a student "
                       "can only keep a subset of the teacher")
  if student.head_dim > teacher.head_dim:
    raise ValueError(
        f"ETD: student head width intra_size/num_heads={student.intra_size}/{student.num_heads}"
        f"={student.head_dim} exceeds the teacher's {teacher.intra_size}/{teacher.num_heads}="
        f"{teacher.head_dim}; heads can be dropped or narrowed, not widened")
  if teacher.uses_embedding_transformation:
    if student.embedding_size != teacher.embedding_size:
      raise ValueError(
          f"ETD: student embedding_size={student.embedding_size} must equal the teacher's "
          f"embedding_size={teacher.embedding_size}: the teacher widens its token embeddings "
          "with embedding_transformation, whose input width is not extracted")
  elif student.embedding_size != student.hidden_size:
    raise ValueError(
        f"ETD: student embedding_size={student.embedding_size} must equal its hidden_size="
        f"{student.hidden_size}, as in the teacher (embedding_size={teacher.embedding_size}, "
        f"hidden_size={teacher.hidden_size}), which has no embedding_transformation to extract")


def _method(method: str) -> str:
  if method not in METHODS:
    raise ValueError(f"ETD method {method!r} is not one of {sorted(METHODS)}")
  return METHODS[method]


def select_units(teacher_config: ModelConfig, student_config: ModelConfig, *,
                 method: str = "impt", scores: Mapping[str, np.ndarray] | None = None,
                 layer_mapping: str | Sequence[int] = "uniform", seed: int = 0) -> Selection:
  """Which teacher layers and units the student keeps: the top-scored ones (`impt`, needs
  `scores` from `importance_scores`) or a random subset seeded by `seed` (`rand`)."""
  check_compatible(teacher_config, student_config)
  method = _method(method)
  t, s = teacher_config, student_config
  layers = tuple(g - 1 for g in objectives.parse_layer_mapping(layer_mapping, s.num_layers,
                                                               t.num_layers))
  expected = _zero_scores(t)
  if method == "rand":
    scores = expected
  elif scores is None:
    raise ValueError("ETD-Impt needs importance scores (see importance_scores)")
  for key, zeros in expected.items():
    shape = None if key not in scores else tuple(np.shape(scores[key]))
    if shape != zeros.shape:
      raise ValueError(f"importance scores[{key!r}]: {'missing' if shape is None else shape}, "
                       f"expected {zeros.shape} for the teacher config")
  rng = np.random.default_rng(seed)

  def pick(score: np.ndarray, keep: int, forced: int = 0) -> np.ndarray:
    """`keep` sorted indices of `score`'s last axis; the first `forced` are always kept."""
    size = score.shape[-1]
    if keep == size:
      return np.arange(size)
    if method == "rand":
      rest = rng.choice(np.arange(forced, size), keep - forced, replace=False)
    else:
      rest = forced + np.argsort(-np.asarray(score[forced:]), kind="stable")[:keep - forced]
    return np.sort(np.concatenate([np.arange(forced), rest])).astype(np.int64)

  # The tied MLM decoder reads the first embedding_size hidden channels against the token
  # table: a teacher with a narrower table keeps them all.
  forced = t.embedding_size if t.embedding_size < t.hidden_size else 0
  units: dict[str, Any] = {"hidden": pick(scores["hidden"], s.hidden_size, forced)}
  per_layer: dict[str, list] = {k: [] for k in expected if k != "hidden"}
  for layer in layers:
    heads = pick(scores["heads"][layer], s.num_heads)
    per_layer["heads"].append(heads)
    for dims in DIM_ROLES:
      per_layer[dims].append(np.stack([pick(scores[dims][layer, h], s.head_dim) for h in heads]))
    for name in _ffn_names(t):
      per_layer[name].append(pick(scores[name][layer], s.intermediate_size))
    for name in ("intra", "attention_intra"):
      if name in per_layer:
        per_layer[name].append(pick(scores[name][layer], s.intra_size))
  units.update({k: np.stack(v) for k, v in per_layer.items()})
  return Selection(layers=layers, units=units)


# ----------------------------------------------------------------------------- extraction


def _slice(x: np.ndarray, roles: Roles, index: Callable[[str], np.ndarray]) -> np.ndarray:
  for axis, role in enumerate(roles):
    if role is None:
      continue
    if role in DIM_ROLES:  # the heads axis before it is already sliced: per-head dims
      dims = index(role)
      shape = [1] * x.ndim
      shape[axis - 1:axis + 1] = dims.shape
      x = np.take_along_axis(x, dims.reshape(shape), axis=axis)
    else:
      x = np.take(x, index(role), axis=axis)
  return x


def extract_student(teacher_config: ModelConfig, teacher_params: Mapping,
                    student_config: ModelConfig, *, method: str = "impt",
                    scores: Mapping[str, np.ndarray] | None = None,
                    layer_mapping: str | Sequence[int] = "uniform", seed: int = 0,
                    selection: Selection | None = None) -> dict:
  """The student's full parameter tree (numpy), with the teacher's head, cut from the teacher.

  ETD-Impt (`method="impt"`) keeps the top units of `scores` (`importance_scores`; magnitude
  scores of `teacher_params` when None), ETD-Rand (`"rand"`) a random subset seeded by `seed`;
  `selection` (from `select_units`) overrides both. Every hidden channel is sliced consistently
  across embeddings, kernels, biases, norms, pooler, MLM transform and decoder.
  """
  head, _, flat = _flat_teacher(teacher_config, teacher_params)
  check_compatible(teacher_config, student_config)
  if head == "classification" and student_config.num_labels != teacher_config.num_labels:
    raise ValueError(f"ETD: student num_labels={student_config.num_labels} must equal the "
                     f"teacher classifier's num_labels={teacher_config.num_labels}")
  if selection is None:
    if _method(method) == "impt" and scores is None:
      scores = importance_scores(None, teacher_config, teacher_params, kind="magnitude")
    selection = select_units(teacher_config, student_config, method=method, scores=scores,
                             layer_mapping=layer_mapping, seed=seed)
  roles, shapes = _layout(student_config, head)
  hidden = selection.units["hidden"]
  extra = hidden[teacher_config.embedding_size:] - teacher_config.embedding_size
  query_scale = math.sqrt(student_config.head_dim / teacher_config.head_dim)
  out = {}
  for path, axis_roles in roles.items():
    layer = _layer_of(path)
    source = path if layer is None else tuple(
        f"layer_{selection.layers[layer]}" if _LAYER.match(k) else k for k in path)

    def index(role: str) -> np.ndarray:
      if role == "hidden":
        return hidden
      if role == "hidden_extra":
        return extra
      if role == "positions":
        return np.arange(student_config.max_position_embeddings)
      return selection.units[role][layer]

    x = _slice(np.asarray(flat[source]), axis_roles, index)
    if path[-2] == "query" and query_scale != 1.0:
      x = (x * query_scale).astype(x.dtype)
    if x.shape != shapes[path]:  # a selection that does not fit the student config
      raise ValueError(f"ETD: extracted {'/'.join(path)} has shape {x.shape}, the student "
                       f"config needs {shapes[path]}")
    out[path] = x
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------- trainer hook


def check_stage_options(stage: Mapping, where: str, teacher_config: ModelConfig,
                        student_config: ModelConfig, *, role: str, has_teacher: bool,
                        has_student: bool, pretraining_data: bool) -> None:
  """Validates a stage's `init_from_teacher` / `etd_*` keys before any compute; `where` is
  e.g. "config.pd"."""
  method = stage["init_from_teacher"]
  if method not in INIT_CHOICES:
    raise ValueError(f"{where}.init_from_teacher={method!r} is not one of {list(INIT_CHOICES)}")
  if not method:
    return
  if role != "student":
    raise ValueError(f"{where}.init_from_teacher={method!r} initialises the student, but the "
                     f"stage trains the {role}")
  if not has_teacher:
    raise ValueError(f"{where}.init_from_teacher={method!r} needs a teacher: run a 'pretrain' "
                     "stage for the teacher first or set config.teacher_checkpoint")
  if has_student:
    raise ValueError(f"{where}.init_from_teacher={method!r}: the student already has parameters "
                     "(an earlier student stage, config.student_checkpoint or "
                     "config.init_checkpoint); set it on the first student stage only")
  importance = stage["etd_importance"]
  if importance not in IMPORTANCE_KINDS:
    raise ValueError(f"{where}.etd_importance={importance!r} is not one of "
                     f"{list(IMPORTANCE_KINDS)}")
  if method == "etd_impt" and importance == "first_order" and not pretraining_data:
    raise ValueError(f"{where}.etd_importance='first_order' needs MLM + NSP pretraining data, "
                     f"but {where}.strategy={stage['strategy']!r} trains on task data; use "
                     "'magnitude'")
  num_batches = stage["etd_num_batches"]
  if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
    raise ValueError(f"{where}.etd_num_batches must be a positive integer, got {num_batches!r}")
  try:
    check_compatible(teacher_config, student_config)
  except ValueError as e:
    raise ValueError(f"{where}.init_from_teacher={method!r}: {e}") from e
  try:
    objectives.parse_layer_mapping(stage["etd_layer_mapping"],
                                   student_config.num_layers, teacher_config.num_layers)
  except ValueError as e:
    raise ValueError(f"{where}.etd_layer_mapping: {e}") from e


def init_student_from_teacher(method: str, teacher_config: ModelConfig, teacher_params: Mapping,
                              student_config: ModelConfig, *, student_head: str | None = None,
                              batches: Iterable[Mapping[str, Any]] | None = None,
                              importance: str = "first_order",
                              layer_mapping: str | Sequence[int] = "uniform", seed: int = 0,
                              where: str = "ETD") -> dict:
  """ETD initialisation of a student (what the trainer calls for `init_from_teacher`).

  `method` is "etd_impt" (importance: `importance` scores, first-order ones on `batches`) or
  "etd_rand". Returns the student's parameters with `student_head` (default: the teacher's
  head; another head takes the extracted backbone and a fresh head) and logs what was kept.
  """
  kind = _method(method)
  teacher_head = head_of(teacher_params)
  scores, how = None, f"random, seed {seed}"
  if kind == "impt":
    if importance == "first_order" and batches is not None:
      batches = list(batches)
      how = f"first-order importance on {len(batches)} batches"
    else:
      how = f"{importance} importance"
    scores = importance_scores(None, teacher_config, teacher_params,
                               batches if importance == "first_order" else None, kind=importance)
  selection = select_units(teacher_config, student_config, method=kind, scores=scores,
                           layer_mapping=layer_mapping, seed=seed)
  params = extract_student(teacher_config, teacher_params, student_config, selection=selection)
  if student_head is not None and student_head != teacher_head:
    params = pretrained.adapt_params(params, teacher_head, student_head, student_config,
                                     seed=seed)
  log.info("%s: ETD-%s (%s) extracted the student from the teacher: %s", where,
           "Impt" if kind == "impt" else "Rand", how, selection.describe(teacher_config))
  return params
