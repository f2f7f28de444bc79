"""Exact entropy coding of sampled uploads (``--uplink_coding=entropy``), done in the driver.

A client uploads one sample ``b ~ Bernoulli(sigmoid(m_r))`` per kept element (1 bit each,
packed). Where it started the round from the server's theta, both ends know theta *as it went
down* (quantized to ``downlink_bits``, :func:`fedmask_tff.masks.probability.quantize_theta`):
the sample mostly agrees with ``1[theta_q >= 0.5]`` once the masks have learned, and FedPM codes
it against theta for that reason. Here each weight's bits are coded against that reference with
:func:`fedmask_tff.wire.coding.encode_mask` (adaptive rANS over the flips ``b ^ reference``,
contexts: previous flip and reference bit; exact, CRC-checked):

* a weight the client started from theta (a shared weight: every element; a pruned one that is
  not personal, or personal with ``head_start="theta"``: its kept positions where the server
  has a value, ``defined``, else 0): ``reference = 1[theta_q >= 0.5]``;
* a personal weight (the client's own scores; nothing went down for it): ``reference = 0``
  (the coder still learns the sample's density).

One stream per weight, every client's streams coded in one vectorized pass, in lanes of
``LANE_LEN`` bits (the coder's time grows with a lane's
length, its size by 32 bits a lane: 4,096 costs about 1.6 % more bits than the coder's default
16,384 on the demo cnn's 421,408 elements and encodes about 4x faster); the coded size is the
streams' bytes x 8 (header and CRC included, about 100 bits a stream). The client sends the
streams or, when they would be larger (a tiny model, masks not yet learned), the packed bits as
they are, plus one byte saying which. With ``check`` one client's streams are decoded here and
compared with its upload (a mismatch raises; the driver checks the first client's in the first
round and every ``CHECK_EVERY`` rounds after; decoding is as slow as coding everyone's, and the
coder's exactness is tested in ``tests/unit/test_coding.py``). TFF still carries the packed bits
to the server computation; the bits reported are the coded ones.
"""

from __future__ import annotations

import numpy as np

from fedmask_tff.algorithms.sampled_masks.config import receives_theta
from fedmask_tff.masks import probability
from fedmask_tff.wire import bitpack, coding

LANE_LEN = 4096
CHECK_EVERY = 10  # rounds between decode checks of the coded payloads, up and down (round 0's is checked)


def theta_decisions(plan, config, theta) -> list:
  """Per weight: uint8 ``1[theta_q >= 0.5]`` over all its elements (theta as it goes down,
  ``downlink_bits``; the quantizer is element-wise), or None where nothing goes down (a
  personal weight). The same for every client of a round: compute it once a round."""
  out = []
  for spec, t in zip(plan, theta):
    if not receives_theta(spec, config):
      out.append(None)
      continue
    flat = np.asarray(t, np.float32).reshape(-1)
    got = probability.dequantize_theta(probability.quantize_theta(flat, config.downlink_bits),
                                       flat.size, config.downlink_bits)
    out.append((got >= 0.5).astype(np.uint8))
  return out


def references(plan, config, theta, defined, keep_packed, decisions=None) -> list[np.ndarray]:
  """Per weight: the uint8 0/1 reference of its uploaded bits (``[kept elements]`` of a pruned
  weight, ``[size]`` otherwise), from the server's ``theta`` and ``defined`` at the start of the
  round and the client's packed ``keep`` masks after the round (an upload is at the kept
  positions of the round's end: a client prunes in its first round). ``decisions``: the
  round's :func:`theta_decisions`, when already computed."""
  if decisions is None:
    decisions = theta_decisions(plan, config, theta)
  refs = []
  for spec, dec, d, k in zip(plan, decisions, defined, keep_packed):
    if spec.prunable:
      kept = bitpack.unpack_bits_np(np.asarray(k, np.uint8), (spec.size,), bool)
    else:
      kept = slice(None)
    if dec is None:
      refs.append(np.zeros(int(np.count_nonzero(kept)) if spec.prunable else spec.size, np.uint8))
    elif spec.prunable:  # where the server has no value the client started from its own scores
      refs.append(dec[kept] & np.asarray(d, bool).reshape(-1)[kept].astype(np.uint8))
    else:
      refs.append(dec)
  return refs


def coded_bits(packed_bits, refs, check: bool = True) -> int:
  """Bits of one coded upload (:func:`coded_bits_many` of one client)."""
  return coded_bits_many([packed_bits], [refs], check=0 if check else None)[0]


def coded_bits_many(uploads, refs_list, check=None) -> list[int]:
  """Per client, the bits of its coded upload: each weight's packed sampled bits (uint8
  ``[ceil(n/8)]``) coded against its reference (uint8 ``[n]``), one stream each; 8 (the byte
  saying coded or packed) + the smaller of the streams' and the packed bits. Every client's
  streams are coded in one vectorized pass (:func:`fedmask_tff.wire.coding.encode_masks`: the
  same bytes as one by one). ``check``: the index of a client whose streams are decoded back
  and compared with its upload (None: none). Raises ``ValueError`` when a payload's size does
  not match its reference (the server would refuse that upload) and ``RuntimeError`` if a
  stream does not decode to the upload."""
  pairs, owners, packed_totals = [], [], []
  for c, (packed_bits, refs) in enumerate(zip(uploads, refs_list)):
    packed_total = 0
    for i, (packed, ref) in enumerate(zip(packed_bits, refs)):
      packed = np.asarray(packed, np.uint8).reshape(-1)
      n = ref.size
      if packed.size != bitpack.packed_size_bytes(n):
        raise ValueError(f"upload of weight {i}: {packed.size} bytes for {n} kept elements")
      packed_total += 8 * packed.size
      if n:
        pairs.append((bitpack.unpack_bits_np(packed, (n,), np.uint8), ref))
        owners.append((c, i))
    packed_totals.append(packed_total)
  streams = coding.encode_masks(pairs, LANE_LEN)
  totals = [0] * len(packed_totals)
  for (c, i), (bits, ref), stream in zip(owners, pairs, streams):
    totals[c] += 8 * len(stream)
    if c == check and not np.array_equal(coding.decode_mask(stream, ref, bits.size), bits):
      raise RuntimeError(f"upload of weight {i} did not decode exactly")  # never expected
  return [8 + min(total, packed) for total, packed in zip(totals, packed_totals)]
