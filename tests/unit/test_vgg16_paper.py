"""``vgg16_paper``: torchvision's VGG-16, whose sizes are the paper's Table 5 "Baseline" column."""

import numpy as np
import pytest
import tensorflow as tf

from fedmask_tff import models
from fedmask_tff.masks.layers import masked_layers
from fedmask_tff.models import paper, vgg16_paper


def _torchvision_vgg16_parameters(classes):
  """The arithmetic of torchvision's vgg16, written out: 13 convs 3x3 with biases, then
  25088-4096-4096-classes with biases."""
  convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
  fcs = [(25088, 4096), (4096, 4096), (4096, classes)]
  return sum(9 * a * b + b for a, b in convs) + sum(a * b + b for a, b in fcs)


@pytest.mark.parametrize('classes, parameters, megabytes', [(10, 134_301_514, 537.21),
                                                             (64, 134_522_752, 538.09)])
def test_full_width_counts_are_the_papers_table5(classes, parameters, megabytes):
  assert _torchvision_vgg16_parameters(classes) == parameters
  assert vgg16_paper.parameter_count(classes) == parameters
  assert round(4 * parameters / 1e6, 2) == megabytes


@pytest.mark.parametrize('kind', ['masked', 'dense'])
def test_built_model_matches_the_arithmetic(kind):
  builder = models.masked_builder if kind == 'masked' else models.dense_builder
  model = builder('vgg16_paper')((32, 32, 3), 10, width=0.0625, seed=0)
  assert paper.model_size_report(model)['parameters'] == vgg16_paper.parameter_count(10, 0.0625)
  assert model(np.zeros((2, 32, 32, 3), np.float32), training=True).shape == (2, 10)
  names = [l.name for l in model.layers if l.weights]
  assert names == [f'conv{i}' for i in range(1, 14)] + ['fc1', 'fc2', 'fc3']
  assert sum(isinstance(l, tf.keras.layers.Dropout) for l in model.layers) == 2
  assert model.get_layer('fc1').kernel.shape == (49 * 32, 256)


def test_masked_version_prunes_the_last_eight_layers_and_binarized_builds():
  assert models.prune_last_layers('vgg16_paper') == 8
  model = models.masked_builder('vgg16_paper')((28, 28, 1), 62, width=0.0625)
  assert len(masked_layers(model)) == 16
  assert model(np.zeros((1, 28, 28, 1), np.float32)).shape == (1, 62)
  binary = models.binary_builder('vgg16_paper')((32, 32, 3), 10, width=0.0625)
  assert binary(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 10)


def test_adaptive_pool_is_torchs():
  x = tf.reshape(tf.range(5 * 5, dtype=tf.float32), (1, 5, 5, 1))
  # torch.nn.functional.adaptive_avg_pool2d(x, 3): windows rows/cols {0,1}, {1,2,3}, {3,4}.
  expected = [[3.0, 4.5, 6.0], [10.5, 12.0, 13.5], [18.0, 19.5, 21.0]]
  np.testing.assert_allclose(vgg16_paper.AdaptiveAveragePooling2D(3)(x)[0, :, :, 0], expected)
  one = tf.constant([[[[2.0, -1.0]]]])  # a 1 x 1 map is copied to 7 x 7
  np.testing.assert_array_equal(vgg16_paper.AdaptiveAveragePooling2D(7)(one),
                                np.tile([2.0, -1.0], (1, 7, 7, 1)))
