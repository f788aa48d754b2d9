"""Uncompressed baseline (FedAvg / FedSGD): every element at its own dtype's width."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src import checks, layout
from fedjax_compress._src.base import Compressor, EmptyState, Field, stateless_init

_WHAT = "identity decode: `like` vs the payload (the encoded updates)"


def identity() -> Compressor:
  """Send updates as they are: `bits = sum_leaves size * dtype_bits`.

  >>> import jax.numpy as jnp, jax
  >>> from fedjax_compress import compressors, Keys, bits
  >>> c = compressors.identity()
  >>> p, _ = c.encode({'w': jnp.ones(3)}, None, Keys(jax.random.key(0), jax.random.key(1)))
  >>> int(bits.count(p))
  96
  """

  def encode_fn(updates, state, keys, params=None):
    del keys, params
    checks.check_finite(updates)
    return jax.tree.map(lambda x: Field(x, np.dtype(x.dtype).itemsize * 8), updates), state

  def decode_fn(payload, state, keys, like):
    del keys
    layout.check_matches(like, layout.signature(payload), _WHAT)
    leaves = jax.tree.leaves(payload, is_leaf=lambda x: isinstance(x, Field))
    return jax.tree.unflatten(jax.tree.structure(like),
                              [f.data.astype(l.dtype) for f, l in
                               zip(leaves, jax.tree.leaves(like))]), state

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    layout.check_matches(like, layout.signature(payloads, batch_dims=1), _WHAT)
    leaves = jax.tree.leaves(payloads, is_leaf=lambda x: isinstance(x, Field))
    out = [jnp.tensordot(weights.astype(jnp.float32), f.data.astype(jnp.float32),
                         axes=1).astype(l.dtype)
           for f, l in zip(leaves, jax.tree.leaves(like))]
    return jax.tree.unflatten(jax.tree.structure(like), out)

  return Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn)


__all__ = ["identity"]
