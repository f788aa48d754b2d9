"""Wire format: bytes == bits, round trips, malformed input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import Field, bits, wire


def _payload(rng):
  return {
      "f32": Field(jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), 32),
      "bf16": Field(jnp.asarray(rng.normal(size=7), jnp.bfloat16), 16),
      "i5": Field(jnp.asarray(rng.integers(-16, 16, size=11), jnp.int8), 5),
      "u3": Field(jnp.asarray(rng.integers(0, 8, size=9), jnp.uint32), 3),
      "flag": Field(jnp.asarray(rng.integers(0, 2, size=4), bool), 1),
      "var": Field(jnp.asarray(rng.normal(size=10), jnp.float32), 32, jnp.int32(6)),
  }


@pytest.mark.parametrize("seed", range(5))
def test_roundtrip_and_length(seed):
  p = _payload(np.random.default_rng(seed))
  data = wire.pack(p)
  expected_bits = 15 * 32 + 7 * 16 + 11 * 5 + 9 * 3 + 4 + (6 * 32 + bits.length_bits(10))
  assert wire.total_bits(p) == expected_bits == int(bits.count(p))
  assert len(data) == -(-expected_bits // 8)
  q = wire.unpack(data, p)
  for k in p:
    a, b = np.asarray(p[k].data), np.asarray(q[k].data)
    if p[k].count is None:
      np.testing.assert_array_equal(a, b)
    else:
      n = int(p[k].count)
      np.testing.assert_array_equal(a.ravel()[:n], b.ravel()[:n])
      assert not np.any(b.ravel()[n:])
      assert int(q[k].count) == n


def test_template_from_eval_shape():
  p = _payload(np.random.default_rng(0))
  tmpl = jax.eval_shape(lambda x: x, p)
  assert wire.pack(wire.unpack(wire.pack(p), tmpl)) == wire.pack(p)


def test_batched_total_bits_sums_messages():
  p = {"v": Field(jnp.ones((4, 10)), 32, jnp.array([0, 1, 2, 10], jnp.int32))}
  per = bits.count(p, batch_dims=1)
  np.testing.assert_array_equal(per, (np.array([0, 1, 2, 10]) * 32 + bits.length_bits(10)))
  assert wire.total_bits(p, batch_dims=1) == int(np.sum(per))


def test_malformed_bytes():
  p = _payload(np.random.default_rng(1))
  data = wire.pack(p)
  with pytest.raises(ValueError, match="malformed"):
    wire.unpack(data[:-3], p)
  with pytest.raises(ValueError, match="malformed"):
    wire.unpack(data + b"\x00", p)
  with pytest.raises(TypeError):
    wire.unpack("not bytes", p)


def test_values_that_do_not_fit_are_rejected():
  with pytest.raises(ValueError, match="do not fit"):
    wire.pack({"x": Field(jnp.array([0, 9], jnp.int32), 3)})
  with pytest.raises(ValueError, match="width"):
    wire.pack({"x": Field(jnp.ones(3, jnp.float32), 16)})
  with pytest.raises(TypeError, match="Field"):
    bits.count({"x": jnp.ones(3)})


def test_int32_overflow_guard():
  big = jax.ShapeDtypeStruct((2**26 + 1,), jnp.float32)
  with pytest.raises(ValueError, match="int32"):
    jax.eval_shape(lambda x: bits.count(Field(x, 32)), big)
