"""Key derivation: round_keys is deterministic, and ids, rounds and purposes are independent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import Keys, round_keys
from fedjax_compress._src import keys as K


def _data(key):
  return np.asarray(jax.random.key_data(key))


def _rows(keys):
  return {tuple(r) for r in _data(keys).reshape(-1, _data(keys).shape[-1])}


def test_deterministic_and_accepts_seed_forms():
  a = round_keys(3, 5, jnp.arange(4))
  b = round_keys(jax.random.key(3), 5, jnp.arange(4))
  c = round_keys(jax.random.key_data(jax.random.key(3)), 5, jnp.arange(4))
  for other in (b, c):
    np.testing.assert_array_equal(_data(a.shared), _data(other.shared))
    np.testing.assert_array_equal(_data(a.private), _data(other.private))
  assert isinstance(a, Keys) and a.private.shape == (4,) and a.shared.shape == ()


def test_private_key_depends_only_on_id_not_cohort():
  """A client's key is the same whoever else is sampled (partial participation)."""
  a = round_keys(0, 2, jnp.array([7, 1, 4]))
  b = round_keys(0, 2, jnp.array([4, 9]))
  np.testing.assert_array_equal(_data(a.private[2]), _data(b.private[0]))
  np.testing.assert_array_equal(_data(a.shared), _data(b.shared))


def test_ids_rounds_purposes_give_distinct_keys():
  ids = jnp.arange(64)
  keys = [round_keys(0, r, ids, purpose=p) for r in range(4)
          for p in (K.UPLINK, K.DOWNLINK, K.LOCAL_TRAINING, K.SAMPLING)]
  rows = set()
  for k in keys:
    rows |= _rows(k.private) | _rows(k.shared[None])
  assert len(rows) == len(keys) * 65  # no collision among 16 x (64 private + 1 shared)
  other_seed = round_keys(1, 0, ids)
  assert not (_rows(other_seed.private) & _rows(keys[0].private))


def test_draws_look_independent_across_ids_and_rounds():
  """Uniforms drawn from different clients' / rounds' keys are uncorrelated (5 sigma)."""
  n = 4096
  k0 = round_keys(0, 0, jnp.arange(2))
  k1 = round_keys(0, 1, jnp.arange(1))
  u = [jax.random.uniform(k, (n,)) - 0.5 for k in (k0.private[0], k0.private[1], k1.private[0],
                                                     k0.shared)]
  for i in range(len(u)):
    for j in range(i + 1, len(u)):
      corr = float(jnp.mean(u[i] * u[j]) / jnp.sqrt(jnp.mean(u[i]**2) * jnp.mean(u[j]**2)))
      assert abs(corr) < 5 / np.sqrt(n), (i, j, corr)


def test_round_keys_under_jit_and_traced_round():
  fn = jax.jit(lambda r, ids: round_keys(jax.random.key(0), r, ids))
  a, b = fn(3, jnp.arange(3)), round_keys(0, 3, jnp.arange(3))
  np.testing.assert_array_equal(_data(a.private), _data(b.private))


def test_split_keys_and_as_key():
  carry, keys = K.split_keys(jax.random.key(0))
  assert len({tuple(_data(k)) for k in (carry, keys.shared, keys.private)}) == 3
  with pytest.raises(TypeError, match="key"):
    K.as_key(jnp.zeros(3, jnp.uint32))  # raw key data must end in the impl's key shape
