"""Shakespeare next-character prediction: vocabulary, examples, HDF5 loader.

Vocabulary (`CHAR_VOCAB`, shared by every Shakespeare format, so models are
interchangeable):

* id 0 is `PAD` (left padding of short contexts);
* ids 1..86 are the 86 characters of TFF's Shakespeare tutorial and baseline
  (`tff.simulation.baselines.shakespeare`), in their order: `CHAR_VOCAB[i]`
  has id `i + 1`;
* id 87 is `OOV` (any other character), 88 `BOS` (begin of snippet), 89 `EOS`
  (end of snippet). `VOCAB_SIZE` = 90 is the number of ids and the number of
  classes of the task.

These are exactly TFF's baseline ids (`get_special_tokens()` gives pad 0, oov
87, bos 88, eos 89), so a model trained here reads TFF-preprocessed data too.
Text is mapped character by character (Unicode code points); every character
outside `CHAR_VOCAB` (including non-ASCII ones) becomes one `OOV`.

Examples: `OrderedDict(x=int32 [seq_len] of ids, y=int32 id of the next
character)`. From a snippet of text (TFF's SQLite and HDF5 formats), with
`tokens = [BOS] + ids(text) + [EOS]`, one example per target position
`t = 1..len(tokens)-1` (every character and the final EOS): `x` holds the
`seq_len` tokens before `t`, left-padded with `PAD` where the snippet starts
later; `y = tokens[t]`. With `stride = s > 1`, only the targets t = 1, 1+s,
1+2s, ... are kept. A snippet of n characters thus gives n + 1 examples
(stride 1). LEAF's Shakespeare already holds (80 characters, next character)
pairs, mapped with the same vocabulary (`leaf_pair_to_example`).

The HDF5 format (`load_shakespeare_h5`) is TFF's earlier client-data layout:
files `shakespeare_train.h5` and `shakespeare_test.h5`, each with a group
`examples/<client_id>/snippets` holding the role's snippets as byte strings.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Iterable, Optional, Sequence

import numpy as np

from fedmask_tff.data import _clients
from fedmask_tff.data.errors import DataError

CHAR_VOCAB = tuple(
    'dhlptx@DHLPTX'
    ' $(,048cgkoswCGKOSW[_#\'/37;?bfjnrvzBFJNRVZ"&*.26:\naeimquyAEIMQUY]!%)-159\r'
)
PAD = 0
OOV = len(CHAR_VOCAB) + 1  # 87
BOS = len(CHAR_VOCAB) + 2  # 88
EOS = len(CHAR_VOCAB) + 3  # 89
VOCAB_SIZE = len(CHAR_VOCAB) + 4  # 90
NUM_CLASSES = VOCAB_SIZE
DEFAULT_SEQ_LEN = 80

H5_FILES = {'train': 'shakespeare_train.h5', 'test': 'shakespeare_test.h5'}

# ASCII code point -> id (OOV for ASCII characters outside the vocabulary).
ASCII_TO_ID = np.full(128, OOV, np.int32)
for _i, _c in enumerate(CHAR_VOCAB):
  ASCII_TO_ID[ord(_c)] = _i + 1
del _i, _c
_ID_TO_CHAR = {i + 1: c for i, c in enumerate(CHAR_VOCAB)}
OOV_CHAR = '\ufffd'


def encode(text: str) -> np.ndarray:
  """Maps text to int32 ids, one per character (OOV outside the vocabulary)."""
  if isinstance(text, bytes):
    text = text.decode('utf-8', errors='replace')
  cps = np.frombuffer(text.encode('utf-32-le'), dtype='<u4').astype(np.int64)
  ids = np.full(cps.shape, OOV, np.int32)
  ascii_mask = cps < 128
  ids[ascii_mask] = ASCII_TO_ID[cps[ascii_mask]]
  return ids


def decode(ids: Iterable[int]) -> str:
  """Maps ids back to text: PAD, BOS and EOS are dropped, OOV gives U+FFFD.

  `decode(encode(t)) == t` for any text made of `CHAR_VOCAB` characters.
  """
  out = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i in (PAD, BOS, EOS):
      continue
    if i == OOV:
      out.append(OOV_CHAR)
    elif i in _ID_TO_CHAR:
      out.append(_ID_TO_CHAR[i])
    else:
      raise DataError(f'id {i} is outside the vocabulary 0..{VOCAB_SIZE - 1}')
  return ''.join(out)


def _check_seq_len_stride(seq_len, stride):
  for name, value in (('seq_len', seq_len), ('stride', stride)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise DataError(f'{name} must be an int, got {value!r}')
    if value < 1:
      raise DataError(f'{name} must be >= 1, got {value}')
  return int(seq_len), int(stride)


def text_to_examples(
    text, seq_len: int = DEFAULT_SEQ_LEN, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Converts one snippet into next-character examples (see the module doc).

  Returns:
    `(x, y)`: int32 [n, seq_len] contexts and int32 [n] targets, where
    n = ceil((len(text) + 1) / stride).
  """
  seq_len, stride = _check_seq_len_stride(seq_len, stride)
  tokens = np.concatenate([[BOS], encode(text), [EOS]]).astype(np.int32)
  padded = np.concatenate([np.full(seq_len, PAD, np.int32), tokens])
  x = np.lib.stride_tricks.sliding_window_view(padded[1:-1], seq_len)
  y = tokens[1:]
  return np.ascontiguousarray(x[::stride]), np.ascontiguousarray(y[::stride])


