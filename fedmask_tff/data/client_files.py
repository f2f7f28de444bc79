"""Client datasets built where the work runs (``--client_datasets=workers``).

By default the driver builds each sampled client's ``tf.data.Dataset`` and TFF
serializes it, examples included, into every round's request. With
``--client_datasets=workers`` the driver instead writes every client's training
examples once to a file (``<dir>/<index>.tfrecord``: one ``tf.train.Example`` per
example, each feature a serialized tensor), and a round sends only a small
*source* per client, ``OrderedDict(path, seed, examples)``. A TFF computation
(:func:`dataset_computation`) composed in front of the algorithm's round (TFF's
``compose_dataset_computation_with_computation``) opens the file, shuffles with
the round's seed and batches: on the worker, inside the computation.

The batches are the driver's exactly: the same examples in the same order,
shuffled by the same seeds (the graph-level seed is the run's seed, as
``tf.keras.utils.set_random_seed`` makes it in the driver), so a run gives the
same results either way (tested). On several hosts, ``<dir>`` must be readable at
the same path on every worker (shared storage, or a copy).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os

import numpy as np

MANIFEST = "manifest.json"


def _fingerprint(client_ids, counts, element_spec) -> str:
  h = hashlib.sha256()
  h.update(json.dumps([list(client_ids), [int(c) for c in counts],
                       {k: [v.dtype.name, v.shape.as_list()] for k, v in element_spec.items()}]).encode())
  return h.hexdigest()


def write_client_files(directory: str, client_data, client_ids: list, progress=None) -> dict:
  """Writes each client's training examples to ``directory/<i>.tfrecord`` (``i``: index in
  ``client_ids``) and a manifest; returns ``{client_id: (path, examples)}``.

  Files whose manifest matches (same clients, counts and element spec) are reused, so
  a resumed run does not rewrite them. ``client_data`` is a TFF ``ClientData`` of
  unbatched examples (``OrderedDict`` elements).
  """
  import tensorflow as tf
  os.makedirs(directory, exist_ok=True)
  spec = client_data.element_type_structure
  counts = []
  datasets = {}
  for cid in client_ids:
    datasets[cid] = client_data.create_tf_dataset_for_client(cid)
    counts.append(int(datasets[cid].reduce(np.int64(0), lambda n, _: n + 1)))
  fingerprint = _fingerprint(client_ids, counts, spec)
  manifest_path = os.path.join(directory, MANIFEST)
  paths = {cid: os.path.abspath(os.path.join(directory, f"{i}.tfrecord"))
           for i, cid in enumerate(client_ids)}
  if os.path.isfile(manifest_path):
    with open(manifest_path) as f:
      try:
        same = json.load(f).get("fingerprint") == fingerprint
      except ValueError:
        same = False
    if same and all(os.path.isfile(p) for p in paths.values()):
      return {cid: (paths[cid], n) for cid, n in zip(client_ids, counts)}
  for k, (cid, n) in enumerate(zip(client_ids, counts)):
    tmp = paths[cid] + ".tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
      for example in datasets[cid]:
        features = {key: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[tf.io.serialize_tensor(value).numpy()])) for key, value in example.items()}
        writer.write(tf.train.Example(features=tf.train.Features(feature=features))
                     .SerializeToString())
    os.replace(tmp, paths[cid])
    if progress is not None:
      progress(k + 1, len(client_ids))
  tmp = manifest_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"fingerprint": fingerprint, "clients": {cid: {"file": os.path.basename(paths[cid]),
                                                            "examples": n}
                                                      for cid, n in zip(client_ids, counts)}}, f)
  os.replace(tmp, manifest_path)
  return {cid: (paths[cid], n) for cid, n in zip(client_ids, counts)}


def source(path: str, seed: int, examples: int) -> collections.OrderedDict:
  """What a round sends for one client instead of its dataset."""
  return collections.OrderedDict(path=path, seed=np.int64(seed), examples=np.int64(examples))


def dataset_computation(element_spec, batch_size: int, graph_seed: int, shuffle_buffer: int = 4096,
                        repeats: int = 1):
  """A ``tff.tensorflow.computation``: source -> the client's shuffled, batched dataset.

  ``element_spec``: unbatched ``OrderedDict`` of ``tf.TensorSpec``; the result is
  ``shuffle(shuffle_buffer, seed=source.seed, reshuffle_each_iteration=True)
  .batch(batch_size)`` (then ``.repeat(repeats)`` when ``repeats > 1``), as the
  driver builds it. A file that is missing or does not parse fails the round with
  TensorFlow's error naming the file.
  """
  import tensorflow as tf
  import tensorflow_federated as tff
  source_type = tff.types.to_type(collections.OrderedDict(
      path=np.str_, seed=np.int64, examples=np.int64))
  features = {k: tf.io.FixedLenFeature([], tf.string) for k in element_spec}

  def parse(record):
    parsed = tf.io.parse_single_example(record, features)
    return collections.OrderedDict(
        (k, tf.ensure_shape(tf.io.parse_tensor(parsed[k], spec.dtype), spec.shape))
        for k, spec in element_spec.items())

  @tf.function
  def make(path, seed):
    # Built inside a function, as the driver builds datasets eagerly: TensorFlow then uses the
    # same shuffle op, whose reshuffle_each_iteration survives being passed between TFF
    # computations (the graph-mode op repeats its first order every epoch).
    tf.random.set_seed(graph_seed)  # The driver's global seed: identical shuffles.
    ds = tf.data.TFRecordDataset(path).map(parse)
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    return ds.repeat(repeats) if repeats > 1 else ds

  @tff.tensorflow.computation(source_type)
  def build(src):
    return make(src["path"], src["seed"])

  return build
