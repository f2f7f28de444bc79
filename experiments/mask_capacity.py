"""The ``mask_capacity`` study (cf. FedMask Table 2): a mask over frozen random weights against
training the weights themselves, trained centrally (no federation) on the pooled clients.

For the study's data set (``--dataset``, default Fashion-MNIST) and model (the data set's, or
``--model``), both networks see the same pooled training examples (every client's training
part; with ``--validation_fraction`` their held-out share is the evaluation set instead of the
clients' test parts), the same batches and epochs, plain SGD at each algorithm's default rate
(masks: ``local_masks``' 30 on the scores; dense: Standalone's). Reported per epoch: training
loss and accuracy on the pooled evaluation examples. Plain Keras: no TFF.

Called by ``python -m experiments.studies --study=mask_capacity``; writes ``table.md``,
``study.json``, ``study.csv`` and ``figure.png``.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

EPOCHS = {"small": 2, "paper": 10}
COLUMNS = ("network", "epoch", "train_loss", "accuracy", "wall_s")


def pooled_arrays(client_data, client_ids):
  """Every client's examples stacked: ``x [n, ...]``, ``y int32 [n]``."""
  from fedmask_tff.data.validation import client_arrays
  parts = [client_arrays(client_data, cid) for cid in client_ids]
  return np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts])


def train_and_evaluate(model, variables, learning_rate, train, test, epochs, batch_size, seed, log):
  """Plain SGD on ``variables``; returns one ``{epoch, train_loss, accuracy, wall_s}`` per epoch."""
  import tensorflow as tf

  def loss_fn(y, logits):
    return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    for v, g in zip(variables, tape.gradient(loss, variables)):
      v.assign_sub(learning_rate * g)
    return loss

  (x, y), (xt, yt) = train, test
  rng = np.random.default_rng(seed)
  rows, t0 = [], time.perf_counter()
  for epoch in range(1, epochs + 1):
    order, total = rng.permutation(len(y)), 0.0
    for i in range(0, len(y), batch_size):
      b = order[i:i + batch_size]
      total += float(step(x[b], y[b])) * len(b)
    predictions = np.concatenate([np.argmax(model(xt[i:i + 1024], training=False).numpy(), -1)
                                  for i in range(0, len(yt), 1024)])
    rows.append({"epoch": epoch, "train_loss": total / len(y),
                 "accuracy": float(np.mean(predictions == yt)), "wall_s": time.perf_counter() - t0})
    log(f"epoch {epoch}/{epochs}: loss {rows[-1]['train_loss']:.4f}, accuracy {rows[-1]['accuracy']:.4f}")
  return rows


def run_study(base, preset: str, out: str, log, epochs=None) -> str:
  """Trains the masked and the dense network of ``base``'s model on its pooled data."""
  import tensorflow as tf
  from fedmask_tff import algorithms, models
  from fedmask_tff.simulation import runner
  from fedmask_tff.data.validation import holdout_validation
  epochs = int(epochs or EPOCHS[preset])
  split = runner.load_split(base)
  if base.validation_fraction > 0:
    split = holdout_validation(split, base.validation_fraction, base.seed)
  train = pooled_arrays(split.train, split.client_ids)
  test = pooled_arrays(split.test, split.client_ids)
  model_name = models.model_for(base.dataset, base.model)
  kwargs = dict(input_shape=train[0].shape[1:], num_classes=split.num_classes,
                width=base.model_width, seed=base.seed)
  results = {}
  for network, builder, rate_of in (("masked (scores trained, W frozen)", models.masked_builder,
                                     "local_masks"),
                                    ("dense (weights trained)", models.dense_builder, "standalone")):
    tf.keras.utils.set_random_seed(base.seed)
    model = builder(model_name)(**kwargs)
    # This study trains the masks with plain SGD and the STE forward (the score-threshold
    # recipe), so it takes that recipe's documented rate.
    rate = algorithms.default_learning_rate(rate_of, "score_sign")
    log(f"{network}: {model_name}, {len(train[1])} training examples, lr {rate:g}")
    results[network] = {"learning_rate": rate, "trainable": int(sum(
        int(np.prod(v.shape)) for v in model.trainable_variables)),
        "epochs": train_and_evaluate(model, model.trainable_variables, rate, train, test, epochs,
                                     base.batch_size, base.seed, log)}
  evaluated_on = "validation" if base.validation_fraction > 0 else "test"
  lines = [f"**mask_capacity** study ({preset} preset; cf. FedMask Table 2): {base.dataset}, model "
           f"{model_name} (width {base.model_width}), trained centrally on the pooled training "
           f"examples of {len(split.client_ids)} clients ({len(train[1])}), {epochs} epochs, batch "
           f"{base.batch_size}, plain SGD, seed {base.seed}; accuracy on the pooled {evaluated_on} "
           f"examples ({len(test[1])}).", "",
           "| network | learning rate | trainable variables | " +
           " | ".join(f"epoch {r['epoch']}" for r in results[next(iter(results))]["epochs"]) + " |",
           "|---|---|---|" + "---|" * epochs]
  for network, r in results.items():
    lines.append(f"| {network} | {r['learning_rate']:g} | {r['trainable']:,} | " +
                 " | ".join(f"{e['accuracy']:.4f}" for e in r["epochs"]) + " |")
  text = "\n".join(lines) + "\n"
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump({"study": "mask_capacity", "preset": preset, "dataset": base.dataset,
               "model": model_name, "evaluated_on": evaluated_on, "results": results}, f, indent=2)
  import csv
  with open(os.path.join(out, "study.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for network, r in results.items():
      for e in r["epochs"]:
        writer.writerow({"network": network, **{k: e[k] for k in COLUMNS if k != "network"}})
  _figure(results, os.path.join(out, "figure.png"), f"{base.dataset}, {model_name}", evaluated_on)
  return text


def _figure(results, path, title, evaluated_on):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for network, r in results.items():
    ax.plot([e["epoch"] for e in r["epochs"]], [e["accuracy"] for e in r["epochs"]], marker="o",
            label=network)
  ax.set_xlabel("epoch (central training on the pooled clients)")
  ax.set_ylabel(f"{evaluated_on} accuracy")
  ax.set_title(f"Mask over frozen random weights vs. dense: {title}", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
