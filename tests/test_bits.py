"""Exact bit accounting at any size: `Bits` limbs vs Python ints, abstract 70M/124M messages, rounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_compress import Field, as_transformation, bits, compressors, federated, wire
from fedjax_compress.bits import Bits

GPT2_SMALL = 124_439_808  # parameters of GPT-2 small (the IGC paper's model)
D70M = 70_000_000


def _sds(n, dtype=jnp.float32):
  return jax.ShapeDtypeStruct((n,), dtype)


def test_times_and_add_are_exact_against_python_ints():
  rng = np.random.default_rng(0)
  counts = np.concatenate([rng.integers(0, 2**31, 500), [0, 1, 2**24 - 1, 2**24, 2**31 - 1]])
  for width in (1, 3, 7, 8, 31, 32, 33, 63, 64):
    got = jax.jit(lambda c: Bits.times(c, width))(jnp.asarray(counts, jnp.int32))
    assert got.tolist() == [int(c) * width for c in counts]
    assert np.all(np.asarray(got.lo) < 2**30) and np.all(np.asarray(got.lo) >= 0)
  a, b = Bits.times(jnp.asarray(counts[:50], jnp.int32), 64), Bits.const(3 * 2**40 + 5)
  assert (a + b).tolist() == [int(c) * 64 + 3 * 2**40 + 5 for c in counts[:50]]
  assert Bits.where(jnp.arange(50) % 2 == 0, a, 0).tolist() == [
      int(c) * 64 if i % 2 == 0 else 0 for i, c in enumerate(counts[:50])]
  with pytest.raises(ValueError, match="2\\^61"):
    Bits.const(2**61)


@pytest.mark.parametrize("num", [D70M, GPT2_SMALL])
def test_abstract_messages_past_int32_are_exact(num):
  # Dense float32 model, two halves, and a variable field near capacity: no 2^31 cap.
  dense = {"a": Field(_sds(num // 2), 32), "b": Field(_sds(num - num // 2), 32)}
  assert int(bits.count(dense)) == 32 * num == wire.total_bits(dense)
  var = Field(jax.ShapeDtypeStruct((num,), jnp.float32), 32, jnp.int32(num - 7))
  assert int(bits.count(var)) == 32 * (num - 7) + bits.length_bits(num) == wire.total_bits(var)
  # The same through abstract evaluation of an encoder (no concrete 124M arrays): fixed-size
  # fields cost static Python ints, so the count of an abstract payload is concrete.
  c = compressors.identity()
  payload = jax.eval_shape(lambda u: c.encode(u, c.init(u)[0], _keys())[0], {"w": _sds(num)})
  assert int(bits.count(payload)) == 32 * num == wire.total_bits(payload)


def _keys():
  from fedjax_compress import Keys
  return Keys(jax.random.key(0), jax.random.key(1))


def test_count_range_agrees_with_pack():
  f = Field(jnp.zeros(4, jnp.int8), 5, jnp.int32(5))  # count > capacity
  with pytest.raises(ValueError, match="outside \\[0, 4\\]"):
    bits.count(f)
  with pytest.raises(ValueError):
    wire.pack(f)
  with pytest.raises(ValueError, match="outside"):
    bits.count(Field(jnp.zeros(4, jnp.int8), 5, jnp.int32(-3)))
  # Under jit the count cannot be checked: it is clipped to the capacity.
  clipped = jax.jit(lambda c: bits.count(Field(jnp.zeros(4, jnp.int8), 5, c)))
  assert int(clipped(jnp.int32(9))) == 4 * 5 + 3 and int(clipped(jnp.int32(-2))) == 3


def _loss(p, batch, mask, key):
  del key
  return jnp.sum(mask * batch["x"]) * (p["a"][0] + p["b"][0])


def test_round_bills_a_70m_parameter_model_exactly():
  # Concrete: 2 clients upload the dense 70M-parameter delta and download the dense model.
  half = D70M // 2
  params = {"a": jnp.zeros((half,), jnp.float32), "b": jnp.zeros((D70M - half,), jnp.float32)}
  up = compressors.identity()
  rnd = jax.jit(federated.build_round(_loss, optax.sgd(0.1), optax.sgd(1.0), up, local_steps=1,
                                      clients_per_chunk=1))
  state = federated.init_server_state(params, optax.sgd(1.0), up, num_clients=2)
  cohort = federated.Cohort(ids=np.arange(2, dtype=np.int32), batches={"x": np.ones((2, 1, 1))},
                            mask=np.ones((2, 1, 1), bool), weight=np.ones(2, np.float32))
  _, m = rnd(state, cohort, jax.random.key(0))
  assert m.up_bits.tolist() == [32 * D70M] * 2 == m.down_bits.tolist()
  assert m.up_bits.sum() == 64 * D70M > 2**32


def test_round_and_adapters_bill_past_int32_abstractly():
  # The round's metrics hold exact limbs: at 124.4M params the dense broadcast is a constant.
  params = {"a": _sds(GPT2_SMALL // 2), "b": _sds(GPT2_SMALL - GPT2_SMALL // 2)}
  up = compressors.sign_sgd()
  rnd = federated.build_round(_loss, optax.sgd(0.1), optax.sgd(1.0), up, local_steps=1)
  cohort = federated.Cohort(ids=np.arange(2, dtype=np.int32), batches={"x": np.ones((2, 1, 1))},
                            mask=np.ones((2, 1, 1), bool), weight=np.ones(2, np.float32))

  def run(p):
    state = federated.init_server_state(p, optax.sgd(1.0), up, num_clients=2)
    return rnd(state, cohort, jax.random.key(0))[1]

  m = jax.eval_shape(run, params)
  assert isinstance(m.up_bits, Bits) and m.up_bits.lo.shape == (2,)
  tx = as_transformation(compressors.identity(), 0)
  st = jax.eval_shape(lambda p: tx.update(p, tx.init(p))[1], params)
  assert isinstance(st.last_bits, Bits)


def test_small_round_bits_and_host_sums():
  p = {"w": jnp.zeros(3)}
  up = compressors.identity()
  rnd = jax.jit(federated.build_round(lambda p, b, m, k: jnp.sum(p["w"]) * jnp.sum(m),
                                      optax.sgd(0.1), optax.sgd(1.0), up, local_steps=1))
  state = federated.init_server_state(p, optax.sgd(1.0), up, num_clients=3)
  cohort = federated.Cohort(ids=np.arange(3, dtype=np.int32), batches={"x": np.ones((3, 1, 2))},
                            mask=np.ones((3, 1, 2), bool),
                            weight=np.array([1.0, 0.0, 2.0], np.float32))
  _, m = rnd(state, cohort, jax.random.key(0))
  assert m.up_bits.tolist() == [96, 0, 96]
  np.testing.assert_array_equal(np.asarray(m.down_bits, np.int64), [96, 0, 96])
  assert int(m.up_bits[2]) == 96 and m.down_bits.sum() == 192
