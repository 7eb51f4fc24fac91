"""Optimiser shared by every stage: LR schedule, weight-decay mask, per-parameter LR
multipliers and the LAMB / AdamW chain (optax).

Reference MobileBERT settings (Sun et al., 2020; google-research `mobilebert/`, README and
optimization.py `create_optimizer`): LAMB, learning rate 1.5e-3, batch 2048, weight decay 0.01
on kernels/embeddings only. Pretraining distillation: 10k linear warm-up steps then linear decay
to `end_lr_rate` x 1.5e-3 (end_lr_rate = 1e-4; `end_learning_rate` in
configs/mobilebert_distill.py, 0 by default here). The layer-wise phase runs at a constant 1.5e-3
(`num_warmup_steps=0`, `end_lr_rate=1.0`: `schedule="constant"` here); progressive knowledge
transfer (PKT) shapes it per layer with `scale_by_multipliers`
(`mobilebert_jax.distill.strategies.pkt_multipliers`).

Steps: with gradient accumulation (`grad_accum_steps` = k > 1, `optax.MultiSteps`) the schedule
and the multipliers count optimizer steps, one per k micro-steps (batches); a stage of N
micro-steps makes N // k updates.

Parameter paths are the '/'-joined dict keys of the params tree, e.g.
"encoder/layer_0/attention/query/kernel" (flax box wrappers such as
`LogicallyPartitioned` are transparent).
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], jax.Array]

# Defaults of `create_optimizer` (MobileBERT distillation reference where one exists).
DEFAULTS = {
    "learning_rate": 1.5e-3,
    "warmup_steps": 10_000,
    "end_learning_rate": 0.0,
    "decay_power": 1.0,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-6,
    "weight_decay": 0.01,
    "grad_clip_norm": 1.0,
    "grad_accum_steps": 1,
    "schedule": "linear",
    "optimizer": "lamb",
    "trust_ratio_on_all_params": False,
    "bias_correction": True,
}
SCHEDULES = ("linear", "constant")


# ----------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------

def learning_rate_schedule(base_lr: float, warmup_steps: int, total_steps: int,
                           end_lr: float = 0.0, power: float = 1.0,
                           decay: bool = True) -> Schedule:
  """Linear warm-up then polynomial decay (or a constant rate), as a jit-able `step -> lr`:

      lr(s) = base_lr * s / warmup_steps                                  for s < warmup
      lr(s) = (base_lr - end_lr) * (1 - (s - warmup) / (total - warmup))^power + end_lr
                                                                          for s >= warmup
  clamped to end_lr for s >= total_steps; with `decay=False`, lr(s) = base_lr for s >= warmup
  (the release's layer-wise phase: `end_lr_rate=1.0`). lr(0) = 0 when warmup_steps > 0.
  """
  if not base_lr >= 0:
    raise ValueError(f"base_lr must be >= 0, got {base_lr!r}")
  if not end_lr >= 0:
    raise ValueError(f"end_lr must be >= 0, got {end_lr!r}")
  if int(warmup_steps) != warmup_steps or warmup_steps < 0:
    raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
  if int(total_steps) != total_steps or total_steps < warmup_steps:
    raise ValueError(
        f"total_steps must be an int >= warmup_steps ({warmup_steps}), got {total_steps!r}")
  if not power > 0:
    raise ValueError(f"power must be > 0, got {power!r}")
  warmup, total = int(warmup_steps), int(total_steps)
  decay_steps = max(total - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base_lr * step / max(warmup, 1)
    if decay:
      frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      after = (base_lr - end_lr) * (1.0 - frac) ** power + end_lr
    else:
      after = jnp.full_like(step, base_lr)
    return jnp.where(step < warmup, warm, after)

  return schedule


# ----------------------------------------------------------------------------------------
# Parameter paths, weight-decay mask and multipliers
# ----------------------------------------------------------------------------------------

def _key_name(key) -> Optional[str]:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return None if key.name == "value" else key.name  # flax boxes keep the array in .value
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def param_path(path) -> tuple[str, ...]:
  """Names along a `jax.tree_util` key path (box `.value` attributes dropped)."""
  return tuple(n for n in (_key_name(k) for k in path) if n is not None)


def decay_mask(params) -> Any:
  """Pytree of bools matching `params`: True where weight decay applies.

  False for leaves named `bias` or `scale`, for every leaf under a module whose
  name contains "norm" (case-insensitive: LayerNorm, NoNorm, `norm`, ...) and for
  learned quantization step sizes (under `lsq_steps`); True for everything else
  (kernels, embeddings).
  """
  def is_decayed(path, _):
    names = param_path(path)
    if not names:
      return True
    if names[-1] in ("bias", "scale") or "lsq_steps" in names:
      return False
    return not any("norm" in n.lower() for n in names[:-1])

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def path_multipliers(params, rules: Sequence[tuple[str, Any]], default: Any = 1.0) -> Any:
  """Tree matching `params` whose leaves are multipliers chosen by regex over paths.

  Each leaf's '/'-joined path is tested with `re.search` against `rules` in order
  [(regex, value), ...]; the first match gives its value, else `default`. Values may
  be floats or traced jnp scalars (e.g. computed from the step inside `multiplier_fn`).
  """
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ValueError(f"rule {i} must be a (regex, multiplier) pair, got {rule!r}")
    pattern, value = rule
    try:
      compiled.append((re.compile(pattern), value))
    except (re.error, TypeError) as err:
      raise ValueError(f"rule {i}: invalid regex {pattern!r}: {err}") from None

  def pick(path, _):
    joined = "/".join(param_path(path))
    for regex, value in compiled:
      if regex.search(joined):
        return value
    return default

  return jax.tree_util.tree_map_with_path(pick, params)


class ScaleByMultipliersState(NamedTuple):
  """State of `scale_by_multipliers`: number of updates applied so far."""
  count: jax.Array


def scale_by_multipliers(multiplier_fn: Callable[[jax.Array], Any]) -> optax.GradientTransformation:
  """Multiplies each update leaf by `multiplier_fn(step)` (step = updates applied so far).

  `multiplier_fn` must be jit-able and return a tree matching the params or a prefix of
  it (a single scalar scales everything). Where a multiplier is exactly 0 the update is
  replaced by -0.0, so `optax.apply_updates` leaves the parameter bit-for-bit unchanged
  (x + -0.0 == x for every float, including NaN/inf updates being discarded).
  """
  def init_fn(params):
    del params
    return ScaleByMultipliersState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    multipliers = multiplier_fn(state.count)

    def scale_leaf(u, m):
      m = jnp.asarray(m, jnp.float32)
      scaled = (u.astype(jnp.float32) * m).astype(u.dtype)
      return jnp.where(m == 0, jnp.asarray(-0.0, u.dtype), scaled)

    try:
      new_updates = jax.tree_util.tree_map(
          lambda m, sub: jax.tree_util.tree_map(lambda u: scale_leaf(u, m), sub),
          multipliers, updates)
    except ValueError as err:
      raise ValueError(
          "multiplier_fn(step) must return a tree matching the params or a prefix of "
          f"it: {err}") from None
    return new_updates, ScaleByMultipliersState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------
# Optimiser factory
# ----------------------------------------------------------------------------------------

STACKED_LAYERS_KEY = "layers"  # where models under nn.scan keep their stacked layers


def scale_by_trust_ratio_per_layer() -> optax.GradientTransformation:
  """LAMB's trust ratio: u * ||p|| / ||u|| per parameter tensor, 1 where either norm is 0 (as
  `optax.scale_by_trust_ratio`); a tensor of layers stacked on a leading axis for `nn.scan`
  (under a `layers` key) gets one ratio per layer, so scanning leaves the update unchanged."""

  def update_fn(updates, state, params=None):
    def scale(path, u, p):
      axes = tuple(range(1, u.ndim)) if STACKED_LAYERS_KEY in param_path(path)[:-1] else None
      p_norm = jnp.sqrt(jnp.sum(jnp.square(p), axis=axes, keepdims=axes is not None))
      u_norm = jnp.sqrt(jnp.sum(jnp.square(u), axis=axes, keepdims=axes is not None))
      ratio = jnp.where((p_norm == 0) | (u_norm == 0), 1.0, p_norm / u_norm)
      return (u * ratio).astype(u.dtype)
    return jax.tree_util.tree_map_with_path(scale, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class MomentsState(NamedTuple):
  """First and second moments of `scale_by_moments` without bias correction."""
  mu: Any
  nu: Any


def scale_by_moments(b1: float, b2: float, eps: float, bias_correction: bool = True
                     ) -> optax.GradientTransformation:
  """u = m_t / (sqrt(v_t) + eps) with m_t = b1 m + (1 - b1) g, v_t = b2 v + (1 - b2) g^2.

  `bias_correction=True` divides m_t and v_t by (1 - b^t) (Adam, Kingma & Ba 2015;
  `optax.scale_by_adam`). False keeps the raw moments, as the google-research MobileBERT
  release's `lamb_optimizer.py` and BERT's `AdamWeightDecayOptimizer` do: the first updates are
  then smaller by about (1 - b1) / sqrt(1 - b2), which their warm-up absorbs.
  """
  if bias_correction:
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def init_fn(params):
    zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)
    return MomentsState(mu=zeros(), nu=zeros())

  def update_fn(updates, state, params=None):
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu,
                                updates)
    scaled = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return scaled, MomentsState(mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def create_optimizer(cfg, multiplier_fn: Optional[Callable[[jax.Array], Any]] = None):
  """Builds the optimiser from a ConfigDict (or dict); returns `(tx, schedule_fn)`.

  Fields (default): learning_rate (1.5e-3), warmup_steps (10000, optimizer steps), total_steps
  (required: the stage's length in micro-steps, i.e. batches), end_learning_rate (0.0),
  decay_power (1.0), schedule ("linear": warm-up then decay; "constant": warm-up then
  learning_rate), b1 (0.9), b2 (0.999), eps (1e-6), weight_decay (0.01), grad_clip_norm (1.0;
  <= 0 disables), grad_accum_steps (1; k > 1 wraps in `optax.MultiSteps`, averaging the
  gradients of k micro-steps), optimizer ("lamb" or "adamw"), trust_ratio_on_all_params
  (False: as in the reference LAMB, parameters without weight decay skip the layer-wise trust
  ratio), bias_correction (True: Adam's; False: the raw moments, as the MobileBERT release's
  LAMB and BERT's AdamWeightDecayOptimizer, `scale_by_moments`).

  Chain: clip by global norm -> Adam moments -> decoupled weight
  decay on `decay_mask` -> [LAMB: trust ratio ||p|| / ||u|| per tensor, per layer of a
  stacked tensor] -> -lr(step) -> `scale_by_multipliers(multiplier_fn)` if given.

  The schedule runs over optimizer steps, as MultiSteps counts them: total_steps // k updates,
  warmup_steps of them warming up; `schedule_fn(n)` is the rate of update n (0-based), which
  the micro-step m applies when m % k == k - 1, n = m // k. `multiplier_fn` gets n too.
  """
  def get(name):
    return cfg.get(name, DEFAULTS[name])

  total_steps = cfg.get("total_steps", None)
  if total_steps is None:
    raise ValueError("optimizer config needs total_steps (got none)")
  name = str(get("optimizer")).lower()
  if name not in ("lamb", "adamw"):
    raise ValueError(f"optimizer must be 'lamb' or 'adamw', got {get('optimizer')!r}")
  accum = get("grad_accum_steps")
  if int(accum) != accum or accum < 1:
    raise ValueError(f"grad_accum_steps must be an int >= 1, got {accum!r}")
  accum = int(accum)
  weight_decay = float(get("weight_decay"))
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
  kind = str(get("schedule"))
  if kind not in SCHEDULES:
    raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {kind!r}")
  if int(total_steps) != total_steps or total_steps < 0:
    raise ValueError(f"total_steps must be an int >= 0, got {total_steps!r}")
  updates = int(total_steps) // accum
  warmup = get("warmup_steps")
  if accum > 1 and int(warmup) == warmup and updates < warmup:
    raise ValueError(f"total_steps={total_steps} micro-steps make {updates} optimizer steps "
                     f"with grad_accum_steps={accum}, fewer than warmup_steps={warmup}")

  schedule_fn = learning_rate_schedule(
      float(get("learning_rate")), warmup, updates,
      end_lr=float(get("end_learning_rate")), power=float(get("decay_power")),
      decay=kind == "linear")

  parts = []
  clip = get("grad_clip_norm")
  if clip is not None and clip > 0:
    parts.append(optax.clip_by_global_norm(float(clip)))
  parts.append(scale_by_moments(float(get("b1")), float(get("b2")), float(get("eps")),
                                bias_correction=bool(get("bias_correction"))))
  if weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  if name == "lamb":
    trust = scale_by_trust_ratio_per_layer()
    parts.append(trust if get("trust_ratio_on_all_params") else optax.masked(trust, decay_mask))
  parts.append(optax.scale_by_learning_rate(schedule_fn))
  if multiplier_fn is not None:
    parts.append(scale_by_multipliers(multiplier_fn))
  tx = optax.chain(*parts)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(accum)).gradient_transformation()
  return tx, schedule_fn
