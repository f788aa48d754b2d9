"""Wire format: body bytes == billed bits, the frame (layout id, codec tag, CRC-32), round
trips, malformed / corrupted / foreign messages, and the memory bounds of pack / unpack."""

import tracemalloc
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import Field, Keys, bits, compressors, testing, wire
from fedjax_compress.wire import _pack


def _payload(rng):
  return {
      "f32": Field(jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), 32),
      "bf16": Field(jnp.asarray(rng.normal(size=7), jnp.bfloat16), 16),
      "i5": Field(jnp.asarray(rng.integers(-16, 16, size=11), jnp.int8), 5),
      "u3": Field(jnp.asarray(rng.integers(0, 8, size=9), jnp.uint32), 3),
      "flag": Field(jnp.asarray(rng.integers(0, 2, size=4), bool), 1),
      "var": Field(jnp.asarray(rng.normal(size=10), jnp.float32), 32, jnp.int32(6)),
      "u64": Field(rng.integers(0, 2**63, size=3, dtype=np.uint64), 64),  # NumPy: no x64
  }


def _reference_body(payload) -> bytes:
  """The body bit stream built element by element in Python (MSB first, zero padded)."""
  out = []
  for f in bits.fields(payload):
    flat = np.asarray(f.data).ravel()
    if f.count is not None:
      n = int(f.count)
      out.append(format(n, f"0{bits.length_bits(flat.size)}b"))
      flat = flat[:n]
    for x in flat:
      if flat.dtype == np.bool_:
        v = int(x)
      elif np.issubdtype(flat.dtype, np.integer):
        v = int(x) % (1 << f.width)
      else:
        v = int(np.asarray(x).view({2: np.uint16, 4: np.uint32, 8: np.uint64}[flat.itemsize]))
      out.append(format(v, f"0{f.width}b"))
  s = "".join(out)
  s += "0" * (-len(s) % 8)
  return bytes(int(s[i:i + 8], 2) for i in range(0, len(s), 8))


