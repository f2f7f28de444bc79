"""Tests of the on-disk client state store (fedmask_tff.wire.client_state)."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from fedmask_tff.wire import bitpack
from fedmask_tff.wire.client_state import ClientStateError, ClientStateStore

SHAPES = [(4, 5), (7,), (2, 3, 2)]


def initial_state(shapes=SHAPES):
  return collections.OrderedDict(
      scores=tuple(np.full(s, 0.05, np.float32) for s in shapes),
      keep=tuple(np.ones(s, np.float32) for s in shapes),
      personal=tuple(np.ones(s, np.float32) for s in shapes),
      rounds=np.int32(0))


def make_store(tmp_path, shapes=SHAPES, name="states"):
  return ClientStateStore(str(tmp_path / name), shapes, lambda: initial_state(shapes))


def random_state(seed, shapes=SHAPES, keep_frac=0.4, rounds=3):
  rng = np.random.default_rng(seed)
  scores = tuple(rng.standard_normal(s).astype(np.float32) for s in shapes)
  keep = [(rng.random(s) < keep_frac).astype(np.float32) for s in shapes]
  keep[0] = np.ones(shapes[0], np.float32)  # an unpruned mask, as in the process
  # The personalized binary mask: 1[score >= 0] * keep, as the process produces it.
  personal = tuple(((s >= 0) * k).astype(np.float32) for s, k in zip(scores, keep))
  return collections.OrderedDict(scores=scores, keep=tuple(keep), personal=personal,
                                 rounds=np.int32(rounds))


def assert_loaded_matches(loaded, state):
  assert list(loaded) == ["scores", "keep", "personal", "rounds"]
  assert int(loaded["rounds"]) == int(state["rounds"])
  assert len(loaded["scores"]) == len(loaded["personal"]) == len(state["scores"])
  for s_in, k_in, p_in, s_out, k_out, p_out in zip(
      state["scores"], state["keep"], state["personal"], loaded["scores"], loaded["keep"],
      loaded["personal"]):
    s_in, k_in, p_in = (np.asarray(a, np.float32) for a in (s_in, k_in, p_in))
    assert s_out.dtype == k_out.dtype == p_out.dtype == np.float32
    assert s_out.shape == k_out.shape == p_out.shape == s_in.shape
    np.testing.assert_array_equal(k_out, k_in)
    # Bit-exact at kept positions, 0 at pruned ones.
    np.testing.assert_array_equal(s_out[k_in > 0].view(np.uint32), s_in[k_in > 0].view(np.uint32))
    assert np.all(s_out[k_in == 0] == 0)
    np.testing.assert_array_equal(p_out[k_in > 0], p_in[k_in > 0])
    assert np.all(p_out[k_in == 0] == 0)


# -------------------------------------------------------------- round trip ---

def test_round_trip_with_pruning(tmp_path):
  store = make_store(tmp_path)
  state = random_state(0, rounds=7)
  assert any(k.sum() < k.size for k in state["keep"])  # something is pruned
  size = store.put("client_0", state)
  assert size == os.path.getsize(store.path("client_0"))
  loaded = store.get("client_0")
  assert_loaded_matches(loaded, state)
  assert loaded["rounds"].dtype == np.int32


def test_hand_case_pruned_positions_load_as_zero(tmp_path):
  store = make_store(tmp_path, shapes=[(2, 3)])
  state = collections.OrderedDict(
      scores=(np.array([[0.5, -1.25, 3.0], [-0.0625, 7.0, 0.125]], np.float32),),
      keep=(np.array([[1, 0, 1], [0, 0, 1]], np.float32),),
      # Personal mask: 1 at a pruned position (index 4) is not stored: it loads as 0.
      personal=(np.array([[0, 0, 1], [0, 1, 1]], np.float32),),
      rounds=np.int32(2))
  store.put("a", state)
  loaded = store.get("a")
  np.testing.assert_array_equal(loaded["scores"][0], [[0.5, 0.0, 3.0], [0.0, 0.0, 0.125]])
  np.testing.assert_array_equal(loaded["keep"][0], [[1, 0, 1], [0, 0, 1]])
  np.testing.assert_array_equal(loaded["personal"][0], [[0, 0, 1], [0, 0, 1]])
  assert loaded["rounds"] == 2
  with np.load(store.path("a")) as f:
    np.testing.assert_array_equal(f["keep_0"], [0b100101])  # bits 0, 2, 5
    np.testing.assert_array_equal(f["scores_0"], [0.5, 3.0, 0.125])
    np.testing.assert_array_equal(f["personal_0"], [0b110])  # kept positions 0, 2, 5 -> 0, 1, 1


def test_overwrite_keeps_latest(tmp_path):
  store = make_store(tmp_path)
  store.put("c", random_state(1, rounds=1))
  second = random_state(2, rounds=2)
  store.put("c", second)
  assert_loaded_matches(store.get("c"), second)
  assert store.client_ids() == ["c"]


def test_accepts_tuples_lists_and_python_ints(tmp_path):
  store = make_store(tmp_path)
  state = random_state(3)
  as_lists = dict(scores=[s.tolist() for s in state["scores"]],
                  keep=[k.astype(bool) for k in state["keep"]],
                  personal=[p.astype(np.int32) for p in state["personal"]], rounds=3)
  store.put("x", as_lists)
  assert_loaded_matches(store.get("x"), state)


def test_unknown_client_gets_initial_state(tmp_path):
  sentinel = initial_state()
  store = ClientStateStore(str(tmp_path / "s"), SHAPES, lambda: sentinel)
  assert store.get("never_seen") is sentinel
  assert "never_seen" not in store
  store.put("seen", random_state(4))
  assert "seen" in store
  assert store.get("never_seen") is sentinel


def test_directory_created_and_client_ids(tmp_path):
  store = make_store(tmp_path, name="deep/nested/dir")
  assert os.path.isdir(tmp_path / "deep" / "nested" / "dir")
  assert store.client_ids() == []
  for cid in ["b", "a-1", "c.2", "A_3"]:
    store.put(cid, random_state(5))
  assert store.client_ids() == sorted(["b", "a-1", "c.2", "A_3"])


# ------------------------------------------------------------------- size ---

def test_files_are_packed(tmp_path):
  n = 10_000
  store = ClientStateStore(str(tmp_path), [(n,)], lambda: None)
  rng = np.random.default_rng(0)
  keep = np.zeros(n, np.float32)
  keep[rng.choice(n, size=n // 5, replace=False)] = 1  # 20% kept
  scores = rng.standard_normal(n).astype(np.float32)
  state = dict(scores=(scores,), keep=(keep,), personal=((scores >= 0) * keep,), rounds=1)
  size = store.put("big", state)
  assert size == os.path.getsize(store.path("big"))
  # Payload: 2000 float32 scores (8000 B) + 1250 packed keep bytes + 250 packed
  # personal bytes (kept positions only); the rest is npz/zip framing, the identity
  # (client, run, round) and the checksum. Unpacked (scores + keep as float32) it would be
  # 10000 * 4 * 2 = 80000 B.
  assert 8000 + 1250 + 250 < size < 12_200
  assert size < n * 4 * 2 / 6.5
  assert_loaded_matches(store.get("big"), state)


# ---------------------------------------------------------------- corrupt ---

def test_truncated_file(tmp_path):
  store = make_store(tmp_path)
  store.put("t", random_state(6))
  path = store.path("t")
  data = open(path, "rb").read()
  for cut in (0, 10, len(data) // 2, len(data) - 1):
    with open(path, "wb") as f:
      f.write(data[:cut])
    with pytest.raises(ClientStateError) as e:
      store.get("t")
    assert path in str(e.value)


def test_flipped_bytes(tmp_path):
  store = make_store(tmp_path)
  store.put("f", random_state(7))
  path = store.path("f")
  data = open(path, "rb").read()
  # Flip bytes all over the file: zip headers, npy headers, payload, checksum.
  for pos in range(0, len(data), max(1, len(data) // 40)):
    corrupt = bytearray(data)
    corrupt[pos] ^= 0xFF
    with open(path, "wb") as f:
      f.write(bytes(corrupt))
    try:
      store.get("f")
    except ClientStateError as e:
      assert path in str(e)
    else:  # Only bytes no reader looks at (e.g. zip timestamps) may be flipped unnoticed,
      # and then the state must still load unchanged.
      assert_loaded_matches(store.get("f"), random_state(7))


def _rewrite(path, arrays):
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def _read(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_checksum_mismatch(tmp_path):
  store = make_store(tmp_path)
  store.put("c", random_state(8))
  path = store.path("c")
  arrays = _read(path)
  # A well-formed file whose contents were edited but whose checksum was not.
  edited = dict(arrays)
  edited["scores_1"] = arrays["scores_1"] + np.float32(1.0)
  _rewrite(path, edited)
  with pytest.raises(ClientStateError, match="checksum") as e:
    store.get("c")
  assert path in str(e.value)
  edited = dict(arrays, rounds=np.int32(99))
  _rewrite(path, edited)
  with pytest.raises(ClientStateError, match="checksum"):
    store.get("c")
  edited = dict(arrays)
  del edited["sha256"]
  _rewrite(path, edited)
  with pytest.raises(ClientStateError, match="checksum"):
    store.get("c")
  # Restoring the original arrays makes it readable again.
  _rewrite(path, arrays)
  assert_loaded_matches(store.get("c"), random_state(8))


@pytest.mark.parametrize("missing", ["keep_2", "scores_0", "personal_1", "rounds"])
def test_missing_part_with_valid_checksum(tmp_path, missing):
  from fedmask_tff.wire.client_state import digest as _digest
  store = make_store(tmp_path)
  store.put("m", random_state(9))
  path = store.path("m")
  arrays = _read(path)
  del arrays["sha256"], arrays[missing]
  arrays["sha256"] = np.array(_digest(arrays))
  _rewrite(path, arrays)
  with pytest.raises(ClientStateError, match=missing) as e:
    store.get("m")
  assert path in str(e.value)


def test_wrong_shapes_on_load(tmp_path):
  store = make_store(tmp_path)
  store.put("w", random_state(10))
  path = store.path("w")
  # The same directory read by a store of another model.
  other = ClientStateStore(store.directory, [(4, 5), (30,), (2, 3, 2)], lambda: None)
  with pytest.raises(ClientStateError, match="does not match") as e:
    other.get("w")
  assert path in str(e.value)
  fewer_scores = ClientStateStore(store.directory, [(4, 5), (7,), (2, 3, 2)], lambda: None)
  arrays = _read(path)
  from fedmask_tff.wire.client_state import digest as _digest
  del arrays["sha256"]
  arrays["scores_1"] = arrays["scores_1"][:-1]  # one kept score missing
  arrays["sha256"] = np.array(_digest(arrays))
  _rewrite(path, arrays)
  with pytest.raises(ClientStateError, match="does not match"):
    fewer_scores.get("w")


def test_wrong_shapes_on_put(tmp_path):
  store = make_store(tmp_path)
  state = random_state(11)
  bad = dict(state, scores=(state["scores"][0].T,) + state["scores"][1:])
  with pytest.raises(ValueError, match="mask 0"):
    store.put("p", bad)
  bad = dict(state, keep=state["keep"][:2] + (np.ones((12,), np.float32),))
  with pytest.raises(ValueError, match="mask 2"):
    store.put("p", bad)
  bad = dict(state, scores=state["scores"][:2], keep=state["keep"][:2])
  with pytest.raises(ValueError, match="expects 3"):
    store.put("p", bad)
  assert "p" not in store and store.client_ids() == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_refused(tmp_path, bad):
  store = make_store(tmp_path)
  store.put("n", random_state(12))
  state = random_state(13)
  scores = [s.copy() for s in state["scores"]]
  scores[0][1, 2] = bad  # mask 0 keeps everything
  with pytest.raises(ValueError, match="non-finite"):
    store.put("n", dict(state, scores=tuple(scores)))
  # The previous state is untouched.
  assert_loaded_matches(store.get("n"), random_state(12))


def test_non_binary_keep_or_personal_refused(tmp_path):
  store = make_store(tmp_path)
  state = random_state(14)
  keep = list(state["keep"])
  keep[1] = keep[1] * 0.5
  with pytest.raises(ValueError):
    store.put("k", dict(state, keep=tuple(keep)))
  personal = list(state["personal"])
  personal[0] = personal[0] * 2
  with pytest.raises(ValueError):
    store.put("k", dict(state, personal=tuple(personal)))
  assert "k" not in store


# ----------------------------------------------------------------- atomic ---

def test_leftover_temp_file(tmp_path):
  store = make_store(tmp_path)
  state = random_state(15)
  store.put("a", state)
  # A crash mid-write leaves a partial temporary file behind.
  for name in (".a.npz.tmp", ".b.npz.tmp"):
    with open(os.path.join(store.directory, name), "wb") as f:
      f.write(b"PK\x03\x04 partial")
  assert store.client_ids() == ["a"]
  assert "b" not in store
  assert_loaded_matches(store.get("a"), state)
  assert store.get("b")["rounds"] == 0  # initial state
  # Writing again over the leftover works and replaces it.
  second = random_state(16)
  store.put("a", second)
  assert_loaded_matches(store.get("a"), second)
  assert not os.path.exists(os.path.join(store.directory, ".a.npz.tmp"))
  assert store.client_ids() == ["a"]


def test_crash_before_replace_keeps_previous_state(tmp_path, monkeypatch):
  store = make_store(tmp_path)
  first = random_state(17)
  store.put("a", first)

  def crash(src, dst):
    raise OSError("simulated crash")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError, match="simulated crash"):
    store.put("a", random_state(18))
  monkeypatch.undo()
  assert_loaded_matches(store.get("a"), first)
  assert store.client_ids() == ["a"]


def test_other_files_ignored_by_client_ids(tmp_path):
  store = make_store(tmp_path)
  store.put("z", random_state(19))
  for name in ("notes.txt", ".hidden.npz", "x.npz.bak"):
    open(os.path.join(store.directory, name), "w").close()
  assert store.client_ids() == ["z"]


@pytest.mark.parametrize("bad_id", ["a/b", "../x", "", "a b", "x\n", "/abs", "a\\b"])
def test_unsafe_client_id(tmp_path, bad_id):
  store = make_store(tmp_path)
  with pytest.raises(ValueError, match="unsafe"):
    store.path(bad_id)
  with pytest.raises(ValueError, match="unsafe"):
    store.put(bad_id, random_state(20))
  with pytest.raises(ValueError, match="unsafe"):
    store.get(bad_id)
  with pytest.raises(ValueError, match="unsafe"):
    bad_id in store  # noqa: B015
  assert os.listdir(store.directory) == []


def test_keep_is_stored_bit_packed(tmp_path):
  store = make_store(tmp_path)
  state = random_state(21)
  store.put("p", state)
  arrays = _read(store.path("p"))
  for i, (k, s) in enumerate(zip(state["keep"], SHAPES)):
    assert arrays[f"keep_{i}"].dtype == np.uint8
    assert arrays[f"keep_{i}"].size == bitpack.packed_size_bytes(int(np.prod(s)))
    np.testing.assert_array_equal(arrays[f"keep_{i}"], bitpack.pack_bits_np(k))
    assert arrays[f"scores_{i}"].shape == (int(k.sum()),)


# ------------------------------------------------------ the packed (wire) form ---

def packed(state):
  """``state`` in FedMask's wire form, packed by hand with numpy (little-endian bits)."""
  pack = lambda masks: tuple(np.packbits(np.asarray(m, np.uint8).reshape(-1), bitorder="little")
                             for m in masks)
  return collections.OrderedDict(scores=state["scores"], keep=pack(state["keep"]),
                                 personal=pack(state["personal"]), rounds=state["rounds"])


