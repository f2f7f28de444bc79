"""Masked LSTM: frozen random gate weights with learned masks (FedMask for recurrent models).

An LSTM step (gate order i, f, c, o, as in Keras' ``LSTM``)::

    z  = x_t @ W_x + h_{t-1} @ W_h + b          # W_x [input_dim, 4u], W_h [u, 4u], b [4u]
    i, f, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o)
    c_t = f * c_{t-1} + i * tanh(z_c)
    h_t = o * tanh(c_t)

``masked_gates`` selects the gates whose columns (in both W_x and W_h) are
*masked*: frozen random weights from ``seed`` times a learned mask, exactly as
in :class:`fedmask_tff.masks.layers.MaskedDense` (``kernel`` / ``scores`` / ``keep``
through :class:`~fedmask_tff.masks.layers.MaskedWeightsMixin`). The columns of the
other gates are ordinary real-valued, trainable weights. The paper (Li et al.,
SenSys 2021) reports that masking *every* gate of an LSTM hurts accuracy, so
which gates are masked is a setting; the default ``"ifco"`` masks all of them
(no trainable weights but the scores).

The bias ``b`` is frozen and unmasked (zeros by default; ``unit_forget_bias``
sets the forget gate's part to 1, like Keras).

Weights of a cell with ``m`` masked and ``r = 4 - m`` real gates:

* ``kernel`` ``[input_dim, m*u]`` and ``recurrent_kernel`` ``[u, m*u]``: the
  masked gates' frozen columns (in gate order), each with its ``*_scores`` and
  ``*_keep``; they are the cell's :attr:`masked_weights`;
* ``real_kernel`` ``[input_dim, r*u]`` and ``real_recurrent_kernel`` ``[u, r*u]``
  (only when ``r > 0``): the real gates' trainable columns, in gate order;
* ``bias`` ``[4u]`` (frozen, when ``use_bias``).

:class:`MaskedLSTM` runs the cell over a sequence; it computes the masked
(effective) weights once per call, not once per time step. It holds the cell
as ``.cell``; :func:`fedmask_tff.masks.layers.masked_layers` finds the cell there.
The cell alone also works in ``tf.keras.layers.RNN``.
"""

from __future__ import annotations

import math
from typing import Optional

import tensorflow as tf

from fedmask_tff.masks import masking
from fedmask_tff.masks.layers import MaskedWeightsMixin, _training_flag

GATES = "ifco"


