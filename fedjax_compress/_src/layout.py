"""Static flatten/unflatten of parameter pytrees for global (whole-model) compressors."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def ravel(tree: Any, dtype=jnp.float32) -> jax.Array:
  """Concatenate all leaves (pytree order) into one vector of `dtype`."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((0,), dtype)
  return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def unraveler(like: Any) -> Callable[[jax.Array], Any]:
  """Function mapping a flat vector back to `like`'s structure, shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(like)
  shapes = [np.shape(x) for x in leaves]
  dtypes = [x.dtype for x in leaves]
  sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  offsets = np.cumsum([0] + sizes)

  def unravel_fn(vec: jax.Array) -> Any:
    parts = [vec[o:o + n].reshape(s).astype(d)
             for o, n, s, d in zip(offsets[:-1], sizes, shapes, dtypes)]
    return jax.tree.unflatten(treedef, parts)

  return unravel_fn


def num_params(tree: Any) -> int:
  """Total number of elements over all leaves (static)."""
  return int(sum(np.size(x) if not hasattr(x, "shape") else
                 int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree)))


def zeros_like_f32(tree: Any) -> Any:
  """float32 zeros with `tree`'s structure and shapes."""
  return jax.tree.map(lambda x: jnp.zeros(np.shape(x), jnp.float32), tree)