def snippets_to_examples(
    snippets: Sequence, seq_len: int = DEFAULT_SEQ_LEN, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """`text_to_examples` over several snippets, concatenated in order."""
  parts = [text_to_examples(s, seq_len, stride) for s in snippets]
  if not parts:
    return np.zeros([0, seq_len], np.int32), np.zeros([0], np.int32)
  return (
      np.concatenate([p[0] for p in parts]),
      np.concatenate([p[1] for p in parts]),
  )


def snippet_targets(snippets: Sequence, stride: int = 1) -> np.ndarray:
  """The targets `y` of `snippets_to_examples`, without building contexts."""
  parts = [
      np.concatenate([encode(s), [EOS]]).astype(np.int32)[::stride]
      for s in snippets
  ]
  return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def leaf_pair_to_example(x_text: str, y_text: str, seq_len: int = DEFAULT_SEQ_LEN):
  """Maps a LEAF (context, next character) pair to `(x [seq_len], y)` ids.

  A context longer than `seq_len` keeps its last `seq_len` characters; a
  shorter one is left-padded with PAD. Raises DataError unless `y_text` is one
  character.
  """
  if not isinstance(x_text, str) or not isinstance(y_text, str):
    raise DataError(
        f'expected strings, got x {type(x_text).__name__} and y '
        f'{type(y_text).__name__}'
    )
  if len(y_text) != 1:
    raise DataError(f'y must be one character, got {y_text!r}')
  ids = encode(x_text)[-seq_len:]
  if ids.size < seq_len:
    ids = np.concatenate([np.full(seq_len - ids.size, PAD, np.int32), ids])
  return ids.astype(np.int32), np.int32(encode(y_text)[0])


# ------------------------------------------------------------ TensorFlow side


def tf_snippet_to_dataset(snippet, seq_len: int = DEFAULT_SEQ_LEN, stride: int = 1):
  """The TF version of `text_to_examples`: a scalar tf.string -> Dataset.

  Usable inside `tf.function`s and TFF computations (no lookup tables).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  cps = tf.strings.unicode_decode(snippet, 'UTF-8', errors='replace')
  table = tf.constant(ASCII_TO_ID)
  ids = tf.where(
      cps < 128, tf.gather(table, tf.clip_by_value(cps, 0, 127)), OOV
  )
  tokens = tf.concat([[BOS], tf.cast(ids, tf.int32), [EOS]], 0)
  padded = tf.concat([tf.fill([seq_len], PAD), tokens], 0)
  x = tf.signal.frame(padded[1:-1], seq_len, 1, axis=0)
  y = tokens[1:]
  if stride > 1:
    x, y = x[::stride], y[::stride]
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))


def element_spec(seq_len: int = DEFAULT_SEQ_LEN):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return collections.OrderedDict(
      x=tf.TensorSpec([seq_len], tf.int32), y=tf.TensorSpec([], tf.int32)
  )


_SNIPPET_CLASS = None


def _snippet_client_data_class():
  """Defines (once) a ClientData subclass serving snippets held in memory."""
  global _SNIPPET_CLASS
  if _SNIPPET_CLASS is not None:
    return _SNIPPET_CLASS
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.simulation.datasets import client_data  # pylint: disable=g-import-not-at-top

  class SnippetClientData(client_data.ClientData):
    """Client datasets of next-character examples cut from in-memory snippets.

    `create_tf_dataset_for_client` builds from the client's own snippets;
    `serializable_dataset_fn` (for TFF computations) embeds all snippets
    (a few MB for Shakespeare) as a constant and selects the client's slice.
    """

    def __init__(self, client_snippets, seq_len, stride):
      self._ids = list(client_snippets)
      self._snippets = {
          k: np.array([bytes(s) for s in v], dtype=object)
          for k, v in client_snippets.items()
      }
      self._seq_len, self._stride = seq_len, stride
      lengths = [len(self._snippets[k]) for k in self._ids]
      self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
      self._all = (
          np.concatenate([self._snippets[k] for k in self._ids])
          if self._ids
          else np.zeros([0], object)
      )

    @property
    def client_ids(self):
      return list(self._ids)

    def _examples(self, snippets):
      seq_len, stride = self._seq_len, self._stride
      return tf.data.Dataset.from_tensor_slices(snippets).flat_map(
          lambda s: tf_snippet_to_dataset(s, seq_len, stride)
      )

    def create_tf_dataset_for_client(self, client_id):
      if client_id not in self._snippets:
        raise ValueError(
            f'ID [{client_id}] is not a client in this ClientData. See '
            'property `client_ids` for the list of valid ids.'
        )
      return self._examples(tf.constant(self._snippets[client_id], tf.string))

    @property
    def serializable_dataset_fn(self):
      ids, offsets, everything = self._ids, self._offsets, self._all

      def dataset_fn(client_id):
        index = tf.argmax(
            tf.cast(tf.equal(client_id, tf.constant(ids)), tf.int32)
        )
        offs = tf.constant(offsets)
        snippets = tf.constant(everything, tf.string)[
            offs[index] : offs[index + 1]
        ]
        return self._examples(snippets)

      return dataset_fn

    @property
    def element_type_structure(self):
      return element_spec(self._seq_len)

  _SNIPPET_CLASS = SnippetClientData
  return SnippetClientData


def snippet_client_data(client_snippets: dict, seq_len=DEFAULT_SEQ_LEN, stride=1):
  """A TFF `ClientData` of examples from `{client id: [snippet bytes, ...]}`."""
  seq_len, stride = _check_seq_len_stride(seq_len, stride)
  return _snippet_client_data_class()(client_snippets, seq_len, stride)


# ------------------------------------------------------------------ HDF5


def _read_h5(path: str) -> dict:
  """Returns {client id: list of snippet bytes} from one TFF HDF5 file."""
  import h5py  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise DataError(f'Shakespeare HDF5 file {path}: does not exist')
  try:
    f = h5py.File(path, 'r')
  except (OSError, ValueError) as e:
    raise DataError(
        f'Shakespeare HDF5 file {path}: not a readable HDF5 file ({e})'
    ) from e
  out = {}
  with f:
    if 'examples' not in f or not isinstance(f['examples'], h5py.Group):
      raise DataError(
          f'Shakespeare HDF5 file {path}: no group "examples" (expected '
          'examples/<client_id>/snippets)'
      )
    try:
      for cid, group in f['examples'].items():
        if not isinstance(group, h5py.Group) or 'snippets' not in group:
          raise DataError(
              f'Shakespeare HDF5 file {path}: examples/{cid} has no '
              '"snippets" dataset'
          )
        values = group['snippets'][()]
        values = np.asarray(values)
        if values.ndim != 1 or values.dtype.kind not in 'SOU':
          raise DataError(
              f'Shakespeare HDF5 file {path}: examples/{cid}/snippets must be '
              f'a 1-D array of strings, got shape {values.shape} dtype '
              f'{values.dtype}'
          )
        snippets = []
        for v in values.tolist():
          if isinstance(v, str):
            v = v.encode('utf-8')
          if not isinstance(v, bytes):
            raise DataError(
                f'Shakespeare HDF5 file {path}: examples/{cid}/snippets holds '
                f'a {type(v).__name__}, expected byte strings'
            )
          snippets.append(v)
        out[cid] = snippets
    except DataError:
      raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
      raise DataError(
          f'Shakespeare HDF5 file {path}: corrupt or unreadable ({e})'
      ) from e
  if not out:
    raise DataError(f'Shakespeare HDF5 file {path}: holds no clients')
  return out


def build_snippet_split(
    train_snippets: dict,
    test_snippets: dict,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int = 1,
    max_clients=None,
    client_order: str = 'sorted',
    seed=0,
    info: Optional[dict] = None,
):
  """A `FederatedSplit` from per-client snippets of both splits.

  Clients present in only one split are dropped (counted in `info`), clients
  with no example in a split too. Ids are sanitized; `original_ids` maps back.
  `train_indices[cid]` / `test_indices[cid]` are the positions 0..n-1 of the
  client's examples in the order they are generated (snippet order, then
  target position), per split.
  """
  from fedmask_tff.data.federated import FederatedSplit  # pylint: disable=g-import-not-at-top

  seq_len, stride = _check_seq_len_stride(seq_len, stride)
  info = dict(info or {})
  common = set(train_snippets) & set(test_snippets)
  info['dropped_train_only_clients'] = len(set(train_snippets) - common)
  info['dropped_test_only_clients'] = len(set(test_snippets) - common)
  empty = sorted(c for c in common if not train_snippets[c] or not test_snippets[c])
  info['dropped_empty_clients'] = len(empty)
  common -= set(empty)
  if not common:
    raise DataError(
        'no client has snippets in both the train and the test split'
    )
  chosen = _clients.select_clients(sorted(common), max_clients, client_order, seed)
  ids, original = _clients.sanitize_client_ids(chosen)
  train_map = {c: train_snippets[original[c]] for c in ids}
  test_map = {c: test_snippets[original[c]] for c in ids}
  counts = []
  indices = []
  for source in (train_map, test_map):
    c = np.zeros([len(ids), NUM_CLASSES], np.int64)
    idx = {}
    for i, cid in enumerate(ids):
      y = snippet_targets(source[cid], stride)
      c[i] = np.bincount(y, minlength=NUM_CLASSES)
      idx[cid] = np.arange(y.size, dtype=np.int64)
    counts.append(c)
    indices.append(idx)
  info.update(
      seq_len=seq_len,
      stride=stride,
      index_space='per client and split: example positions in generation order',
  )
  split = FederatedSplit(
      train=snippet_client_data(train_map, seq_len, stride),
      test=snippet_client_data(test_map, seq_len, stride),
      client_ids=ids,
      num_classes=NUM_CLASSES,
      train_label_counts=counts[0],
      test_label_counts=counts[1],
      train_indices=indices[0],
      test_indices=indices[1],
  )
  return _clients.attach(split, original_ids=original, info=info)


def load_shakespeare_h5(
    data_dir,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int = 1,
    max_clients: Optional[int] = None,
    client_order: str = 'sorted',
    seed: int = 0,
):
  """Loads TFF's federated Shakespeare from its HDF5 files (715 roles).

  Args:
    data_dir: folder holding `shakespeare_train.h5` and `shakespeare_test.h5`.
    seq_len: context length of the examples.
    stride: keep every stride-th target of each snippet (1 = all).
    max_clients: keep only this many roles (see `client_order`).
    client_order: 'sorted' (the first `max_clients` ids in sorted order) or
      'random' (drawn with `seed`).
    seed: seed of the random client choice.

  Returns:
    A `FederatedSplit` over the roles (TFF's own train/test split of each
    role's snippets), `num_classes` = `VOCAB_SIZE`, elements
    `OrderedDict(x=int32 [seq_len], y=int32 [])`.

  Raises:
    DataError: naming the file, if a file is missing, not HDF5, or not in the
      layout `examples/<client_id>/snippets`.
  """
  start = time.time()
  data_dir = os.path.expanduser(os.fspath(data_dir))
  train = _read_h5(os.path.join(data_dir, H5_FILES['train']))
  test = _read_h5(os.path.join(data_dir, H5_FILES['test']))
  split = build_snippet_split(
      train, test, seq_len, stride, max_clients, client_order, seed,
      info={'source': data_dir, 'format': 'tff_hdf5'},
  )
  split.info['load_seconds'] = round(time.time() - start, 3)
  return split