def check_masked_gates(masked_gates) -> str:
  """Validates ``masked_gates`` and returns it in canonical gate order ('ifco' order)."""
  if not isinstance(masked_gates, str):
    raise ValueError(f"masked_gates must be a string of letters from {GATES!r}, "
                     f"got {masked_gates!r}")
  gates = masked_gates.lower()
  bad = sorted(set(g for g in gates if g not in GATES))
  if bad:
    raise ValueError(f"masked_gates may only contain the letters {GATES!r} "
                     f"(input, forget, cell, output), got {masked_gates!r} (bad: {bad})")
  if len(set(gates)) != len(gates):
    raise ValueError(f"masked_gates has a repeated gate: {masked_gates!r}")
  if not gates:
    raise ValueError("masked_gates must name at least one gate of 'ifco' "
                     "(an LSTM with no masked gate is a plain tf.keras.layers.LSTM)")
  return "".join(g for g in GATES if g in gates)


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class StatelessGlorotUniform(tf.keras.initializers.Initializer):
  """Glorot-uniform values ``U(+-sqrt(6 / (fan_in + fan_out)))`` from an integer seed.

  Deterministic (stateless): the same seed and shape give the same values in
  every process. Used for the real (unmasked) gates' trainable weights.
  """

  def __init__(self, seed: int = 0, fan_in: Optional[int] = None, fan_out: Optional[int] = None):
    self.seed = int(seed)
    self.fan_in = fan_in
    self.fan_out = fan_out

  def __call__(self, shape, dtype=None, **kwargs):
    shape = tuple(int(d) for d in shape)
    fan_in = self.fan_in or (shape[0] if len(shape) > 1 else 1)
    fan_out = self.fan_out or shape[-1]
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    seed = tf.constant([self.seed, 0x6A7E], dtype=tf.int64)
    return tf.random.stateless_uniform(shape, seed=seed, minval=-limit, maxval=limit,
                                       dtype=dtype or tf.float32)

  def get_config(self):
    return {"seed": self.seed, "fan_in": self.fan_in, "fan_out": self.fan_out}


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class MaskedLSTMCell(MaskedWeightsMixin, tf.keras.layers.Layer):
  """One LSTM step with masked frozen weights for the gates in ``masked_gates``.

  Input ``[batch, input_dim]`` and states ``[h, c]`` (each ``[batch, units]``);
  output ``h``. See the module docstring for the weights.

  Args:
    units: hidden size (>= 1).
    masked_gates: the gates whose W_x and W_h columns are masked frozen weights,
      a subset of ``"ifco"`` (input, forget, cell candidate, output); the others
      are trainable real weights. Default ``"ifco"``: every gate masked. The
      FedMask paper found that masking every gate hurts, so e.g. ``"if"`` (real
      c and o columns) is worth trying.
    unit_forget_bias: the frozen bias of the forget gate is 1 (others from
      ``bias_initializer``), like Keras' LSTM. Needs ``use_bias``.
    use_bias: add the frozen, unmasked bias ``b`` (default True).
    bias_initializer: initializer of ``b`` (default zeros).
    seed: integer seed of the frozen weights (and of the real weights' initial values).
    mask_mode, threshold, score_init, kernel_init, score_init_std, inference_mask: as
      :class:`~fedmask_tff.masks.layers.MaskedDense`.
  """

  def __init__(self, units: int, masked_gates: str = GATES, unit_forget_bias: bool = False,
               use_bias: bool = True, bias_initializer="zeros", seed: int = 0,
               mask_mode: str = "ste", threshold: float = masking.DEFAULT_THRESHOLD,
               score_init: float = 0.05, kernel_init: str = "signed_constant",
               score_init_std: float = 0.0, inference_mask: str = "threshold", **kwargs):
    super().__init__(**kwargs)
    try:
      units_int = int(units)
    except (TypeError, ValueError):
      raise ValueError(f"units must be an integer >= 1, got {units!r}") from None
    if units_int != units or units_int < 1:
      raise ValueError(f"units must be an integer >= 1, got {units!r}")
    self.units = units_int
    self.masked_gates = check_masked_gates(masked_gates)
    self.use_bias = bool(use_bias)
    self.unit_forget_bias = bool(unit_forget_bias)
    if self.unit_forget_bias and not self.use_bias:
      raise ValueError("unit_forget_bias=True needs use_bias=True")
    self.bias_initializer = tf.keras.initializers.get(bias_initializer)
    self._init_mask_settings(seed, mask_mode, threshold, score_init, kernel_init,
                             score_init_std, inference_mask)
    self.state_size = [self.units, self.units]
    self.output_size = self.units

  @property
  def real_gates(self) -> str:
    """The gates with trainable real-valued columns (those not in ``masked_gates``)."""
    return "".join(g for g in GATES if g not in self.masked_gates)

  def build(self, input_shape):
    input_dim = input_shape[-1]
    if input_dim is None:
      raise ValueError(f"the last input dimension must be known, got input shape {input_shape}")
    input_dim = int(input_dim)
    u = self.units
    m, r = len(self.masked_gates), len(self.real_gates)
    self.kernel, self.scores, self.keep = self._add_masked_weight(
        "kernel", (input_dim, m * u), seed_offset=0, fan_in=input_dim)
    self.recurrent_kernel, self.recurrent_scores, self.recurrent_keep = self._add_masked_weight(
        "recurrent_kernel", (u, m * u), seed_offset=1, fan_in=u)
    self.real_kernel = self.real_recurrent_kernel = None
    if r:
      self.real_kernel = self.add_weight(
          name="real_kernel", shape=(input_dim, r * u), dtype=tf.float32, trainable=True,
          initializer=StatelessGlorotUniform(self.seed + 2, fan_in=input_dim, fan_out=4 * u))
      self.real_recurrent_kernel = self.add_weight(
          name="real_recurrent_kernel", shape=(u, r * u), dtype=tf.float32, trainable=True,
          initializer=StatelessGlorotUniform(self.seed + 3, fan_in=u, fan_out=4 * u))
    self.bias = None
    if self.use_bias:
      if self.unit_forget_bias:
        bias_init = self.bias_initializer

        def initializer(shape, dtype=None, **kwargs):
          del shape
          return tf.concat([bias_init((u,), dtype=dtype), tf.ones((u,), dtype=dtype),
                            bias_init((2 * u,), dtype=dtype)], axis=0)
      else:
        initializer = self.bias_initializer
      self.bias = self.add_weight(name="bias", shape=(4 * u,), dtype=tf.float32,
                                  trainable=False, initializer=initializer)
    super().build(input_shape)

  def _assemble(self, masked, real):
    """Interleaves the masked and real column blocks into gate order i, f, c, o."""
    if real is None:
      return masked
    masked_blocks = tf.split(masked, len(self.masked_gates), axis=1)
    real_blocks = tf.split(real, len(self.real_gates), axis=1)
    blocks = []
    for g in GATES:
      if g in self.masked_gates:
        blocks.append(masked_blocks[self.masked_gates.index(g)])
      else:
        blocks.append(real_blocks[self.real_gates.index(g)])
    return tf.concat(blocks, axis=1)

  def effective_kernels(self, training=None):
    """``(W_x, W_h)``: the full ``[input_dim, 4u]`` and ``[u, 4u]`` weights of this forward pass.

    Masked gates' columns are ``W * mask * keep`` (binary mask unless soft-mode
    training); real gates' columns are the trainable weights.
    """
    training = _training_flag(training)
    wx = self.kernel * self.mask_for(self.scores, self.keep, training)
    wh = self.recurrent_kernel * self.mask_for(self.recurrent_scores, self.recurrent_keep,
                                               training)
    return (self._assemble(wx, self.real_kernel),
            self._assemble(wh, self.real_recurrent_kernel))

  def step(self, inputs, states, kernel, recurrent_kernel):
    """One LSTM step with given effective kernels; returns ``(h, [h, c])``."""
    h_prev, c_prev = states[0], states[1]
    z = tf.matmul(inputs, kernel) + tf.matmul(h_prev, recurrent_kernel)
    if self.bias is not None:
      z = z + self.bias
    z_i, z_f, z_c, z_o = tf.split(z, 4, axis=1)
    i = tf.sigmoid(z_i)
    f = tf.sigmoid(z_f)
    o = tf.sigmoid(z_o)
    c = f * c_prev + i * tf.tanh(z_c)
    h = o * tf.tanh(c)
    return h, [h, c]

  def call(self, inputs, states, training=None):
    kernel, recurrent_kernel = self.effective_kernels(training)
    return self.step(inputs, states, kernel, recurrent_kernel)

  def get_initial_state(self, inputs=None, batch_size=None, dtype=None):
    if batch_size is None:
      batch_size = tf.shape(inputs)[0]
    dtype = dtype or tf.float32
    return [tf.zeros((batch_size, self.units), dtype=dtype),
            tf.zeros((batch_size, self.units), dtype=dtype)]

  def get_config(self):
    config = super().get_config()
    config.update(self._mask_config())
    config.update({"units": self.units, "masked_gates": self.masked_gates,
                   "unit_forget_bias": self.unit_forget_bias, "use_bias": self.use_bias,
                   "bias_initializer": tf.keras.initializers.serialize(self.bias_initializer)})
    return config