@pytest.mark.parametrize("seed", range(5))
def test_roundtrip_and_lengths(seed):
  p = _payload(np.random.default_rng(seed))
  expected_bits = (15 * 32 + 7 * 16 + 11 * 5 + 9 * 3 + 4 + (6 * 32 + bits.length_bits(10))
                   + 3 * 64)
  assert wire.total_bits(p) == expected_bits == int(bits.count(p))
  body = wire.pack(p, raw=True)
  assert body == _reference_body(p) and len(body) == -(-expected_bits // 8)
  data = wire.pack(p)
  assert len(data) == wire.FRAME_BYTES + len(body) and data[20:-4] == body
  assert data[:4] == wire.MAGIC and int.from_bytes(data[12:20], "big") == expected_bits
  assert int.from_bytes(data[-4:], "big") == zlib.crc32(data[:-4])
  assert int.from_bytes(data[4:8], "big") == wire.layout_id(p)
  for q in (wire.unpack(data, p), wire.unpack(body, p, raw=True)):
    for k in p:
      a, b = np.asarray(p[k].data), np.asarray(q[k].data)
      if p[k].count is None:
        np.testing.assert_array_equal(a, b)
      else:
        n = int(p[k].count)
        np.testing.assert_array_equal(a.ravel()[:n], b.ravel()[:n])
        assert not np.any(b.ravel()[n:]) and int(q[k].count) == n


def test_long_unaligned_fields_match_reference():
  # Fields longer than a chunk, at unaligned bit offsets (3-bit field first).
  rng = np.random.default_rng(7)
  n = _pack._CHUNK + 123
  p = {"a": Field(jnp.asarray(rng.integers(0, 8, 5), jnp.uint8), 3),
       "b": Field(jnp.asarray(rng.normal(size=n), jnp.float32), 32),
       "c": Field(jnp.asarray(rng.integers(-64, 64, n), jnp.int8), 7)}
  body = wire.pack(p, raw=True)
  assert body == _reference_body(p)
  back = wire.unpack(wire.pack(p), p)
  for k in p:
    np.testing.assert_array_equal(np.asarray(back[k].data), np.asarray(p[k].data))


def test_template_from_eval_shape():
  p = _payload(np.random.default_rng(0))
  del p["u64"]  # eval_shape would make it uint32 (no x64)
  tmpl = jax.eval_shape(lambda x: x, p)
  assert wire.layout_id(tmpl) == wire.layout_id(p)
  assert wire.pack(wire.unpack(wire.pack(p), tmpl)) == wire.pack(p)


def test_batched_total_bits_sums_messages():
  p = {"v": Field(jnp.ones((4, 10)), 32, jnp.array([0, 1, 2, 10], jnp.int32))}
  per = np.asarray(bits.count(p, batch_dims=1), np.int64)
  np.testing.assert_array_equal(per, (np.array([0, 1, 2, 10]) * 32 + bits.length_bits(10)))
  assert wire.total_bits(p, batch_dims=1) == int(np.sum(per))


def test_every_single_bit_flip_is_rejected():
  p = _payload(np.random.default_rng(3))
  data = wire.pack(p)
  assert len(data) * 8 >= 1200
  for i in range(len(data) * 8):
    bad = bytearray(data)
    bad[i // 8] ^= 0x80 >> (i % 8)
    with pytest.raises(ValueError, match="corrupted|malformed|layout|codec"):
      wire.unpack(bytes(bad), p)


def test_malformed_bytes():
  p = _payload(np.random.default_rng(1))
  data = wire.pack(p)
  for bad in (data[:-3], data + b"\x00", b"", data[:10], b"XXXX" + data[4:]):
    with pytest.raises(ValueError, match="malformed|corrupted"):
      wire.unpack(bad, p)
  body = wire.pack(p, raw=True)
  for bad in (body[:-3], body + b"\x00"):
    with pytest.raises(ValueError, match="malformed"):
      wire.unpack(bad, p, raw=True)
  # A raw body is not a framed message, and vice versa.
  with pytest.raises(ValueError, match="malformed"):
    wire.unpack(body, p)
  with pytest.raises(ValueError, match="malformed"):
    wire.unpack(data, p, raw=True)
  # Raw bodies have no CRC: a count beyond the capacity or non-zero padding is still caught.
  small = {"v": Field(jnp.ones(5, jnp.uint8), 2, jnp.int32(2))}  # 3 + 4 bits, 1 pad bit
  good = wire.pack(small, raw=True)
  with pytest.raises(ValueError, match="padding"):
    wire.unpack(bytes([good[0] | 1]), small, raw=True)
  with pytest.raises(ValueError, match="exceeds capacity"):
    wire.unpack(bytes([0b11100000]), small, raw=True)  # count 7 > 5
  with pytest.raises(TypeError):
    wire.unpack("not bytes", p)
  with pytest.raises(TypeError, match="Field"):
    wire.unpack(data, {"x": jnp.ones(3)})


def test_codec_argument_validated():
  p = _payload(np.random.default_rng(0))
  for codec in ("", 3, b"qsgd"):
    with pytest.raises(ValueError, match="codec"):
      wire.pack(p, codec=codec)
    with pytest.raises(ValueError, match="codec"):
      wire.unpack(wire.pack(p), p, codec=codec)


def test_values_that_do_not_fit_are_rejected():
  with pytest.raises(ValueError, match="do not fit"):
    wire.pack({"x": Field(jnp.array([0, 9], jnp.int32), 3)})
  with pytest.raises(ValueError, match="width"):
    wire.pack({"x": Field(jnp.ones(3, jnp.float32), 16)})
  with pytest.raises(TypeError, match="Field"):
    bits.count({"x": jnp.ones(3)})


@pytest.mark.parametrize("count", [5, 9, -1, -30])
def test_count_outside_capacity_rejected_by_every_path(count):
  # bits.count, wire.total_bits and wire.pack agree: a count outside [0, 4] is an error.
  f = {"v": Field(jnp.zeros(4, jnp.int8), 5, jnp.int32(count))}
  for fn in (bits.count, wire.total_bits, wire.pack):
    with pytest.raises(ValueError, match=r"outside \[0, 4\]"):
      fn(f)
  batched = {"v": Field(jnp.zeros((2, 4), jnp.int8), 5, jnp.array([1, count], jnp.int32))}
  for fn in (bits.count, wire.total_bits):
    with pytest.raises(ValueError, match=r"outside \[0, 4\]"):
      fn(batched, batch_dims=1)


# ------------------------------------------------------------------ foreign messages

KEYS = Keys(jax.random.key(0), jax.random.key(1))
G = {"w": jnp.linspace(-1.0, 1.0, 60).reshape(6, 10), "b": jnp.linspace(0.5, -2.0, 10)}
CODECS = {
    "identity": compressors.identity,
    "top_k": lambda: compressors.top_k(6),
    "random_k": lambda: compressors.random_k(6),
    "random_k_shared": lambda: compressors.random_k(6, shared_mask=True),
    "qsgd4": lambda: compressors.qsgd(4, bucket_size=16),
    "qsgd5": lambda: compressors.qsgd(5, bucket_size=16),
    "sign_sgd": compressors.sign_sgd,
}


def _messages():
  out = {}
  for name, make in CODECS.items():
    c = make()
    s, _ = c.init(G)
    out[name] = jax.jit(c.encode)(G, s, KEYS)[0]  # one compile: cheaper than eager ops
  return out


def test_other_codecs_messages_are_rejected():
  msgs = _messages()
  same_layout = 0
  for a, pa in msgs.items():
    data, tagged = wire.pack(pa), wire.pack(pa, codec=a)
    wire.unpack(data, pa)
    wire.unpack(tagged, pa, codec=a)
    for b, pb in msgs.items():
      if a == b:
        continue
      with pytest.raises(ValueError):  # tagged: always rejected
        wire.unpack(tagged, pb, codec=b)
      if wire.layout_id(pa) != wire.layout_id(pb):  # untagged: rejected by the layout id
        with pytest.raises(ValueError):
          wire.unpack(data, pb)
      else:
        same_layout += 1
  # random_k / random_k_shared and qsgd(4) / qsgd(5) have equal layouts and lengths: only
  # the codec tag tells them apart.
  assert same_layout >= 4
  assert len(wire.pack(msgs["qsgd4"])) == len(wire.pack(msgs["qsgd5"]))
  with pytest.raises(ValueError, match="codec tag"):
    wire.unpack(wire.pack(msgs["qsgd4"], codec="qsgd4"), msgs["qsgd5"], codec="qsgd5")
  with pytest.raises(ValueError, match="codec tag"):  # tagged, read without a tag
    wire.unpack(wire.pack(msgs["qsgd4"], codec="qsgd4"), msgs["qsgd4"])


@pytest.mark.slow
def test_registry_messages_are_rejected_by_every_other_entry():
  # Every registered compressor's first message, tagged with its entry name, is rejected
  # by every other entry; untagged, by every entry of another layout.
  msgs = {e.name: testing.harness(e).run(1)[0][4] for e in testing.REGISTRY}
  for a, pa in msgs.items():
    data, tagged = wire.pack(pa), wire.pack(pa, codec=a)
    for b, pb in msgs.items():
      if a != b:
        with pytest.raises(ValueError):
          wire.unpack(tagged, pb, codec=b)
        if wire.layout_id(pa) != wire.layout_id(pb):
          with pytest.raises(ValueError):
            wire.unpack(data, pb)


def test_message_of_another_models_shapes_is_rejected():
  # top_k(6) of a 70- and of a 72-parameter model: same fields and widths, other shapes.
  c = compressors.top_k(6)
  p70 = c.encode(G, None, KEYS)[0]
  p72 = c.encode({**G, "b": jnp.ones(12)}, None, KEYS)[0]
  assert len(wire.pack(p70)) == len(wire.pack(p72))
  with pytest.raises(ValueError, match="layout"):
    wire.unpack(wire.pack(p70), p72)


# ------------------------------------------------------------------ memory


def _peak(fn):
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_oversized_blob_rejected_before_allocating():
  p = _payload(np.random.default_rng(0))
  data = wire.pack(p)
  blob = data[:12] + (8 * (1 << 24)).to_bytes(8, "big") + bytes(1 << 24)  # 16 MiB body
  for bad, raw in ((blob, False), (bytes(1 << 24), True)):
    def attempt(bad=bad, raw=raw):
      with pytest.raises(ValueError, match="template needs"):
        wire.unpack(bad, p, raw=raw)
    assert _peak(attempt) < 1 << 20  # far below the blob's size, let alone 8x


def test_pack_and_unpack_memory_bounds():
  # 2^22 float32 values after a 3-bit field (unaligned): 16 MiB out, bounded temporaries.
  n = 1 << 22
  p = {"a": Field(np.zeros(1, np.uint8), 3), "v": Field(np.ones(n, np.float32), 32),
       "q": Field(np.ones(n, np.int8), 5)}
  out_bytes = wire.FRAME_BYTES + -(-wire.total_bits(p) // 8)
  holder = {}
  peak = _peak(lambda: holder.update(data=wire.pack(p)))
  assert len(holder["data"]) == out_bytes
  assert peak <= 2 * out_bytes + wire.TEMP_BYTES, (peak, out_bytes)  # buffer + bytes copy
  data = holder.pop("data")
  field_bytes = n * 4 + n  # the decoded arrays themselves
  peak = _peak(lambda: holder.update(back=wire.unpack(data, p)))
  assert peak <= field_bytes + wire.TEMP_BYTES, (peak, field_bytes)
  np.testing.assert_array_equal(holder["back"]["v"].data, p["v"].data)
