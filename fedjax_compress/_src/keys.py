"""Key derivation: every message's randomness from (seed, round, client), no carried state.

`round_keys(seed, round, ids)` = `Keys(shared=fold_in(r, SHARED), private=fold_in(fold_in(r,
PRIVATE), id))` with `r = fold_in(fold_in(seed, purpose), round)`. Deterministic under
partial participation and on resume, and derivable by client and server, so seeds cost 0 bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_compress._src.base import Keys, PRNGKey

UPLINK = 0
DOWNLINK = 1
LOCAL_TRAINING = 2
SAMPLING = 3
AGGREGATE = 4  # purpose tag of the private key of a reduced (server-side) payload
_SHARED = 0
_PRIVATE = 1


def as_key(key: PRNGKey | int) -> PRNGKey:
  """Accept an int seed, a typed key or raw uint32 key data; return a typed key."""
  if isinstance(key, int):
    return jax.random.key(key)
  key = jnp.asarray(key) if not hasattr(key, "dtype") else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def purpose_key(seed_key: PRNGKey, purpose: int, round_index: jax.typing.ArrayLike) -> PRNGKey:
  """Key of one purpose (uplink, downlink, training, ...) in one round."""
  return jax.random.fold_in(jax.random.fold_in(as_key(seed_key), purpose), round_index)


def round_keys(seed_key: PRNGKey, round_index: jax.typing.ArrayLike,
               client_ids: jax.Array, purpose: int = UPLINK) -> Keys:
  """`Keys` for the messages of `client_ids` in a round; `private` has a leading client axis."""
  r = purpose_key(seed_key, purpose, round_index)
  shared = jax.random.fold_in(r, _SHARED)
  priv_root = jax.random.fold_in(r, _PRIVATE)
  private = jax.vmap(lambda i: jax.random.fold_in(priv_root, i))(jnp.asarray(client_ids))
  return Keys(shared=shared, private=private)


def split_keys(key: PRNGKey) -> tuple[PRNGKey, Keys]:
  """Split one key into a carried key and the `Keys` of one message."""
  carry, shared, private = jax.random.split(key, 3)
  return carry, Keys(shared=shared, private=private)


def fold_keys(keys: Keys | None, index: int) -> Keys | None:
  """Both keys of `keys` folded with `index` (per-tensor sub-messages); None stays None."""
  if keys is None:
    return None
  return Keys(jax.random.fold_in(keys.shared, index), jax.random.fold_in(keys.private, index))
