"""optax adapters: as_transformation (lossy channel) and compressed_mean (aggregator)."""

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.experimental import aggregating

from fedjax_compress import (Keys, as_transformation, bits, compressed_mean, compressors,
                             error_feedback, weighted_decode, wire)

WORKERS = 3


def _tree(seed, lead=()):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=lead + (4, 3)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=lead + (3,)), jnp.float32)}


CODECS = {
    "qsgd": lambda: compressors.qsgd(2, bucket_size=4),
    "ef_top_k": lambda: error_feedback(compressors.top_k(3)),
    "ef_power_sgd": lambda: error_feedback(compressors.power_sgd(1)),
    "random_k_shared": lambda: compressors.random_k(4, shared_mask=True),
}


def _state_field(state, name):
  """The (unique) field `name` of a NamedTuple somewhere inside an optax state."""
  found = []

  def visit(x):
    if hasattr(x, "_fields"):
      if name in x._fields:
        found.append(getattr(x, name))
      for v in x:
        visit(v)
    elif isinstance(x, (tuple, list)):
      for v in x:
        visit(v)

  visit(state)
  assert len(found) == 1, found
  return found[0]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_as_transformation_equals_manual_channel(codec, opt):
  """chain(as_transformation(c, key), opt) == manual encode/decode with the split keys + opt."""
  make_opt = {"sgd": lambda: optax.sgd(0.1, momentum=0.9), "adam": lambda: optax.adam(1e-2)}[opt]
  c = CODECS[codec]()
  params = _tree(0)
  tx = optax.chain(as_transformation(c, 7), make_opt())
  state = tx.init(params)
  step = jax.jit(tx.update)
  manual_opt = make_opt()
  m_opt_state = manual_opt.init(params)
  sender, receiver = c.init(params)
  key = jax.random.key(7)
  for t in range(3):
    g = _tree(10 + t)
    out, state = step(g, state, params)
    key, shared, private = jax.random.split(key, 3)
    payload, sender = c.encode(g, sender, Keys(shared, private), params)
    decoded, receiver = c.decode(payload, receiver, Keys(shared, private), params)
    expected, m_opt_state = manual_opt.update(decoded, m_opt_state, params)
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)
    assert int(_state_field(state, "last_bits")) == wire.total_bits(payload)
    params = optax.apply_updates(params, out)


def test_as_transformation_key_override_and_nan():
  c = compressors.random_k(4)
  tx = as_transformation(c, 0)
  g = _tree(1)
  state = tx.init(g)
  a, _ = tx.update(g, state, key=jax.random.key(5))
  b, _ = tx.update(g, tx.init(_tree(2)), key=jax.random.key(5))
  chex.assert_trees_all_equal(a, b)  # the override, not the state's key, decides
  d, _ = tx.update(g, state, key=jax.random.key(6))
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(d)))
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), g)
  with pytest.raises(ValueError, match="NaN or Inf"):
    tx.update(bad, state)


def test_transformation_state_serializes():
  c = error_feedback(compressors.top_k(3))
  tx = optax.chain(as_transformation(c, 3), optax.adam(1e-2))
  params = _tree(0)
  state = tx.init(params)
  for t in range(2):
    _, state = tx.update(_tree(20 + t), state, params)
  restored = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(state))
  chex.assert_trees_all_equal(restored, state)
  a, _ = tx.update(_tree(30), state, params)
  b, _ = tx.update(_tree(30), restored, params)
  chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize("codec", CODECS)
def test_compressed_mean_in_process_equals_worker_loop(codec):
  c = CODECS[codec]()
  params = _tree(0)
  lr = 0.5
  opt = aggregating.process(optax.identity(), compressed_mean(c, 11, num_workers=WORKERS),
                            optax.sgd(lr))
  state = opt.init(params)
  step = jax.jit(opt.update)
  senders = [c.init(params)[0]] * WORKERS
  receivers = [c.init(params)[1]] * WORKERS
  key = jax.random.key(11)
  for t in range(3):
    per_worker = _tree(40 + t, lead=(WORKERS,))
    out, state = step(per_worker, state, params)
    key, shared, private = jax.random.split(key, 3)
    privates = jax.random.split(private, WORKERS)
    decoded, nbits = [], []
    for i in range(WORKERS):
      keys = Keys(shared, privates[i])
      payload, senders[i] = c.encode(jax.tree.map(lambda x: x[i], per_worker), senders[i],
                                     keys, params)
      d, receivers[i] = c.decode(payload, receivers[i], keys, params)
      decoded.append(d)
      nbits.append(int(bits.count(payload)))
    mean = jax.tree.map(lambda *xs: sum(xs) / WORKERS, *decoded)
    chex.assert_trees_all_close(out, jax.tree.map(lambda m: -lr * m, mean), rtol=1e-5,
                                atol=1e-6)
    np.testing.assert_array_equal(_state_field(state, "last_bits"), nbits)


def test_compressed_mean_bad_inputs():
  with pytest.raises(ValueError, match="num_workers"):
    compressed_mean(compressors.identity(), 0, num_workers=0)
  agg = compressed_mean(compressors.identity(), 0, num_workers=WORKERS)
  state = agg.init(_tree(0))
  with pytest.raises(ValueError, match="leading worker axis of 3"):
    agg.update(_tree(1, lead=(2,)), state)
  bad = jax.tree.map(lambda x: x.at[0, 0].set(jnp.inf), _tree(1, lead=(WORKERS,)))
  with pytest.raises(ValueError, match="NaN or Inf"):
    agg.update(bad, state)


def test_compressed_mean_without_params_uses_worker_template():
  agg = compressed_mean(compressors.identity(), 0, num_workers=WORKERS)
  per_worker = _tree(3, lead=(WORKERS,))
  mean, _ = agg.update(per_worker, agg.init(_tree(0)))
  chex.assert_trees_all_close(mean, jax.tree.map(lambda x: x.mean(0), per_worker), rtol=1e-6)


def test_weighted_decode_paths_agree():
  c = compressors.qsgd(3, bucket_size=4)
  like = _tree(0)
  g = _tree(5, lead=(WORKERS,))
  keys = Keys(jax.random.key(0), jax.random.split(jax.random.key(1), WORKERS))
  payloads, _ = jax.vmap(c.encode, in_axes=(0, None, Keys(None, 0)))(g, c.init(like)[0], keys)
  w = jnp.array([0.5, 0.25, 0.25])
  receivers = jax.tree.map(lambda x: jnp.broadcast_to(x, (WORKERS,) + x.shape), c.init(like)[1])
  fast, _ = weighted_decode(c, payloads, receivers, w, keys, like)
  slow, _ = weighted_decode(c._replace(aggregate=None), payloads, receivers, w, keys, like)
  chex.assert_trees_all_close(fast, slow, rtol=1e-5, atol=1e-6)
