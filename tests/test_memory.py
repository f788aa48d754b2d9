"""federated.check_memory: XLA memory analysis before any work; peak memory grows with the chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_compress import compressors, federated
from fedjax_compress.federated import _memory


def test_estimate_counts_arguments_outputs_and_donation():
  x = jax.ShapeDtypeStruct((256, 64), jnp.float32)
  est = _memory.estimate_memory(lambda a: a + 1.0, x, limit_bytes=1 << 30)
  assert est.argument_bytes == 256 * 64 * 4 and est.output_bytes == 256 * 64 * 4
  donated = _memory.estimate_memory(lambda a: a + 1.0, x, donate_argnums=(0,), limit_bytes=1 << 30)
  assert donated.alias_bytes == 256 * 64 * 4
  assert donated.need_bytes == est.need_bytes - 256 * 64 * 4


def test_check_memory_raises_with_figures_before_running():
  calls = []

  def fn(a):
    calls.append(1)  # traced once by the compile, never executed
    return a @ a.T

  with pytest.raises(_memory.InsufficientMemoryError, match="clients_per_chunk"):
    _memory.check_memory(fn, jax.ShapeDtypeStruct((4096, 4096), jnp.float32),
                         limit_bytes=32 << 20)
  with pytest.raises(ValueError, match="fraction"):
    _memory.check_memory(fn, jnp.zeros((2, 2)), fraction=0.0)
  est = _memory.check_memory(fn, jnp.zeros((8, 8)), limit_bytes=1 << 30)
  assert est.need_bytes >= 8 * 8 * 4 * 2


def test_device_limit_known_on_cpu():
  limit = _memory.device_memory_limit()
  assert limit is None or limit > 1 << 28


def _round_inputs(cohort_size, chunk, dim=1 << 16):
  """A model with D = dim + 8 parameters but 8-feature data: client temporaries scale with D."""
  def loss(p, b, m, k):
    fit = jnp.sum(m * (b["x"] @ p["v"] - b["y"]) ** 2) / jnp.sum(m)
    return fit + 1e-3 * jnp.sum(p["w"] ** 2)

  params = {"w": jnp.ones((dim,)), "v": jnp.zeros((8,))}
  c = compressors.identity()
  rnd = federated.build_round(loss, optax.sgd(0.1), optax.sgd(1.0), c, local_steps=2,
                              clients_per_chunk=chunk)
  st = federated.init_server_state(params, optax.sgd(1.0), c, num_clients=cohort_size)
  cohort = federated.Cohort(ids=jnp.arange(cohort_size), weight=jnp.ones(cohort_size),
                            batches={"x": jnp.ones((cohort_size, 2, 4, 8)),
                                     "y": jnp.ones((cohort_size, 2, 4))},
                            mask=jnp.ones((cohort_size, 2, 4), bool))
  return rnd, st, cohort


def test_round_temporaries_grow_with_chunk_not_cohort():
  """Temporaries of an 8-client round: one client per chunk needs a fraction of all-at-once."""
  temps = {}
  for chunk in (1, "all"):
    rnd, st, cohort = _round_inputs(8, chunk)
    temps[chunk] = federated.check_memory(rnd, st, cohort, jax.random.key(0),
                                           limit_bytes=1 << 40).temp_bytes
  assert temps["all"] > 4 * temps[1]
