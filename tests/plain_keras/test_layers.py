"""Tests of the masked Keras layers (fedmask_tff.masks.layers and fedmask_tff.masks.lstm).

The expected values are computed independently of the layers: with numpy
(matmul, a loop-based conv, a loop-based LSTM) or with Keras' own LSTM.
Gradient checks use the closed form of the FedMask score gradient:
``dL/dm_r = dL/dW_eff * W * keep * sigmoid'(m_r)`` (both in ``"ste"`` mode, whose
forward mask is binary, and in ``"soft"`` mode, whose forward mask is ``sigmoid(m_r)``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.masks import layers as L
from fedmask_tff.masks.layers import MaskedConv2D, MaskedDense, masked_layers, mask_variables
from fedmask_tff.masks.lstm import MaskedLSTM, MaskedLSTMCell

RTOL, ATOL = 1e-4, 1e-5
GATES = "ifco"


# ----------------------------------------------------------------- helpers ---

def short_name(variable) -> str:
  """A variable's own name without scope or ':0' (Keras 2 and 3 spell these differently)."""
  return variable.name.split("/")[-1].split(":")[0]


def sigmoid(s):
  return 1.0 / (1.0 + np.exp(-np.asarray(s, np.float64)))


def dsigmoid(s):
  p = sigmoid(s)
  return p * (1.0 - p)


def randomize_masks(layer, rng, keep_frac=0.75, margin=0.2):
  """Random scores kept away from the threshold 0.5 (score 0) and random 0/1 keeps."""
  for _, _, scores, keep in layer.masked_weights:
    shape = tuple(scores.shape)
    s = rng.standard_normal(shape)
    s = np.sign(s) * (margin + np.abs(s))
    scores.assign(s.astype(np.float32))
    k = (rng.random(shape) < keep_frac).astype(np.float32)
    keep.assign(k)


def numpy_mask(scores, keep, mode, training, threshold=0.5):
  scores = np.asarray(scores, np.float64)
  if training and mode == "soft":
    m = sigmoid(scores)
  else:
    m = (sigmoid(scores) >= threshold).astype(np.float64)
  return m * np.asarray(keep, np.float64)


def score_grad(dW_eff, kernel, scores, keep):
  """Closed form dL/dm_r = dL/dW_eff * W * keep * sigmoid'(m_r)."""
  return np.asarray(dW_eff) * np.asarray(kernel) * np.asarray(keep) * dsigmoid(scores)


