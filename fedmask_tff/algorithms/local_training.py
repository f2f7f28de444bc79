"""Local SGD shared by the baselines (plain TF, runs inside a TFF client computation).

``sgd_epochs(model, variables, dataset, epochs, learning_rate)`` runs ``epochs``
passes of mini-batch SGD over a batched dataset, updating ``variables`` (a
subset of the model's trainable variables) in place, and returns
``(loss_sum, examples)``: the cross-entropy summed over every example trained
on and the number of examples processed (all epochs), both float32.
``post_step(variables)`` runs after each step (BNN clipping, for example).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import tensorflow as tf

from fedmask_tff.algorithms.evaluation import loss_fn


def sgd_epochs(model: tf.keras.Model, variables: Sequence[tf.Variable], dataset: tf.data.Dataset,
               epochs: int, learning_rate: float,
               post_step: Optional[Callable[[Sequence[tf.Variable]], list]] = None):
  """Mini-batch SGD on ``variables``; returns ``(loss_sum, examples)``."""
  variables = list(variables)

  def step(acc, batch):
    with tf.GradientTape() as tape:
      loss = loss_fn(batch["y"], model(batch["x"], training=True))
    grads = tape.gradient(loss, variables)
    updates = [v.assign_sub(learning_rate * g) for v, g in zip(variables, grads) if g is not None]
    with tf.control_dependencies(updates):
      if post_step is not None:
        updates = post_step(variables)
    with tf.control_dependencies(updates):
      n = tf.cast(tf.shape(batch["y"])[0], tf.float32)
      return acc[0] + loss * n, acc[1] + n

  @tf.function
  def run(dataset):
    loss_sum, count = tf.constant(0.0), tf.constant(0.0)
    for _ in tf.range(epochs):
      l, c = dataset.reduce((tf.constant(0.0), tf.constant(0.0)), step)
      loss_sum, count = loss_sum + l, count + c
    return loss_sum, count

  return run(dataset)
