"""Keras / IR -> ``.tflite`` with builtin ops only (what the stock Android runtime runs).

* :func:`keras_to_tflite`: float32, or full-integer int8 (weights per channel,
  activations calibrated on representative examples; float32 input and output
  so the app feeds the same tensor to every variant).
* :func:`packed_runtime_tflite`: the client's masks stay bit-packed (uint8
  constants, 8 elements per byte) inside the model and are unpacked at every
  invocation with builtin ops (SLICE, CAST, FLOOR_DIV, FLOOR_MOD, RESHAPE,
  MUL); W is stored packed too when it is a signed constant (+-scale, the
  default ``kernel_init``), else as float32.
* :func:`builtin_op_names` reads a ``.tflite``'s operator codes and
  :func:`check_builtin_only` rejects Flex (SELECT_TF_OPS) and custom ops.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from tflite import graph
from tflite.runs import ArtifactError

_POW2 = np.array([[1, 2, 4, 8, 16, 32, 64, 128]], np.int32)


def _converter_quiet():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Every exported model has one signature, ``serving_default``, with these names, so an app
# (LiteRT's SignatureRunner) addresses every variant the same way (see docs/tflite.md).
SIGNATURE_KEY, INPUT_NAME, OUTPUT_NAME = "serving_default", "image", "logits"


def _signed_converter(forward, input_shape, trackable) -> tf.lite.TFLiteConverter:
  """A converter for ``forward`` (float32 ``[batch, *input_shape]`` -> logits) under the
  signature ``serving_default(image) -> {logits}``."""
  @tf.function(input_signature=[tf.TensorSpec((None,) + tuple(input_shape), tf.float32,
                                              name=INPUT_NAME)])
  def serve(image):
    return {OUTPUT_NAME: forward(image)}

  converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()],
                                                              trackable)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter


def keras_to_tflite(model: tf.keras.Model, calibration: np.ndarray | None = None,
                    sparse: bool = False) -> bytes:
  """Converts with ``TFLITE_BUILTINS`` only; int8 (full integer) when ``calibration`` is given;
  ``sparse``: the converter's sparse-weight encoding of float32 weights that are mostly zero
  (``Optimize.EXPERIMENTAL_SPARSITY``, the format TFLite uses for pruned models; the runtime
  densifies them when it loads the model, so the outputs are the same)."""
  _converter_quiet()
  converter = _signed_converter(lambda x: model(x, training=False), model.input_shape[1:], model)
  if sparse:
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
  if calibration is not None:
    calibration = np.asarray(calibration, np.float32)

    def representative():
      for i in range(calibration.shape[0]):
        yield [calibration[i:i + 1]]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  data = converter.convert()
  check_builtin_only(data)
  return data


def _packed_const(bits: np.ndarray) -> np.ndarray:
  return np.packbits(np.asarray(bits, np.uint8).reshape(-1), bitorder="little")


class _PackedModule(tf.Module):
  """The forward pass with masks (and signed-constant W) unpacked from bytes at run time."""

  def __init__(self, ops, weights, masks, input_shape):
    super().__init__()
    self._ops, self._input_shape = ops, tuple(input_shape)
    self._layers = []
    j = 0
    for op in ops:
      if op.kind in ("conv", "dense"):
        w, m = np.asarray(weights[j], np.float32), np.asarray(masks[j], np.float32)
        j += 1
        mags = np.unique(np.abs(w))
        if op.kind == "dense":  # stored [out, in]: FULLY_CONNECTED's layout (no BATCH_MATMUL)
          w, m = w.T, m.T
        entry = {"shape": w.shape, "n": int(w.size), "mask": _packed_const(m > 0)}
        if mags.size == 1 and mags[0] > 0:
          entry.update(signs=_packed_const(w > 0), scale=float(mags[0]))
        else:
          entry.update(dense_w=w)
        self._layers.append(entry)
      elif op.kind == "layer":
        self._layers.append(op.layer_class.from_config(op.layer_config))
      else:
        self._layers.append(None)

  @staticmethod
  def _unpack(packed, n, shape, anchor):
    # `anchor` is 0 at run time but depends on the input, so the converter cannot
    # constant-fold the unpacking back into float32 weights.
    c = tf.slice(tf.constant(packed), tf.reshape(anchor, [1]), [packed.size])
    b = tf.cast(tf.reshape(c, [-1, 1]), tf.int32)
    bits = tf.math.floormod(tf.math.floordiv(b, tf.constant(_POW2)), 2)
    return tf.reshape(tf.cast(tf.reshape(bits, [-1])[:n], tf.float32), shape)

  def forward(self, x):
    anchor = tf.cast(tf.shape(x)[0] < 0, tf.int32)
    for op, layer in zip(self._ops, self._layers):
      if op.kind in ("conv", "dense"):
        mask = self._unpack(layer["mask"], layer["n"], layer["shape"], anchor)
        if "signs" in layer:
          signs = self._unpack(layer["signs"], layer["n"], layer["shape"], anchor)
          w = (signs * (2.0 * layer["scale"]) - layer["scale"]) * mask
        else:
          w = tf.constant(layer["dense_w"]) * mask
        if op.kind == "conv":
          x = tf.nn.conv2d(x, w, strides=(1,) + tuple(op.strides) + (1,),
                           padding=op.padding.upper())
        else:
          x = tf.matmul(x, w, transpose_b=True)
        if op.b is not None:
          x = x + tf.constant(op.b)
        x = tf.keras.activations.get(op.activation)(x)
      elif op.kind == "flatten":
        x = tf.reshape(x, [-1, int(np.prod(op.in_shape))])
      else:
        x = layer(x)
    return x


def packed_runtime_tflite(masked_model: tf.keras.Model, masks) -> bytes:
  """A ``.tflite`` that stores the masks packed and unpacks them at each invocation."""
  from fedmask_tff.masks.layers import mask_variables
  _converter_quiet()
  ops, input_shape = graph.from_keras(masked_model, masks)
  kernels = [k.numpy() for k in mask_variables(masked_model)[0]]
  module = _PackedModule(ops, kernels, masks, input_shape)
  data = _signed_converter(module.forward, input_shape, module).convert()
  check_builtin_only(data)
  return data


def _schema():
  from tensorflow.lite.python import schema_py_generated as schema
  return schema


def read_flatbuffer(data: bytes, path: str = "<bytes>"):
  """The ``ModelT`` object of a ``.tflite``; :class:`ArtifactError` naming ``path`` if invalid."""
  schema = _schema()
  if len(data) < 8 or data[4:8] != b"TFL3":
    raise ArtifactError(f"{path} is not a TFLite model (no TFL3 identifier; corrupt or truncated)")
  try:
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(data), 0))
  except Exception as e:  # flatbuffers raises assorted errors on garbage
    raise ArtifactError(f"{path} is a corrupt TFLite model: {e}") from None


def builtin_op_names(data: bytes, path: str = "<bytes>") -> list[str]:
  """Names of the model's operator codes (e.g. ``CONV_2D``; ``CUSTOM:name`` for custom ops)."""
  schema = _schema()
  names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
  model = read_flatbuffer(data, path)
  out = []
  for code in model.operatorCodes:
    c = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    name = names.get(c, str(c))
    if name == "CUSTOM":
      cc = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
      name = f"CUSTOM:{cc}"
    out.append(name)
  return out


