"""Tests of the FedMask paper's models (fedmask_tff.models.paper); plain Keras, no TFF."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff.models import costs, basic, paper
from fedmask_tff.models.binarized import BinaryConv2D, BinaryDense
from fedmask_tff.masks.layers import MaskedConv2D, MaskedDense, mask_variables, masked_layers
from fedmask_tff.masks.lstm import MaskedLSTM
from fedmask_tff.models.paper import DEFAULT_MODEL_FOR_DATASET, PAPER_BINARY_BUILDERS, PAPER_DENSE_BUILDERS, PAPER_MODEL_BUILDERS, PRUNE_LAST_LAYERS, model_size_report

CI_WIDTH = 0.125
SETUPS = {  # name: (input_shape, num_classes, expected weight tensors in costs.weight_costs)
    "vgg16": ((32, 32, 3), 10, 16),
    "har_mlp": ((128, 9), 6, 3),
    "shakespeare_lstm": ((12,), 90, 7),  # 2 LSTMs x (kernel, recurrent) + 3 FC; embedding skipped
}


def _inputs(name, batch=4, seed=0):
  shape, classes, _ = SETUPS[name]
  rng = np.random.default_rng(seed)
  if name == "shakespeare_lstm":
    x = rng.integers(0, 90, size=(batch,) + shape).astype(np.int32)
  else:
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
  y = rng.integers(0, classes, size=(batch,)).astype(np.int32)
  return x, y


def _kernel_shapes(model):
  """Shapes of the multiply-add kernels in order (masked weights, or Dense/Conv/LSTM kernels)."""
  kernels, _, _ = mask_variables(model)
  if kernels:
    return [tuple(k.shape.as_list()) for k in kernels]
  shapes = []
  for layer in model.layers:
    if isinstance(layer, (tf.keras.layers.Dense, tf.keras.layers.Conv2D)):
      shapes.append(tuple(layer.kernel.shape.as_list()))
    elif isinstance(layer, tf.keras.layers.LSTM):
      shapes += [tuple(layer.cell.kernel.shape.as_list()),
                 tuple(layer.cell.recurrent_kernel.shape.as_list())]
  return shapes


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_builders_output_logits_with_identical_kernel_shapes(name):
  shape, classes, n_weights = SETUPS[name]
  x, _ = _inputs(name, batch=3)
  masked = PAPER_MODEL_BUILDERS[name](shape, classes, width=CI_WIDTH, seed=1)
  dense = PAPER_DENSE_BUILDERS[name](shape, classes, width=CI_WIDTH, seed=1)
  versions = [masked, dense]
  if name in PAPER_BINARY_BUILDERS:
    versions.append(PAPER_BINARY_BUILDERS[name](shape, classes, width=CI_WIDTH, seed=1))
  for model in versions:
    assert model.output_shape == (None, classes)
    out = model(x, training=False)
    assert out.shape == (3, classes)
    assert np.all(np.isfinite(out.numpy()))
    assert len(costs.weight_costs(model)) == n_weights
    assert _kernel_shapes(model) == _kernel_shapes(masked)
  # fedmask.build_fedmask_process needs the FLOP counter to see the masked weights one to one.
  assert [w.elements for w in costs.weight_costs(masked)] == [
      k.shape.num_elements() for k in mask_variables(masked)[0]]
  # Masked model: only mask scores train (and the FC / conv W is frozen).
  assert all("scores" in v.name for v in masked.trainable_variables)
  assert len(masked_layers(masked)) == n_weights - (2 if name == "shakespeare_lstm" else 0)


def test_binary_versions_use_binary_layers_and_lstm_has_none():
  model = PAPER_BINARY_BUILDERS["vgg16"]((32, 32, 3), 10, width=CI_WIDTH)
  kinds = {type(l) for l in model.layers if isinstance(l, (tf.keras.layers.Dense,
                                                            tf.keras.layers.Conv2D))}
  assert kinds == {BinaryConv2D, BinaryDense}
  assert "shakespeare_lstm" not in PAPER_BINARY_BUILDERS


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_same_seed_same_frozen_weights(name):
  shape, classes, _ = SETUPS[name]
  build = PAPER_MODEL_BUILDERS[name]
  a, b, c = (build(shape, classes, width=CI_WIDTH, seed=s) for s in (7, 7, 8))
  frozen = lambda m: [v.numpy() for v in m.non_trainable_variables if "keep" not in v.name]  # noqa: E731
  for va, vb in zip(frozen(a), frozen(b)):
    np.testing.assert_array_equal(va, vb)
  ka, kc = mask_variables(a)[0], mask_variables(c)[0]
  assert all(not np.array_equal(p.numpy(), q.numpy()) for p, q in zip(ka, kc))
  # Layers draw from distinct seeds: no two equal-shaped kernels coincide.
  flat = [k.numpy() for k in ka]
  for i in range(len(flat)):
    for j in range(i + 1, len(flat)):
      if flat[i].shape == flat[j].shape:
        assert not np.array_equal(flat[i], flat[j])


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_config_round_trip(name):
  shape, classes, _ = SETUPS[name]
  model = PAPER_MODEL_BUILDERS[name](shape, classes, width=CI_WIDTH, seed=3, mask_mode="soft",
                                     score_init=0.2)
  for layer in model.layers:
    if isinstance(layer, (MaskedConv2D, MaskedDense, MaskedLSTM)):
      clone = type(layer).from_config(layer.get_config())
      assert clone.get_config() == layer.get_config()
  # The whole model rebuilds from its config with the same frozen weights (seeded initializers).
  rebuilt = tf.keras.Sequential.from_config(model.get_config())
  for va, vb in zip(model.weights, rebuilt.weights):
    np.testing.assert_array_equal(va.numpy(), vb.numpy())
  x, _ = _inputs(name)
  np.testing.assert_allclose(model(x).numpy(), rebuilt(x).numpy(), rtol=1e-5, atol=1e-5)


def test_vgg16_layout_and_small_inputs():
  model = paper.build_vgg16((32, 32, 3), 10, width=CI_WIDTH)
  convs = [l for l in model.layers if isinstance(l, MaskedConv2D)]
  assert [l.filters for l in convs] == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
  assert [l.units for l in model.layers if isinstance(l, MaskedDense)] == [64, 64, 10]
  assert sum(isinstance(l, tf.keras.layers.MaxPool2D) for l in model.layers) == 5
  # 28x28x1 (Fashion-MNIST / FEMNIST): "same" pools 28-14-7-4-2-1.
  small = paper.build_vgg16((28, 28, 1), 10, width=CI_WIDTH)
  assert small.get_layer("fc1").kernel.shape == (64, 64)
  assert small(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)
  dense28 = paper.build_reference_vgg16((28, 28, 1), 10, width=CI_WIDTH)
  assert _kernel_shapes(dense28) == _kernel_shapes(small)
  # 8x8: after three pools the map is 1x1, the last two pools are skipped.
  tiny = paper.build_vgg16((8, 8, 3), 10, width=CI_WIDTH)
  assert sum(isinstance(l, tf.keras.layers.MaxPool2D) for l in tiny.layers) == 3
  assert tiny.output_shape == (None, 10)
  bn = paper.build_reference_vgg16((32, 32, 3), 10, width=CI_WIDTH, batch_norm=True)
  assert _kernel_shapes(bn) == _kernel_shapes(model)
  assert bn(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 10)


def test_parameter_counts_and_size_report():
  expected = {  # (width 1, width 0.125) mask elements = Dense/Conv2D/LSTM kernel elements
      "vgg16": (15_239_872, 238_872),
      "har_mlp": (1_707_008, 156_032),
      "shakespeare_lstm": (904_448, 16_288),
  }
  for name, (full, ci) in expected.items():
    shape, classes, _ = SETUPS[name]
    for width, count in ((1.0, full), (CI_WIDTH, ci)):
      report = model_size_report(PAPER_MODEL_BUILDERS[name](shape, classes, width=width))
      assert report["mask_parameters"] == count, (name, width)
  har = model_size_report(paper.build_har_mlp(width=CI_WIDTH))
  assert har == {"parameters": 156_032, "float32_bytes": 624_128, "mask_parameters": 156_032,
                 "mask_bytes": 19_504, "other_parameters": 0, "other_float32_bytes": 0,
                 "compression": 32.0}
  assert model_size_report(paper.build_reference_har_mlp(width=CI_WIDTH)) == har
  # Shakespeare: embedding (90 x 8) and the LSTM biases (4u each) are outside the masks.
  lstm = model_size_report(paper.build_shakespeare_lstm((12,), 90, width=CI_WIDTH))
  assert lstm["other_parameters"] == 90 * 8 + 4 * 32 * 2
  assert lstm["parameters"] == lstm["mask_parameters"] + lstm["other_parameters"]


def test_registries_and_pruning_constants():
  # vgg16_paper's builders live in models.vgg16_paper (registered in models' tables).
  assert set(PAPER_MODEL_BUILDERS) == set(PAPER_DENSE_BUILDERS) == set(PRUNE_LAST_LAYERS) - {"vgg16_paper"}
  from fedmask_tff import models
  assert models.masked_builder("vgg16_paper") and models.dense_builder("vgg16_paper")
  assert set(PAPER_BINARY_BUILDERS) <= set(PAPER_MODEL_BUILDERS)
  from fedmask_tff.data.registry import DATASETS
  assert set(DEFAULT_MODEL_FOR_DATASET) == set(DATASETS)
  for model_name in DEFAULT_MODEL_FOR_DATASET.values():
    assert model_name in PAPER_MODEL_BUILDERS or model_name in basic.MODEL_BUILDERS
  for name, (shape, classes, _) in SETUPS.items():
    model = PAPER_MODEL_BUILDERS[name](shape, classes, width=CI_WIDTH)
    assert PRUNE_LAST_LAYERS[name] <= len(masked_layers(model))
  assert paper.prune_last_layers_for("vgg16") == 8
  assert paper.prune_last_layers_for("cnn", default=2) == 2
  with pytest.raises(KeyError):
    paper.prune_last_layers_for("cnn")


def test_bad_input_shapes_raise():
  with pytest.raises(ValueError, match="vgg16"):
    paper.build_vgg16((128, 9), 6)
  with pytest.raises(ValueError, match="shakespeare_lstm"):
    paper.build_shakespeare_lstm((80, 1), 90)


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_masked_models_train_on_a_toy_batch(name):
  shape, classes, _ = SETUPS[name]
  model = PAPER_MODEL_BUILDERS[name](shape, classes, width=CI_WIDTH, seed=0)
  x, y = _inputs(name, batch=16, seed=1)
  opt = tf.keras.optimizers.SGD(1.0)  # plain SGD on the scores, as FedMask clients do
  scores = model.trainable_variables

  def loss_fn(training):
    logits = model(x, training=training)
    return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, logits,
                                                                          from_logits=True))

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = loss_fn(True)
    opt.apply_gradients(zip(tape.gradient(loss, scores), scores))
    return loss

  before = float(loss_fn(False))
  for _ in range(15):
    step()
  after = float(loss_fn(False))
  assert after < before - 0.01, (name, before, after)
