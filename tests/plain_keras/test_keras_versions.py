"""The plain-Keras part of fedmask_tff behaves the same under Keras 2 (TF 2.14) and Keras 3.

These tests run in the pinned TF 2.14 environment and, in CI, in a second environment with the
newest TensorFlow (Keras 3) and a newer Python (``scripts/test_plain_keras.sh``). The golden
values below were recorded under TF 2.14.1 / Keras 2.14 and are checked under both: the same
seed gives the same frozen weights and the same forward values.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import fedmask_tff
from fedmask_tff import MaskedConv2D, MaskedDense, MaskedLSTM, pack_masks, prune_model
from fedmask_tff.wire import bitpack
from fedmask_tff.masks.layers import mask_variables, masked_layers
from fedmask_tff.masks.pruning import kept_count, prunable_flags, top_magnitude_keep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reports_which_keras_ran():
  import keras  # the same Keras as tf.keras in both worlds
  assert int(keras.__version__.split(".")[0]) in (2, 3)
  assert issubclass(MaskedDense, keras.layers.Layer)


# ------------------------------------------------------- same seed, same values ---

def test_frozen_kernels_match_golden_values():
  dense = MaskedDense(4, seed=7)
  dense.build((None, 3))
  np.testing.assert_array_equal(np.sign(dense.kernel.numpy()),
                                [[-1, -1, -1, 1], [1, 1, -1, -1], [-1, -1, -1, 1]])
  np.testing.assert_allclose(np.abs(dense.kernel.numpy()), math.sqrt(2 / 3), rtol=1e-6)
  normal = MaskedDense(3, seed=3, kernel_init="he_normal")
  normal.build((None, 2))
  np.testing.assert_allclose(normal.kernel.numpy(),
                             [[-0.165108, -0.998763, -1.539597], [1.818869, -0.862839, 0.517861]],
                             atol=2e-6)
  uniform = MaskedDense(3, seed=3, kernel_init="he_uniform")
  uniform.build((None, 2))
  np.testing.assert_allclose(uniform.kernel.numpy(),
                             [[0.343152, 0.090325, -1.529521], [1.344778, -1.354847, -1.534326]],
                             atol=2e-6)


def _conv_lstm_dense():
  return tf.keras.Sequential([
      tf.keras.Input((4, 4, 1)),
      MaskedConv2D(2, 3, seed=1, activation="relu"),
      tf.keras.layers.Reshape((4, 8)),
      MaskedLSTM(3, masked_gates="if", seed=2),
      MaskedDense(2, seed=3),
  ])


def test_forward_values_match_golden_values():
  model = _conv_lstm_dense()
  for scores in mask_variables(model)[1]:  # masks 0, 1, 1, 0, 1, 1, ... in flat order
    n = int(np.prod(scores.shape))
    scores.assign(((np.arange(n) % 3 - 1) * 0.5 + 0.25).reshape(scores.shape).astype(np.float32))
  x = ((np.arange(32, dtype=np.float32).reshape(2, 4, 4, 1) % 7) - 3) / 3
  golden = [[0.0294045, -0.0619090], [-0.0366732, 0.0237038]]
  np.testing.assert_allclose(model(x).numpy(), golden, rtol=1e-4, atol=1e-6)
  # Binary masks: the ste training forward equals inference.
  np.testing.assert_allclose(model(x, training=True).numpy(), golden, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------ one-shot pruning ---

def _fit_data(seed=0, n=64):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 4, 4, 1)).astype(np.float32)
  return x, (x[:, :2].mean(axis=(1, 2, 3)) > x[:, 2:].mean(axis=(1, 2, 3))).astype(np.int32)


def _compiled(model):
  model.compile(tf.keras.optimizers.SGD(5.0),
                tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return model


def test_prune_model_keeps_top_magnitudes_of_the_last_layers_for_good():
  model = _compiled(_conv_lstm_dense())
  x, y = _fit_data()
  model.fit(x, y, epochs=1, batch_size=16, verbose=0)
  kernels, scores, keeps = mask_variables(model)
  before = [(k.numpy(), s.numpy()) for k, s in zip(kernels, scores)]
  assert prunable_flags(model, 2) == [False, True, True, True]  # conv | lstm (2 weights), dense

  kept = prune_model(model, prune_rate=0.25, last_layers=2)

  assert kept == [kept_count(int(np.prod(k.shape)), 0.25) for k in kernels[1:]]
  np.testing.assert_array_equal(keeps[0].numpy(), 1.0)  # the conv layer is not pruned
  for (kernel, score), keep, k in zip(before[1:], keeps[1:], kept):
    magnitude = np.abs(kernel * score).ravel()
    expected = np.zeros(magnitude.size)
    expected[np.argsort(-magnitude, kind="stable")[:k]] = 1.0
    np.testing.assert_array_equal(keep.numpy().ravel(), expected)
  model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # pruned elements stay 0 for good
  for layer in masked_layers(model):
    for mask, (_, _, _, keep) in zip(layer.binary_masks(), layer.masked_weights):
      assert np.all(mask.numpy()[keep.numpy() == 0] == 0)
  with pytest.raises(ValueError, match="pruned already"):
    prune_model(model, prune_rate=0.25, last_layers=2)


def test_pack_masks_is_one_bit_per_element_and_reads_back():
  model = _compiled(_conv_lstm_dense())
  x, y = _fit_data(1)
  model.fit(x, y, epochs=1, batch_size=16, verbose=0)
  prune_model(model, prune_rate=0.2, last_layers=1)
  packed = pack_masks(model)
  masks = [m.numpy() for layer in masked_layers(model) for m in layer.binary_masks()]
  assert len(packed) == len(masks) == 4
  for p, m in zip(packed, masks):
    assert p.dtype == np.uint8 and p.size == math.ceil(m.size / 8)
    np.testing.assert_array_equal(bitpack.unpack_bits_np(p, m.shape), m)
  assert 0 < masks[-1].sum() <= kept_count(masks[-1].size, 0.2)


# -------------------------------------------------------------- clear errors ---

@pytest.mark.parametrize("kwargs, match", [
    ({"mask_mode": "hard"}, "mask_mode must be one of"),
    ({"threshold": 1.5}, r"threshold tau must be in \(0, 1\)"),
    ({"threshold": 0.0}, r"threshold tau must be in \(0, 1\)"),
    ({"kernel_init": "glorot"}, "kernel_init must be one of"),
    ({"score_init": float("nan")}, "score_init must be finite"),
])
@pytest.mark.parametrize("layer", [MaskedDense, MaskedLSTM])
def test_bad_layer_settings_are_refused(layer, kwargs, match):
  with pytest.raises(ValueError, match=match):
    layer(3, **kwargs)


def test_pruning_refuses_mismatched_shapes_and_bad_arguments():
  with pytest.raises(ValueError, match=r"same known shape, got kernel \(3, 4\) and scores \(4, 3\)"):
    top_magnitude_keep(tf.ones([3, 4]), tf.ones([4, 3]), 0.2)
  with pytest.raises(ValueError, match="same known shape"):
    top_magnitude_keep(tf.ones([3, 4]), tf.ones([4]), 0.2)  # would broadcast silently
  model = _conv_lstm_dense()
  with pytest.raises(ValueError, match="the model has only 3 masked layers"):
    prune_model(model, last_layers=4)
  with pytest.raises(ValueError, match="last_layers must be an integer >= 0"):
    prune_model(model, last_layers=-1)
  with pytest.raises(ValueError, match=r"prune_rate \(the fraction kept\) must be in \(0, 1\]"):
    prune_model(model, prune_rate=0.0)
  with pytest.raises(ValueError, match="has no masked layers"):
    prune_model(tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)]))


# ------------------------------------------------------- what users install ---

def test_plain_keras_modules_import_without_tff():
  code = ("import sys; import fedmask_tff; "
          "from fedmask_tff.masks import aggregation, layers, lstm, masking, pruning, regularizers, "
          "vote_rules; from fedmask_tff.wire import bitpack; "
          "assert 'tensorflow_federated' not in sys.modules, 'TFF was imported'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def _readme_layers_example() -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  found = [b for b in blocks if "prune_model(" in b and "pack_masks(" in b]
  assert len(found) == 1, "README.md must hold one python example of the layers (prune + pack)"
  return found[0]


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  exec(compile(_readme_layers_example(), "README.md (layers example)", "exec"), {})
  out = capsys.readouterr().out
  assert re.search(r"\d+ bytes of masks", out), out
  assert (tmp_path / "masked.keras").is_file()


def test_package_metadata_admits_keras_3_and_newer_python():
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    text = f.read()
  assert 'requires-python = ">=3.11,<3.14"' in text
  assert '"tensorflow>=2.14"' in text
  assert fedmask_tff.__version__