def np_conv2d(x, w, strides, padding):
  """Cross-correlation like tf.nn.conv2d (NHWC, HWIO), plus a helper to get dL/dW."""
  b, h, wd, c = x.shape
  kh, kw, _, f = w.shape
  sh, sw = strides
  if padding == "same":
    oh, ow = -(-h // sh), -(-wd // sw)
    ph = max((oh - 1) * sh + kh - h, 0)
    pw = max((ow - 1) * sw + kw - wd, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  else:
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    xp = x
  patches = {}
  y = np.zeros((b, oh, ow, f))
  for di in range(kh):
    for dj in range(kw):
      p = xp[:, di:di + sh * (oh - 1) + 1:sh, dj:dj + sw * (ow - 1) + 1:sw, :]
      patches[di, dj] = p
      y += np.einsum("bhwc,cf->bhwf", p, w[di, dj])

  def filter_grad(g):
    dw = np.zeros(w.shape)
    for (di, dj), p in patches.items():
      dw[di, dj] = np.einsum("bhwc,bhwf->cf", p, g)
    return dw

  return y, filter_grad


def np_lstm(x, wx, wh, b):
  """Plain LSTM (gate order i, f, c, o); returns all hidden states [batch, time, units]."""
  batch, steps, _ = x.shape
  u = wh.shape[0]
  h = np.zeros((batch, u))
  c = np.zeros((batch, u))
  out = []
  for t in range(steps):
    z = x[:, t] @ wx + h @ wh + b
    zi, zf, zc, zo = np.split(z, 4, axis=1)
    c = sigmoid(zf) * c + sigmoid(zi) * np.tanh(zc)
    h = sigmoid(zo) * np.tanh(c)
    out.append(h)
  return np.stack(out, axis=1)


def lstm_effective(cell, mode, training):
  """Full W_x [in, 4u] and W_h [u, 4u] assembled in numpy from the cell's variables.

  Masked gates' columns (the k-th masked gate is the k-th block of ``kernel``)
  are W * mask * keep; real gates' columns come from ``real_kernel`` likewise.
  """
  u = cell.units
  masked = [g for g in GATES if g in cell.masked_gates]
  real = [g for g in GATES if g not in cell.masked_gates]
  out = []
  for kern, scores, keep, real_kern in (
      (cell.kernel, cell.scores, cell.keep, cell.real_kernel),
      (cell.recurrent_kernel, cell.recurrent_scores, cell.recurrent_keep,
       cell.real_recurrent_kernel)):
    eff_masked = kern.numpy() * numpy_mask(scores.numpy(), keep.numpy(), mode, training)
    cols = []
    for g in GATES:
      if g in masked:
        k = masked.index(g)
        cols.append(eff_masked[:, k * u:(k + 1) * u])
      else:
        k = real.index(g)
        cols.append(real_kern.numpy()[:, k * u:(k + 1) * u])
    out.append(np.concatenate(cols, axis=1))
  return out


# -------------------------------------------------------------- MaskedDense ---

@pytest.mark.parametrize("mode", ["ste", "soft"])
@pytest.mark.parametrize("loss", ["linear", "xent"])
def test_dense_score_gradient_closed_form(mode, loss):
  rng = np.random.default_rng(1)
  layer = MaskedDense(5, seed=3, mask_mode=mode, use_bias=True, bias_initializer="ones")
  layer.build((None, 4))
  randomize_masks(layer, rng)
  x = rng.standard_normal((6, 4)).astype(np.float32)
  W, s, k = layer.kernel.numpy(), layer.scores.numpy(), layer.keep.numpy()
  y_np = x.astype(np.float64) @ (W * numpy_mask(s, k, mode, True)) + 1.0
  if loss == "linear":
    g = rng.standard_normal((6, 5)).astype(np.float32)
    loss_fn = lambda y: tf.reduce_sum(y * g)
    dy = g.astype(np.float64)
  else:
    labels = rng.integers(0, 5, size=6)
    loss_fn = lambda y: tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, y)
    p = np.exp(y_np - y_np.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dy = (p - np.eye(5)[labels]) / 6.0

  with tf.GradientTape(persistent=True) as tape:
    y = layer(x, training=True)
    value = loss_fn(y)
  np.testing.assert_allclose(y.numpy(), y_np, rtol=RTOL, atol=ATOL)
  # Only the scores are trainable, and only they get a gradient.
  assert [id(v) for v in layer.trainable_variables] == [id(layer.scores)]
  assert not layer.kernel.trainable and not layer.keep.trainable and not layer.bias.trainable
  assert tape.gradient(value, layer.kernel) is None
  assert tape.gradient(value, layer.keep) is None
  grad = tape.gradient(value, layer.scores).numpy()
  expected = score_grad(x.T.astype(np.float64) @ dy, W, s, k)
  np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=ATOL)
  assert np.all(grad[k == 0] == 0)


def test_dense_rank3_input_gradient():
  rng = np.random.default_rng(2)
  layer = MaskedDense(3, seed=1, mask_mode="ste")
  x = rng.standard_normal((2, 5, 4)).astype(np.float32)
  layer.build((None, 5, 4))
  randomize_masks(layer, rng)
  g = rng.standard_normal((2, 5, 3)).astype(np.float32)
  with tf.GradientTape() as tape:
    value = tf.reduce_sum(layer(x, training=True) * g)
  W, s, k = layer.kernel.numpy(), layer.scores.numpy(), layer.keep.numpy()
  dW = np.einsum("bti,btj->ij", x.astype(np.float64), g)
  np.testing.assert_allclose(tape.gradient(value, layer.scores).numpy(),
                             score_grad(dW, W, s, k), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["ste", "soft"])
def test_dense_forward_masks(mode):
  rng = np.random.default_rng(3)
  layer = MaskedDense(6, seed=5, mask_mode=mode)
  layer.build((None, 7))
  randomize_masks(layer, rng)
  x = rng.standard_normal((3, 7)).astype(np.float32)
  W, s, k = layer.kernel.numpy(), layer.scores.numpy(), layer.keep.numpy()
  hard = W * (sigmoid(s) >= 0.5) * k
  # Inference (explicitly, and by default with no learning phase) uses the binary mask.
  np.testing.assert_allclose(layer(x, training=False).numpy(), x @ hard, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(layer(x).numpy(), x @ hard, rtol=RTOL, atol=ATOL)
  train_w = hard if mode == "ste" else W * sigmoid(s) * k
  np.testing.assert_allclose(layer(x, training=True).numpy(), x @ train_w, rtol=RTOL, atol=ATOL)
  (bm,) = layer.binary_masks()
  np.testing.assert_array_equal(bm.numpy(), (sigmoid(s) >= 0.5) * k)


@pytest.mark.parametrize("mode", ["ste", "soft"])
def test_threshold_respected(mode):
  tau = 0.7
  layer = MaskedDense(4, seed=2, mask_mode=mode, threshold=tau)
  layer.build((None, 1))
  # sigmoid: 0.27, 0.55, 0.71, 0.88 -> with tau = 0.7 only the last two are on.
  s = np.array([[-1.0, 0.2, 0.9, 2.0]], np.float32)
  layer.scores.assign(s)
  x = np.ones((1, 1), np.float32)
  W = layer.kernel.numpy()
  expected_mask = np.array([[0.0, 0.0, 1.0, 1.0]])
  np.testing.assert_array_equal(layer.binary_masks()[0].numpy(), expected_mask)
  np.testing.assert_allclose(layer(x, training=False).numpy(), W * expected_mask, rtol=RTOL)
  if mode == "ste":
    with tf.GradientTape() as tape:
      y = layer(x, training=True)
      value = tf.reduce_sum(y)
    np.testing.assert_allclose(y.numpy(), W * expected_mask, rtol=RTOL)
    np.testing.assert_allclose(tape.gradient(value, layer.scores).numpy(),
                               W * dsigmoid(s), rtol=RTOL, atol=ATOL)


def test_keep_zeros_remove_weights():
  layer = MaskedDense(3, seed=4, mask_mode="soft", score_init=5.0)  # all masks on
  layer.build((None, 2))
  keep = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
  layer.keep.assign(keep)
  W = layer.kernel.numpy()
  x = np.array([[1.0, 2.0]], np.float32)
  np.testing.assert_allclose(layer(x, training=False).numpy(), x @ (W * keep), rtol=RTOL)
  np.testing.assert_allclose(layer(x, training=True).numpy(),
                             x @ (W * keep * sigmoid(5.0)), rtol=RTOL)
  np.testing.assert_array_equal(layer.binary_masks()[0].numpy(), keep)
  # Column 1 is fully pruned: its output is exactly zero whatever the scores.
  layer.scores.assign(np.full((2, 3), 50.0, np.float32))
  assert np.all(layer(x, training=True).numpy()[:, 1] == 0.0)


# ------------------------------------------------------------- MaskedConv2D ---

@pytest.mark.parametrize("mode", ["ste", "soft"])
@pytest.mark.parametrize("padding,strides", [("same", (1, 1)), ("valid", (2, 1)),
                                             ("same", (2, 2))])
def test_conv_forward_and_score_gradient(mode, padding, strides):
  rng = np.random.default_rng(4)
  layer = MaskedConv2D(3, kernel_size=(3, 2), strides=strides, padding=padding, seed=9,
                       mask_mode=mode)
  x = rng.standard_normal((2, 5, 6, 2)).astype(np.float32)
  layer.build(x.shape)
  randomize_masks(layer, rng)
  W, s, k = layer.kernel.numpy(), layer.scores.numpy(), layer.keep.numpy()
  assert W.shape == (3, 2, 2, 3)
  y_np, filter_grad = np_conv2d(x.astype(np.float64), W * numpy_mask(s, k, mode, True),
                                strides, padding)
  g = rng.standard_normal(y_np.shape).astype(np.float32)
  with tf.GradientTape(persistent=True) as tape:
    y = layer(x, training=True)
    value = tf.reduce_sum(y * g)
  np.testing.assert_allclose(y.numpy(), y_np, rtol=RTOL, atol=ATOL)
  assert [id(v) for v in layer.trainable_variables] == [id(layer.scores)]
  assert not layer.kernel.trainable
  assert tape.gradient(value, layer.kernel) is None
  expected = score_grad(filter_grad(g.astype(np.float64)), W, s, k)
  np.testing.assert_allclose(tape.gradient(value, layer.scores).numpy(), expected,
                             rtol=RTOL, atol=ATOL)
  y_inf, _ = np_conv2d(x.astype(np.float64), W * numpy_mask(s, k, mode, False), strides, padding)
  np.testing.assert_allclose(layer(x, training=False).numpy(), y_inf, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------- seeds ---

def test_same_seed_same_kernel_and_signed_constant_values():
  a, b, c = MaskedDense(8, seed=7), MaskedDense(8, seed=7), MaskedDense(8, seed=8)
  for layer in (a, b, c):
    layer.build((None, 5))
  np.testing.assert_array_equal(a.kernel.numpy(), b.kernel.numpy())
  assert not np.array_equal(a.kernel.numpy(), c.kernel.numpy())
  np.testing.assert_allclose(np.abs(a.kernel.numpy()), math.sqrt(2.0 / 5), rtol=1e-6)
  assert (a.kernel.numpy() > 0).any() and (a.kernel.numpy() < 0).any()

  ca, cb, cc = (MaskedConv2D(4, 3, seed=s) for s in (1, 1, 2))
  for layer in (ca, cb, cc):
    layer.build((None, 6, 6, 2))
  np.testing.assert_array_equal(ca.kernel.numpy(), cb.kernel.numpy())
  assert not np.array_equal(ca.kernel.numpy(), cc.kernel.numpy())
  np.testing.assert_allclose(np.abs(ca.kernel.numpy()), math.sqrt(2.0 / (3 * 3 * 2)), rtol=1e-6)


@pytest.mark.parametrize("kind", ["he_normal", "he_uniform"])
def test_other_kernel_inits_deterministic(kind):
  a, b = MaskedDense(4, seed=3, kernel_init=kind), MaskedDense(4, seed=3, kernel_init=kind)
  a.build((None, 50))
  b.build((None, 50))
  np.testing.assert_array_equal(a.kernel.numpy(), b.kernel.numpy())
  if kind == "he_uniform":
    assert np.abs(a.kernel.numpy()).max() <= math.sqrt(6.0 / 50)


def test_lstm_same_seed_same_weights():
  def build(seed):
    layer = MaskedLSTM(3, masked_gates="if", seed=seed)
    layer.build((None, 4, 2))
    return layer.get_weights()

  a, b, c = build(5), build(5), build(6)
  for wa, wb in zip(a, b):
    np.testing.assert_array_equal(wa, wb)
  assert not np.array_equal(a[0], c[0]) or not np.array_equal(a[2], c[2])


# ---------------------------------------------------- config and serialization ---

LAYER_FACTORIES = {
    "dense": (lambda: MaskedDense(3, activation="relu", use_bias=True, seed=4, mask_mode="soft",
                                  threshold=0.6, score_init=0.3, kernel_init="he_uniform"),
              (2, 5)),
    "conv": (lambda: MaskedConv2D(2, (3, 2), strides=(2, 1), padding="valid", seed=2,
                                  mask_mode="ste", kernel_init="he_normal"),
             (2, 6, 5, 3)),
    "lstm": (lambda: MaskedLSTM(3, masked_gates="fo", unit_forget_bias=True,
                                return_sequences=True, seed=11, mask_mode="soft",
                                threshold=0.4, score_init=-0.1), (2, 4, 3)),
    "lstm_cell": (lambda: MaskedLSTMCell(3, masked_gates="ic", seed=1), None),
}


@pytest.mark.parametrize("name", sorted(LAYER_FACTORIES))
def test_get_config_round_trip(name):
  factory, shape = LAYER_FACTORIES[name]
  layer = factory()
  config = layer.get_config()
  clone = type(layer).from_config(config)
  assert clone.get_config() == config
  # Also through Keras' generic (de)serialization by registered name.
  clone2 = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
  assert type(clone2) is type(layer) and clone2.get_config() == config
  if shape is not None:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(layer(x).numpy(), clone(x).numpy(), rtol=1e-6, atol=1e-7)


def _tiny_model():
  return tf.keras.Sequential([
      tf.keras.Input((6, 6, 2)),
      MaskedConv2D(3, 3, seed=1, activation="relu"),
      tf.keras.layers.Reshape((6, 18)),
      MaskedLSTM(4, masked_gates="if", seed=2, return_sequences=True),
      tf.keras.layers.Flatten(),
      MaskedDense(3, seed=3, use_bias=True),
  ])


def test_sequential_config_round_trip_and_save(tmp_path):
  model = _tiny_model()
  rng = np.random.default_rng(5)
  for layer in masked_layers(model):
    randomize_masks(layer, rng)
  assert [type(l) for l in masked_layers(model)] == [MaskedConv2D, MaskedLSTMCell, MaskedDense]
  x = rng.standard_normal((2, 6, 6, 2)).astype(np.float32)
  clone = tf.keras.Sequential.from_config(model.get_config())
  assert clone.get_config() == model.get_config()
  # Same seeds -> same frozen kernels; real LSTM weights are seeded too.
  for a, b in zip(mask_variables(model)[0], mask_variables(clone)[0]):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  clone.set_weights(model.get_weights())
  np.testing.assert_allclose(clone(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)

  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = tf.keras.models.load_model(path)
  np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)
  for a, b in zip(model.weights, loaded.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


# --------------------------------------------------------------------- fit ---

FIT_CASES = {
    "dense_ste": (lambda: [tf.keras.layers.Flatten(), MaskedDense(3, seed=1, mask_mode="ste")],
                  (4, 3)),
    "dense_soft": (lambda: [tf.keras.layers.Flatten(), MaskedDense(3, seed=1, mask_mode="soft")],
                   (4, 3)),
    "conv": (lambda: [MaskedConv2D(2, 3, seed=1, use_bias=True, bias_initializer="ones"),
                      tf.keras.layers.Flatten(), MaskedDense(3, seed=2)], (5, 5, 2)),
    "lstm_ifco": (lambda: [MaskedLSTM(4, seed=1), MaskedDense(3, seed=2)], (5, 3)),
    "lstm_if": (lambda: [MaskedLSTM(4, masked_gates="if", seed=1, unit_forget_bias=True,
                                    mask_mode="soft"), MaskedDense(3, seed=2)], (5, 3)),
}


@pytest.mark.parametrize("name", sorted(FIT_CASES))
def test_fit_changes_scores_not_kernels(name):
  make_layers, in_shape = FIT_CASES[name]
  model = tf.keras.Sequential([tf.keras.Input(in_shape)] + make_layers())
  rng = np.random.default_rng(6)
  x = rng.standard_normal((16,) + in_shape).astype(np.float32)
  y = rng.integers(0, 3, size=16)
  frozen = [v for v in model.weights if not v.trainable]
  before_frozen = [v.numpy().copy() for v in frozen]
  before_train = [v.numpy().copy() for v in model.trainable_weights]
  model.compile(tf.keras.optimizers.SGD(1.0),
                tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x, y, epochs=2, batch_size=8, verbose=0)
  for v, b in zip(frozen, before_frozen):
    np.testing.assert_array_equal(v.numpy(), b, err_msg=v.name)
  for v, b in zip(model.trainable_weights, before_train):
    assert not np.array_equal(v.numpy(), b), f"{v.name} did not change"
  kernels, scores, keeps = mask_variables(model)
  assert all(not v.trainable for v in kernels + keeps)
  names = {id(v) for v in scores}
  extra = [v for v in model.trainable_weights if id(v) not in names]
  if name == "lstm_if":
    assert sorted(short_name(v) for v in extra) == ["real_kernel", "real_recurrent_kernel"]
  else:
    assert extra == []


# ------------------------------------------------------------------- LSTM ---

@pytest.mark.parametrize("masked_gates", ["ifco", "if", "co", "f"])
@pytest.mark.parametrize("mode", ["ste", "soft"])
def test_lstm_forward_matches_numpy(masked_gates, mode):
  rng = np.random.default_rng(7)
  seq = MaskedLSTM(3, masked_gates=masked_gates, mask_mode=mode, unit_forget_bias=True,
                   return_sequences=True, seed=3)
  last = MaskedLSTM(3, masked_gates=masked_gates, mask_mode=mode, unit_forget_bias=True,
                    seed=3)
  x = rng.standard_normal((2, 4, 5)).astype(np.float32)
  seq.build(x.shape)
  last.build(x.shape)
  randomize_masks(seq.cell, rng)
  last.set_weights(seq.get_weights())
  b = seq.cell.bias.numpy()
  np.testing.assert_array_equal(b, np.repeat([0.0, 1.0, 0.0, 0.0], 3))
  for training in (False, True):
    wx, wh = lstm_effective(seq.cell, mode, training)
    expected = np_lstm(x.astype(np.float64), wx, wh, b)
    out = seq(x, training=training).numpy()
    assert out.shape == (2, 4, 3)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    out_last = last(x, training=training).numpy()
    assert out_last.shape == (2, 3)
    np.testing.assert_allclose(out_last, expected[:, -1], rtol=RTOL, atol=ATOL)
  # Gate order agrees with Keras' LSTM given the same effective weights.
  wx, wh = lstm_effective(seq.cell, mode, False)
  ref = tf.keras.layers.LSTM(3, return_sequences=True)
  ref.build(x.shape)
  ref.set_weights([wx, wh, b])
  np.testing.assert_allclose(seq(x).numpy(), ref(x).numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("masked_gates,mode", [("if", "ste"), ("if", "soft"),
                                               ("ifco", "ste"), ("co", "soft")])
def test_lstm_gradients_match_unmasked_reference(masked_gates, mode):
  rng = np.random.default_rng(8)
  layer = MaskedLSTM(3, masked_gates=masked_gates, mask_mode=mode, return_sequences=True,
                     seed=4, unit_forget_bias=True)
  x = rng.standard_normal((2, 4, 2)).astype(np.float32)
  layer.build(x.shape)
  cell = layer.cell
  randomize_masks(cell, rng)
  g = rng.standard_normal((2, 4, 3)).astype(np.float32)
  with tf.GradientTape() as tape:
    value = tf.reduce_sum(layer(x, training=True) * g)
  grads = dict(zip([id(v) for v in layer.trainable_variables],
                   tape.gradient(value, layer.trainable_variables)))

  # Reference: Keras' LSTM with the effective (training-forward) weights as plain variables.
  wx, wh = lstm_effective(cell, mode, True)
  ref = tf.keras.layers.LSTM(3, return_sequences=True)
  ref.build(x.shape)
  ref.set_weights([wx, wh, cell.bias.numpy()])
  with tf.GradientTape() as tape:
    ref_value = tf.reduce_sum(ref(x) * g)
  np.testing.assert_allclose(value.numpy(), ref_value.numpy(), rtol=RTOL, atol=ATOL)
  d_wx, d_wh = [t.numpy() for t in tape.gradient(ref_value, [ref.cell.kernel,
                                                             ref.cell.recurrent_kernel])]

  u = 3
  masked = [GATES.index(gt) for gt in masked_gates]
  real = [i for i in range(4) if i not in masked]

  def columns(d, gates):
    return np.concatenate([d[:, i * u:(i + 1) * u] for i in gates], axis=1)

  for d_full, kern, scores, keep in ((d_wx, cell.kernel, cell.scores, cell.keep),
                                     (d_wh, cell.recurrent_kernel, cell.recurrent_scores,
                                      cell.recurrent_keep)):
    expected = score_grad(columns(d_full, masked), kern.numpy(), scores.numpy(), keep.numpy())
    np.testing.assert_allclose(grads[id(scores)], expected, rtol=1e-3, atol=1e-5)
  if real:
    np.testing.assert_allclose(grads[id(cell.real_kernel)], columns(d_wx, real),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(grads[id(cell.real_recurrent_kernel)],
                               columns(d_wh, real), rtol=1e-3, atol=1e-5)


def test_lstm_trainable_weights_by_masked_gates():
  all_masked = MaskedLSTM(4, seed=1)
  all_masked.build((None, 3, 2))
  cell = all_masked.cell
  assert cell.masked_gates == "ifco" and cell.real_gates == ""
  assert {id(v) for v in all_masked.trainable_weights} == {id(cell.scores),
                                                            id(cell.recurrent_scores)}
  assert cell.real_kernel is None and cell.real_recurrent_kernel is None
  assert [n for n, *_ in cell.masked_weights] == ["kernel", "recurrent_kernel"]
  assert cell.kernel.shape == (2, 16) and cell.recurrent_kernel.shape == (4, 16)
  assert len(cell.binary_masks()) == 2

  part = MaskedLSTM(4, masked_gates="fi", seed=1)  # order does not matter
  part.build((None, 3, 2))
  cell = part.cell
  assert cell.masked_gates == "if" and cell.real_gates == "co"
  assert cell.kernel.shape == (2, 8) and cell.recurrent_kernel.shape == (4, 8)
  assert cell.real_kernel.trainable and cell.real_kernel.shape == (2, 8)
  assert cell.real_recurrent_kernel.trainable and cell.real_recurrent_kernel.shape == (4, 8)
  assert {id(v) for v in part.trainable_weights} == {
      id(cell.scores), id(cell.recurrent_scores), id(cell.real_kernel),
      id(cell.real_recurrent_kernel)}
  assert all(not v.trainable for v in (cell.kernel, cell.keep, cell.recurrent_kernel,
                                       cell.recurrent_keep, cell.bias))
  np.testing.assert_array_equal(cell.bias.numpy(), np.zeros(16))  # default: zeros
  # The real columns are the c and o gates: changing them changes only c/o pre-activations.
  wx0, _ = cell.effective_kernels(training=False)
  cell.real_kernel.assign(cell.real_kernel + 1.0)
  wx1, _ = cell.effective_kernels(training=False)
  diff = np.abs(wx1.numpy() - wx0.numpy()).max(axis=0)
  assert np.all(diff[:8] == 0) and np.all(diff[8:] > 0)


@pytest.mark.parametrize("bad", ["ifx", "iif", "", "gate", 3, None])
def test_lstm_bad_masked_gates(bad):
  with pytest.raises(ValueError, match="masked_gates"):
    MaskedLSTM(4, masked_gates=bad)
  with pytest.raises(ValueError, match="masked_gates"):
    MaskedLSTMCell(4, masked_gates=bad)


@pytest.mark.parametrize("units", [0, -1, 2.5, "x"])
def test_lstm_bad_units(units):
  with pytest.raises(ValueError, match="units"):
    MaskedLSTM(units)


def test_lstm_other_bad_args():
  with pytest.raises(ValueError, match="mask_mode"):
    MaskedLSTM(2, mask_mode="hard")
  with pytest.raises(ValueError, match="threshold"):
    MaskedLSTM(2, threshold=1.0)
  with pytest.raises(ValueError, match="kernel_init"):
    MaskedLSTM(2, kernel_init="glorot")
  with pytest.raises(ValueError, match="unit_forget_bias"):
    MaskedLSTM(2, unit_forget_bias=True, use_bias=False)


def test_lstm_cell_in_keras_rnn_matches_masked_lstm():
  rng = np.random.default_rng(9)
  x = rng.standard_normal((3, 5, 2)).astype(np.float32)
  ours = MaskedLSTM(4, masked_gates="ic", seed=6, return_sequences=True, mask_mode="soft")
  ours.build(x.shape)
  randomize_masks(ours.cell, rng)
  rnn = tf.keras.layers.RNN(MaskedLSTMCell(4, masked_gates="ic", seed=6, mask_mode="soft"),
                            return_sequences=True)
  rnn.build(x.shape)
  rnn.set_weights(ours.get_weights())
  for training in (False, True):
    np.testing.assert_allclose(rnn(x, training=training).numpy(),
                               ours(x, training=training).numpy(), rtol=RTOL, atol=ATOL)
  model = tf.keras.Sequential([tf.keras.Input((5, 2)), rnn])
  assert masked_layers(model) == [rnn.cell]


def test_lstm_respects_input_mask():
  rng = np.random.default_rng(10)
  x = rng.standard_normal((2, 4, 3)).astype(np.float32)
  x[0, 2:] = 0.0  # padding of the first sequence
  model = tf.keras.Sequential([tf.keras.Input((4, 3)), tf.keras.layers.Masking(0.0),
                               MaskedLSTM(3, masked_gates="if", seed=2)])
  layer = model.layers[-1]
  expected_short = layer(x[:1, :2]).numpy()
  np.testing.assert_allclose(model(x).numpy()[:1], expected_short, rtol=RTOL, atol=ATOL)


def test_masked_layers_module_helpers_see_lstm():
  model = tf.keras.Sequential([tf.keras.Input((3, 2)), MaskedLSTM(2, masked_gates="o", seed=1),
                               MaskedDense(2, seed=2)])
  found = masked_layers(model)
  assert [type(l) for l in found] == [MaskedLSTMCell, MaskedDense]
  kernels, scores, keeps = mask_variables(model)
  assert len(kernels) == len(scores) == len(keeps) == 3
  assert isinstance(found[0], L.MaskedWeightsMixin)
