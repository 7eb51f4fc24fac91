"""The cross-view training (CVT) sequence tagger: a CNN-BiLSTM encoder, the primary prediction
module and the auxiliary modules that see restricted views of the input.

Clark, Luong, Manning and Le, 2018, "Semi-Supervised Sequence Modeling with Cross-View
Training" (EMNLP), sections 2 and 3.1; sizes and details not in the paper's text follow the
authors' release (tensorflow/models research/cvt_text, `base/configure.py`,
`model/encoder.py`, `task_specific/word_level/tagging_module.py`).

Encoder (section 3.1). Each word x_t is its word embedding concatenated with a character CNN
(char embeddings, one convolution per filter width, ReLU, max over the word's characters):

    v_t = [E_word[x_t] ; max_k ReLU(conv_w(E_char[chars(x_t)]))_k  for w in widths]

(`word_dropout`, a share of words whose E_word[x_t] is zeroed: not in the paper, see
`cvt.stage.STAGE_KEYS`), then a two-layer Bi-LSTM whose first layer's directions are read
apart by the auxiliary modules:

    h1->_t = LSTM->(v_1..v_t),  h1<-_t = LSTM<-(v_t..v_T),  h1_t = [h1->_t ; h1<-_t]
    h2_t = [LSTM2->(h1_1..h1_t) ; LSTM2<-(h1_t..h1_T)]

The LSTMs project their output (LSTMP; Sak, Senior and Beaufays, 2014) to `projection_size`
as the release does (`LSTMCell(size, num_proj=min(size, projection_size))`); both directions of
a layer step in one `nn.RNN` scan (`BidirectionalCell`), each sentence read within its length.
Dropout (a rate per call or per row) is applied to the word embeddings, the char-CNN features
and every LSTM layer's outputs, as in the release's encoder.

Prediction modules (section 3.1): one ReLU hidden layer then a softmax,

    NN(h) = softmax(U ReLU(W h + a) + b)

    primary   p(y_t | x)        = NN_primary([h1_t ; h2_t])
    forward   p_fwd(y_t | x)    = NN_fwd(h1->_t)         sees x_1..x_t
    backward  p_bwd(y_t | x)    = NN_bwd(h1<-_t)         sees x_t..x_T
    future    p_future(y_t | x) = NN_future(h1->_{t-1})  sees x_1..x_{t-1}: not x_t
    past      p_past(y_t | x)   = NN_past(h1<-_{t+1})    sees x_{t+1}..x_T: not x_t

and, from the release only, "full": [h1_t ; h2_t] through a linear hidden layer (no ReLU), the
full view under dropout. Sentences carry boundary tokens <s> and </s> (the release's
minibatches do the same), so h1->_{t-1} and h1<-_{t+1} exist for every real word.

Every parameter carries logical axes (`mobilebert_jax.parallel.sharding.LOGICAL_RULES`):
vocabulary rows "vocab", embedding and LSTM-output widths "embed", gate and hidden-layer widths
"mlp", tag outputs "labels".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.recurrent import flip_sequences

Dtype = Any

VIEWS = ("forward", "backward", "future", "past", "full")
# The paper's auxiliary modules for sequence tagging (section 3.1); "full" is the release's.
PAPER_VIEWS = ("forward", "backward", "future", "past")


@dataclasses.dataclass(frozen=True)
class CVTConfig:
  """The tagger's sizes. Defaults are the paper's / release's (`base/configure.py`): 300-d word
  embeddings (GloVe in the paper), 50-d char embeddings, 100 char-CNN filters of widths 2, 3
  and 4, a 1024-unit first Bi-LSTM layer and a 512-unit second one, projections and hidden
  layers of 512."""
  word_vocab_size: int
  char_vocab_size: int
  num_tags: int
  word_embedding_size: int = 300
  char_embedding_size: int = 50
  char_filter_widths: tuple[int, ...] = (2, 3, 4)
  char_filters: int = 100
  first_lstm_size: int = 1024
  second_lstm_size: int = 512
  projection_size: int = 512
  views: tuple[str, ...] = PAPER_VIEWS

  def __post_init__(self):
    object.__setattr__(self, "char_filter_widths", tuple(int(w) for w in self.char_filter_widths))
    object.__setattr__(self, "views", tuple(str(v) for v in self.views))
    for field in ("word_vocab_size", "char_vocab_size", "num_tags", "word_embedding_size",
                  "char_embedding_size", "char_filters", "first_lstm_size", "second_lstm_size",
                  "projection_size"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    if not self.char_filter_widths or min(self.char_filter_widths) < 1:
      raise ValueError(f"char_filter_widths must be positive integers, got "
                       f"{self.char_filter_widths!r}")
    unknown = [v for v in self.views if v not in VIEWS]
    if unknown or len(set(self.views)) != len(self.views):
      raise ValueError(f"views {self.views!r}: each must be one of {list(VIEWS)}, once")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "CVTConfig":
    return cls(**values)


# Character vectors: nn.Embed's default, N(0, 1 / width). Word vectors start near zero, so a word
# not learned yet (seen only in unlabelled text) adds almost nothing to its position and is read
# by its characters and context, like a word dropped by `word_dropout` (the paper starts from
# GloVe vectors instead).
EMBED_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
WORD_INIT = nn.initializers.normal(0.01)


def _init(axes, base=nn.initializers.xavier_uniform()):
  """`base` with logical axes `axes` (glorot uniform: TensorFlow's default, as the release)."""
  return nn.with_logical_partitioning(base, axes)


def _dense(features: int, in_axis: str, out_axis: str, name: str, use_bias: bool = True):
  return nn.Dense(features, use_bias=use_bias, kernel_init=_init((in_axis, out_axis)),
                  bias_init=_init((out_axis,), nn.initializers.zeros_init()), name=name)


def dropout(module: nn.Module, x: jax.Array, rate) -> jax.Array:
  """Inverted dropout of [B, ...] `x` at `rate`: a Python float (0: the identity, no rng drawn)
  or one rate per row [B] (a row at rate 0 is left exactly as it is)."""
  if isinstance(rate, (int, float)):
    if rate <= 0.0:
      return x
    rate = jnp.full(x.shape[:1], rate)
  keep = (1.0 - jnp.asarray(rate, jnp.float32)).reshape((-1,) + (1,) * (x.ndim - 1))
  mask = jax.random.uniform(module.make_rng("dropout"), x.shape) < keep
  return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class ProjectedLSTMCell(nn.RNNCellBase):
  """An LSTM cell whose output is projected (LSTMP; Sak et al., 2014), forget bias 1 (TF's
  `LSTMCell` default, as the release):

      [i, f, g, o] = W x_t + R r_{t-1} + b
      c_t = sigmoid(f + 1) * c_{t-1} + sigmoid(i) * tanh(g)
      r_t = P (sigmoid(o) * tanh(c_t))        (P: [size, projection], no bias)
  """
  size: int
  projection_size: int

  @nn.compact
  def __call__(self, carry, x):
    c, r = carry
    gates = (_dense(4 * self.size, "embed", "mlp", "input")(x) +
             _dense(4 * self.size, "embed", "mlp", "recurrent", use_bias=False)(r))
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    r = _dense(self.projection_size, "mlp", "embed", "projection", use_bias=False)(h)
    return (c, r), r

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    batch = input_shape[:-1]
    return (jnp.zeros(batch + (self.size,)), jnp.zeros(batch + (self.projection_size,)))

  @property
  def num_feature_axes(self) -> int:
    return 1


class BidirectionalCell(nn.RNNCellBase):
  """A forward and a backward `ProjectedLSTMCell` stepped together: its input at step t is
  [x_t ; x'_t] with x' the sequence reversed within its length (`flip_sequences`), so one scan
  runs both directions of a Bi-LSTM layer."""
  size: int
  projection_size: int

  @nn.compact
  def __call__(self, carry, x):
    inputs = jnp.split(x, 2, axis=-1)
    carries, outputs = [], []
    for direction, part, state in zip(("forward", "backward"), inputs, carry):
      state, out = ProjectedLSTMCell(self.size, self.projection_size, name=direction)(state, part)
      carries.append(state)
      outputs.append(out)
    return tuple(carries), jnp.concatenate(outputs, -1)

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    half = input_shape[:-1] + (input_shape[-1] // 2,)
    cell = ProjectedLSTMCell(self.size, self.projection_size, parent=None)
    return (cell.initialize_carry(rng, half), cell.initialize_carry(rng, half))

  @property
  def num_feature_axes(self) -> int:
    return 1


class CharCNN(nn.Module):
  """Per-word character features: embeddings (the padding char 0 embeds to zeros), one wide
  convolution per filter width (zero-padded by width - 1 on both sides, so every window holds at
  least one of the word's characters), ReLU, max over the windows that touch the word. The
  result does not depend on how far the character axis is padded."""
  config: CVTConfig

  @nn.compact
  def __call__(self, chars):                       # [B, W, C] char ids, 0 = padding
    cfg = self.config
    b, w, c = chars.shape
    table = self.param("embedding", _init(("vocab", "embed"), EMBED_INIT),
                       (cfg.char_vocab_size, cfg.char_embedding_size))
    present = chars > 0
    x = jnp.where(present[..., None], table[chars], 0.0).reshape(b * w, c, -1)
    word_length = present.sum(-1).reshape(b * w, 1)
    features = []
    for width in cfg.char_filter_widths:
      conv = nn.Conv(cfg.char_filters, (width,), padding=((width - 1, width - 1),),
                     kernel_init=_init((None, "embed", "mlp")),
                     bias_init=_init(("mlp",), nn.initializers.zeros_init()),
                     name=f"conv_{width}")(x)       # [B*W, C + width - 1, F]
      end = jnp.arange(conv.shape[1])[None, :]      # window k covers chars k-width+1 .. k
      touches = (end < word_length + width - 1) & (word_length > 0)
      relu = jnp.where(touches[..., None], jax.nn.relu(conv), 0.0)
      features.append(relu.max(axis=1).reshape(b, w, cfg.char_filters))
    return jnp.concatenate(features, axis=-1)


class PredictionModule(nn.Module):
  """NN(h) = U act(W h + a) + b: the logits of one prediction module (act ReLU, or identity
  for the release's "full" module)."""
  num_tags: int
  hidden_size: int
  activate: bool = True

  @nn.compact
  def __call__(self, h):
    h = _dense(self.hidden_size, "embed", "mlp", "hidden")(h)
    if self.activate:
      h = jax.nn.relu(h)
    return _dense(self.num_tags, "mlp", "labels", "logits")(h)


class CVTTagger(nn.Module):
  """The CVT tagger (module docstring). `__call__(words, chars, lengths)` with words [B, W],
  chars [B, W, C] and lengths [B] (tokens including <s> and </s>; positions >= length are
  padding and reach no real position) returns {"primary": logits [B, W, num_tags]} plus one
  entry per auxiliary view when `with_views`. `dropout_rate` (a float, or one rate per row) > 0
  needs a "dropout" rng."""
  config: CVTConfig

  def encode(self, words, chars, lengths, dropout_rate=0.0, word_dropout=0.0):
    """(h1->, h1<-, h2) [B, W, projection] each (layer-2 directions concatenated), zero at
    padding positions."""
    cfg = self.config
    table = self.param("word_embedding", _init(("vocab", "embed"), WORD_INIT),
                       (cfg.word_vocab_size, cfg.word_embedding_size))
    embedded = table[words]
    if not isinstance(word_dropout, (int, float)) or word_dropout > 0:
      rate = jnp.broadcast_to(jnp.asarray(word_dropout, jnp.float32), words.shape[:1])
      kept = jax.random.uniform(self.make_rng("dropout"), words.shape) >= rate[:, None]
      embedded = jnp.where(kept[..., None], embedded, 0.0)
    v = jnp.concatenate([dropout(self, embedded, dropout_rate),
                         dropout(self, CharCNN(cfg, name="char_cnn")(chars), dropout_rate)], -1)
    mask = (jnp.arange(words.shape[1])[None, :] < lengths[:, None])[..., None]

    def flip(x):  # reversed within each sentence's length; padding stays at the end
      return flip_sequences(x, lengths, num_batch_dims=1, time_major=False)

    def bilstm(x, size, name):
      cell = BidirectionalCell(size, min(size, cfg.projection_size), parent=None)
      out = nn.RNN(cell, name=name)(jnp.concatenate([x, flip(x)], -1), seq_lengths=lengths)
      fw, bw = jnp.split(out, 2, axis=-1)
      return (jnp.where(mask, dropout(self, fw, dropout_rate), 0.0),
              jnp.where(mask, dropout(self, flip(bw), dropout_rate), 0.0))

    fw1, bw1 = bilstm(v, cfg.first_lstm_size, "lstm_1")
    fw2, bw2 = bilstm(jnp.concatenate([fw1, bw1], -1), cfg.second_lstm_size, "lstm_2")
    return fw1, bw1, jnp.concatenate([fw2, bw2], -1)

  @nn.compact
  def __call__(self, words, chars, lengths, *, dropout_rate=0.0, word_dropout=0.0,
               with_views: bool = False) -> dict[str, jax.Array]:
    cfg = self.config
    fw1, bw1, h2 = self.encode(words, chars, lengths, dropout_rate, word_dropout)
    hidden = cfg.projection_size
    full = jnp.concatenate([fw1, bw1, h2], -1)
    out = {"primary": PredictionModule(cfg.num_tags, hidden, name="primary")(full)}
    if not with_views:
      return out
    inputs = {
        "forward": fw1,
        "backward": bw1,
        "future": jnp.pad(fw1, ((0, 0), (1, 0), (0, 0)))[:, :-1],   # h1->_{t-1}
        "past": jnp.pad(bw1, ((0, 0), (0, 1), (0, 0)))[:, 1:],      # h1<-_{t+1}
        "full": full,
    }
    for view in cfg.views:
      out[view] = PredictionModule(cfg.num_tags, hidden, activate=view != "full",
                                   name=view)(inputs[view])
    return out


def rbg_key(rng: jax.Array) -> jax.Array:
  """A key of the RBG generator made of `rng`'s bits (a legacy uint32 key or a typed one): the
  same draws for the same `rng`, and XLA compiles RBG's draws several times faster than
  threefry's on CPU (the tagger draws a few dozen initial tensors and dropout masks)."""
  bits = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  return jax.random.wrap_key_data(jnp.tile(jnp.asarray(bits, jnp.uint32).ravel()[:2], 2),
                                  impl="rbg")


def init_params(model: CVTTagger, rng: jax.Array, boxed: bool = False):
  """The tagger's parameters (every module, auxiliary ones included) from a dummy sentence;
  `boxed` keeps the logical-axis boxes. Drawn with `rbg_key(rng)`."""
  words = jnp.zeros((1, 3), jnp.int32)
  chars = jnp.zeros((1, 3, 2), jnp.int32)
  params = model.init({"params": rbg_key(rng)}, words, chars, jnp.full((1,), 3, jnp.int32),
                      with_views=True)["params"]
  return params if boxed else nn.meta.unbox(params)


def count_params(params, modules: tuple[str, ...] | None = None) -> int:
  """Number of parameters (of the top-level `modules` only, when given)."""
  tree = params if modules is None else {k: v for k, v in params.items() if k in modules}
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def inference_modules(params) -> tuple[str, ...]:
  """The top-level entries used at test time: the encoder and the primary module."""
  return tuple(k for k in params if k not in VIEWS)
