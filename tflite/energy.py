"""Energy per inference, **estimated** from counted operations and memory traffic.

There is no power monitor: the figure is an estimate, labelled so everywhere.
It is counted from the ``.tflite`` file itself (batch 1), op by op, as the
TFLite runtime executes it: a dense kernel multiplies zeros too, so MACs are
those of the tensors' shapes (a variant only saves MACs where its tensors are
really smaller, as in the compacted one).

Constants: Horowitz, "Computing's energy problem (and what we can do about
it)", ISSCC 2014, 45 nm, 0.9 V (as tabulated by Han et al., ICLR 2016 / ISCA 2016):

===========================  ========  ===========================================
operation                    energy    used for
===========================  ========  ===========================================
32-bit float multiply        3.7 pJ    float MAC = mult + add = 4.6 pJ
32-bit float add             0.9 pJ    float element-wise op (1 per output element)
8-bit int multiply           0.2 pJ    int8 MAC = 0.2 + 0.1 (int32 accumulate) = 0.3 pJ
32-bit int add               0.1 pJ    int32 element-wise op
8-bit int add                0.03 pJ   int8/uint8 element-wise op
SRAM/cache, 64-bit access    10 pJ (8 KB), 20 pJ (32 KB), 100 pJ (1 MB)
DRAM, 32-bit access          640 pJ    = 160 pJ/byte
===========================  ========  ===========================================

Traffic model: every constant tensor (weights, packed bits) is read from DRAM
once per inference (weights are not assumed cache-resident between
inferences); every other tensor is written once by its producer and read once
by each consumer at the cost of the smallest memory level that holds it
(<= 8 KiB: 1.25 pJ/B, <= 32 KiB: 2.5 pJ/B, <= 1 MiB: 12.5 pJ/B, larger: DRAM).
"""

from __future__ import annotations

import numpy as np

from tflite.convert import read_flatbuffer

PJ = {"fp32_mac": 4.6, "int8_mac": 0.3, "fp32_op": 0.9, "int32_op": 0.1, "int8_op": 0.03,
      "dram_byte": 640.0 / 4}
SOURCE = ("Horowitz, ISSCC 2014 (45 nm, 0.9 V): fp32 mult 3.7 pJ, fp32 add 0.9 pJ, int8 mult "
          "0.2 pJ, int32 add 0.1 pJ, int8 add 0.03 pJ, SRAM 10/20/100 pJ per 64 bit "
          "(8 KB/32 KB/1 MB), DRAM 640 pJ per 32 bit")

# TensorType -> bytes per element, and the op-cost class.
_TYPES = {0: (4, "fp32"), 1: (2, "fp32"), 2: (4, "int32"), 3: (1, "int8"), 4: (8, "int32"),
          6: (1, "int8"), 7: (2, "int32"), 9: (1, "int8"), 10: (8, "fp32")}


def _sram_pj_per_byte(nbytes: int) -> float:
  if nbytes <= 8 * 1024:
    return 10.0 / 8
  if nbytes <= 32 * 1024:
    return 20.0 / 8
  if nbytes <= 1024 * 1024:
    return 100.0 / 8
  return PJ["dram_byte"]


def estimate(path: str) -> dict:
  """Counted MACs, ops and bytes of one batch-1 inference, and the energy estimate (mJ)."""
  from tflite.convert import builtin_op_names
  with open(path, "rb") as f:
    data = f.read()
  model = read_flatbuffer(data, path)
  names = builtin_op_names(data, path)
  sg = model.subgraphs[0]
  tensors = sg.tensors

  def shape(i):
    s = tensors[i].shape
    return [max(1, int(d)) for d in (s if s is not None else [])]

  def nbytes(i):
    return int(np.prod(shape(i))) * _TYPES.get(int(tensors[i].type), (4, "fp32"))[0]

  def is_const(i):
    buf = model.buffers[tensors[i].buffer]
    return buf is not None and buf.data is not None and len(buf.data) > 0

  macs = {"fp32": 0, "int8": 0}
  elementwise = {"fp32": 0, "int32": 0, "int8": 0}
  const_bytes, act_pj, act_bytes = 0, 0.0, 0
  for op in sg.operators:
    name = names[op.opcodeIndex]
    ins = [i for i in (op.inputs if op.inputs is not None else []) if i >= 0]
    outs = [i for i in (op.outputs if op.outputs is not None else []) if i >= 0]
    out_elems = sum(int(np.prod(shape(o))) for o in outs)
    kind = _TYPES.get(int(tensors[ins[0]].type), (4, "fp32"))[1] if ins else "fp32"
    mac_kind = "int8" if kind == "int8" else "fp32"
    if name == "CONV_2D":
      _, kh, kw, cin = shape(ins[1])
      macs[mac_kind] += out_elems * kh * kw * cin
    elif name == "DEPTHWISE_CONV_2D":
      _, kh, kw, _ = shape(ins[1])
      macs[mac_kind] += out_elems * kh * kw
    elif name == "FULLY_CONNECTED":
      macs[mac_kind] += out_elems * shape(ins[1])[-1]
    elif name == "BATCH_MATMUL":
      macs[mac_kind] += out_elems * shape(ins[0])[-1]
    elif name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
      elementwise[kind] += out_elems * 4  # 2x2 windows in these models
    elif name not in ("RESHAPE", "SHAPE", "SQUEEZE", "EXPAND_DIMS"):  # views cost no arithmetic
      elementwise[kind] += out_elems
    for i in ins:
      if is_const(i):
        const_bytes += nbytes(i)
      else:
        act_bytes += nbytes(i)
        act_pj += nbytes(i) * _sram_pj_per_byte(nbytes(i))
    for o in outs:
      act_bytes += nbytes(o)
      act_pj += nbytes(o) * _sram_pj_per_byte(nbytes(o))
  compute_pj = (macs["fp32"] * PJ["fp32_mac"] + macs["int8"] * PJ["int8_mac"]
                + elementwise["fp32"] * PJ["fp32_op"] + elementwise["int32"] * PJ["int32_op"]
                + elementwise["int8"] * PJ["int8_op"])
  weight_pj = const_bytes * PJ["dram_byte"]
  total_pj = compute_pj + weight_pj + act_pj
  return {"macs_fp32": macs["fp32"], "macs_int8": macs["int8"],
          "elementwise_ops": sum(elementwise.values()), "constant_bytes_read": const_bytes,
          "activation_bytes_moved": act_bytes, "energy_compute_mj_estimate": compute_pj * 1e-9,
          "energy_weights_mj_estimate": weight_pj * 1e-9,
          "energy_activations_mj_estimate": act_pj * 1e-9,
          "energy_mj_estimate": total_pj * 1e-9}
