"""Client-axis sharding over the 4 fake CPU devices: sharded round == unsharded round."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_compress import compressors, error_feedback, federated


def loss_fn(p, batch, mask, key):
  del key
  logits = batch["x"] @ p["w"] + p["b"][None, :]
  ll = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(ll, batch["y"][:, None], axis=1)[:, 0]
  m = mask.astype(jnp.float32)
  return jnp.sum(m * nll) / jnp.maximum(jnp.sum(m), 1.0)


def test_sharded_round_equals_unsharded():
  assert len(jax.devices()) >= 4
  rng = np.random.default_rng(0)
  c, steps, b, d, k = 8, 2, 4, 6, 3
  up = error_feedback(compressors.top_k(fraction=0.3))
  rnd = jax.jit(federated.build_round(loss_fn, optax.sgd(0.2), optax.adam(0.05), up,
                                      local_steps=steps))
  params = {"w": jnp.zeros((d, k)), "b": jnp.zeros(k)}
  state = federated.init_server_state(params, optax.adam(0.05), up, num_clients=12)
  mesh = federated.client_mesh(4)
  sharded = federated.shard_state(state, mesh)
  assert sharded.senders.residual["w"].sharding.spec[0] == "clients"
  for r in range(2):
    cohort = federated.Cohort(
        ids=rng.permutation(12)[:c].astype(np.int32),
        batches={"x": rng.normal(size=(c, steps, b, d)).astype(np.float32),
                 "y": rng.integers(0, k, (c, steps, b)).astype(np.int32)},
        mask=rng.random((c, steps, b)) < 0.9,
        weight=np.r_[rng.uniform(1, 3, c - 1), 0.0].astype(np.float32))
    sc = federated.shard_cohort(cohort, mesh)
    assert len(sc.batches["x"].sharding.device_set) == 4
    state, m0 = rnd(state, cohort, jax.random.key(r))
    sharded, m1 = rnd(sharded, sc, jax.random.key(r))
  chex.assert_trees_all_close(state.params, sharded.params, atol=1e-6)
  chex.assert_trees_all_close(state.senders, sharded.senders, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(m0.up_bits), np.asarray(m1.up_bits))


def test_shard_cohort_requires_multiple_of_devices():
  mesh = federated.client_mesh(4)
  cohort = federated.Cohort(ids=np.zeros(3, np.int32), batches={"x": np.zeros((3, 1, 2))},
                            mask=np.ones((3, 1, 2), bool), weight=np.ones(3, np.float32))
  with pytest.raises(ValueError, match="pad_to=4"):
    federated.shard_cohort(cohort, mesh)
  with pytest.raises(ValueError, match="num_devices"):
    federated.client_mesh(99)