def check_builtin_only(data: bytes, path: str = "<bytes>") -> None:
  bad = [n for n in builtin_op_names(data, path) if n.startswith("CUSTOM")]
  if bad:
    raise ArtifactError(f"{path} uses non-builtin ops {bad}; the stock TFLite runtime lacks them")


def make_interpreter(path: str, num_threads: int = 1, use_xnnpack: bool = True):
  """``tf.lite.Interpreter`` for ``path`` with tensors allocated; ArtifactError naming the file."""
  if not os.path.isfile(path):
    raise ArtifactError(f"TFLite model {path} is missing")
  with open(path, "rb") as f:
    read_flatbuffer(f.read(), path)
  resolver = (tf.lite.experimental.OpResolverType.AUTO if use_xnnpack else
              tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  try:
    interp = tf.lite.Interpreter(model_path=path, num_threads=num_threads,
                                 experimental_op_resolver_type=resolver)
    interp.allocate_tensors()
  except (ValueError, RuntimeError) as e:
    raise ArtifactError(f"TFLite model {path} cannot be loaded: {e}") from None
  return interp


def predict(path_or_interp, x: np.ndarray, batch: int = 100) -> np.ndarray:
  """Runs a ``.tflite`` over ``x`` (float32 ``[n, ...]``) in batches; returns the outputs."""
  interp = make_interpreter(path_or_interp) if isinstance(path_or_interp, str) else path_or_interp
  inp = interp.get_input_details()[0]
  out_index = interp.get_output_details()[0]["index"]
  outs, current = [], None
  for start in range(0, x.shape[0], batch):
    chunk = x[start:start + batch]
    n = chunk.shape[0]
    if current != n:
      interp.resize_tensor_input(inp["index"], [n] + list(x.shape[1:]))
      interp.allocate_tensors()
      current = n
    interp.set_tensor(inp["index"], chunk.astype(np.float32))
    interp.invoke()
    outs.append(np.array(interp.get_tensor(out_index)))
  return np.concatenate(outs)


def write(path: str, data: bytes) -> int:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
  return len(data)