def test_packed_store_writes_the_same_files_and_reads_them_packed(tmp_path):
  from fedmask_tff.wire.client_state import PackedStateStore
  plain = make_store(tmp_path, name="plain")
  wire = PackedStateStore(str(tmp_path / "wire"), SHAPES, lambda: packed(initial_state()))
  for seed in range(4):
    state = random_state(seed)
    plain.put(f"c{seed}", state)
    wire.put(f"c{seed}", packed(state))
    with open(plain.path(f"c{seed}"), "rb") as a, open(wire.path(f"c{seed}"), "rb") as b:
      assert a.read() == b.read()  # byte for byte: runs stored either way resume either way
    loaded = wire.get(f"c{seed}")
    # Packed masks of ceil(n/8) bytes; scores full-size, 0 where pruned.
    expected = packed(plain.get(f"c{seed}"))
    for key in ("keep", "personal"):
      for got, want, shape in zip(loaded[key], expected[key], SHAPES):
        assert got.dtype == np.uint8 and got.shape == (bitpack.packed_size_bytes(np.prod(shape)),)
        np.testing.assert_array_equal(got, want)
    for got, want in zip(loaded["scores"], expected["scores"]):
      np.testing.assert_array_equal(got, want)
    assert int(loaded["rounds"]) == 3
  assert wire.get("never")["keep"][0].dtype == np.uint8  # a new client's state is packed too


def test_packed_store_refuses_masks_of_the_wrong_size(tmp_path):
  from fedmask_tff.wire.client_state import PackedStateStore
  wire = PackedStateStore(str(tmp_path / "wire"), SHAPES, lambda: None)
  state = packed(random_state(0))
  state["keep"] = (state["keep"][0][:-1],) + state["keep"][1:]  # one byte short
  with pytest.raises(ValueError, match="mask 0: scores"):
    wire.put("c", state)
  state = packed(random_state(0))
  state["scores"] = (np.full(SHAPES[0], np.inf, np.float32),) + state["scores"][1:]
  with pytest.raises(ValueError, match="non-finite"):
    wire.put("c", state)