@tf.keras.utils.register_keras_serializable(package="fedmask_tff")
class MaskedLSTM(tf.keras.layers.Layer):
  """LSTM layer over ``[batch, time, features]`` built on a :class:`MaskedLSTMCell`.

  Output ``[batch, units]`` (last ``h``), or ``[batch, time, units]`` with
  ``return_sequences=True``. Initial states are zeros unless
  ``initial_state=[h0, c0]`` is passed to the call; Keras input masks are
  honoured (masked steps keep the previous state and output).

  The effective weights are computed once per call. The cell (which carries
  the masked weights) is ``.cell``; the arguments other than
  ``return_sequences`` are the cell's (see :class:`MaskedLSTMCell`, notably
  ``masked_gates``: which gates are masked, default all of ``"ifco"``; the
  paper found masking every gate hurts).
  """

  def __init__(self, units: int, masked_gates: str = GATES, unit_forget_bias: bool = False,
               return_sequences: bool = False, use_bias: bool = True, bias_initializer="zeros",
               seed: int = 0, mask_mode: str = "ste",
               threshold: float = masking.DEFAULT_THRESHOLD, score_init: float = 0.05,
               kernel_init: str = "signed_constant", score_init_std: float = 0.0,
               inference_mask: str = "threshold", **kwargs):
    super().__init__(**kwargs)
    self.return_sequences = bool(return_sequences)
    self.cell = MaskedLSTMCell(
        units, masked_gates=masked_gates, unit_forget_bias=unit_forget_bias, use_bias=use_bias,
        bias_initializer=bias_initializer, seed=seed, mask_mode=mask_mode, threshold=threshold,
        score_init=score_init, kernel_init=kernel_init, score_init_std=score_init_std,
        inference_mask=inference_mask, name="cell")
    self.supports_masking = True
    self.input_spec = tf.keras.layers.InputSpec(ndim=3)

  @property
  def units(self) -> int:
    return self.cell.units

  @property
  def masked_gates(self) -> str:
    return self.cell.masked_gates

  def build(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    if input_shape.rank != 3:
      raise ValueError(f"MaskedLSTM expects input [batch, time, features], got {input_shape}")
    if not self.cell.built:
      with tf.name_scope(self.cell.name):
        self.cell.build(tf.TensorShape([input_shape[0], input_shape[-1]]))
    super().build(input_shape)

  def call(self, inputs, mask=None, training=None, initial_state=None):
    training = _training_flag(training)
    kernel, recurrent_kernel = self.cell.effective_kernels(training)
    if initial_state is None:
      initial_state = self.cell.get_initial_state(inputs=inputs, dtype=inputs.dtype)
    else:
      initial_state = list(initial_state)
      if len(initial_state) != 2:
        raise ValueError("initial_state must be [h0, c0]")

    def step_fn(x_t, states):
      return self.cell.step(x_t, states, kernel, recurrent_kernel)

    last, outputs, _ = tf.keras.backend.rnn(
        step_fn, inputs, initial_state, mask=mask, input_length=inputs.shape[1],
        return_all_outputs=self.return_sequences)
    return outputs if self.return_sequences else last

  def compute_mask(self, inputs, mask=None):
    return mask if self.return_sequences else None

  def compute_output_shape(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    if self.return_sequences:
      return tf.TensorShape([input_shape[0], input_shape[1], self.units])
    return tf.TensorShape([input_shape[0], self.units])

  def get_config(self):
    config = super().get_config()
    cell_config = self.cell.get_config()
    for key in ("name", "trainable", "dtype"):
      cell_config.pop(key, None)
    config.update(cell_config)
    config["return_sequences"] = self.return_sequences
    return config
