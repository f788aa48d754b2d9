"""Conformance of every registered compressor (fedjax_compress.testing.REGISTRY).

Families only add `Entry`s to the registry; these checks pick them up. Jitted wrappers are
cached per entry (`testing.harness`), so each entry compiles a handful of small programs.

Cost control: every entry gets, by default, the checks built on its one jitted round trip
(bits == bytes, wire round trip, decode from bytes, avals with a bf16 leaf, state
stability, max bits, zero and NaN inputs, unbiasedness, losslessness). The checks that
compile or run a program of their own (eager == jit, vmap == loop, aggregate, optax + grad)
run by default on `SAMPLE`, a cross-family sample, and on every entry with `-m slow`.
"""

import chex
import jax
import jax.numpy as jnp
import pytest
from absl.testing import parameterized

from fedjax_compress import Compressor, EmptyState, Field, compressors, testing
from fedjax_compress._src.base import stateless_init
from fedjax_compress.testing import REGISTRY, harness


SAMPLE = ("identity", "random_k_shared", "qsgd", "ef_top_k", "count_sketch_1row",
          "ef_power_sgd", "lbgm_top_k", "laq", "igc_static", "hsq")


def _params(entries, sample_only=False):
  return [pytest.param(e, id=e.name, marks=(
      [pytest.mark.slow] if sample_only and e.name not in SAMPLE else [])) for e in entries]


ALL = _params(REGISTRY)
HEAVY = _params(REGISTRY, sample_only=True)
UNBIASED = _params([e for e in REGISTRY if e.unbiased])
LOSSLESS = _params([e for e in REGISTRY if e.lossless])
BOUNDED = _params([e for e in REGISTRY if e.max_bits_fraction is not None])
AGGREGATING = _params([e for e in REGISTRY if e.make().aggregate is not None], True)


class CodecJitTest(chex.TestCase):
  """Jitted: honest bits, wire round trip, decode from the unpacked bytes."""

  @chex.variants(with_jit=True)
  @parameterized.named_parameters((e.name, e.name) for e in REGISTRY)
  def test_codec(self, name):
    testing.check_codec(harness(testing.by_name(name)), transform=self.variant)


class CodecEagerTest(chex.TestCase):
  """Eager == jit, and the same wire checks on the eager payloads (sample)."""

  @chex.variants(without_jit=True)
  @parameterized.named_parameters((e.name, e.name) for e in REGISTRY if e.name in SAMPLE)
  def test_codec(self, name):
    testing.check_codec(harness(testing.by_name(name)), transform=self.variant)


@pytest.mark.slow
class CodecEagerSlowTest(chex.TestCase):
  """Eager == jit for the entries outside the sample."""

  @chex.variants(without_jit=True)
  @parameterized.named_parameters((e.name, e.name) for e in REGISTRY if e.name not in SAMPLE)
  def test_codec(self, name):
    testing.check_codec(harness(testing.by_name(name)), transform=self.variant)


def test_registry_names_unique_and_sample_registered():
  names = [e.name for e in REGISTRY]
  assert len(names) == len(set(names))
  assert set(SAMPLE) <= set(names)


@pytest.mark.parametrize("entry", HEAVY)
def test_vmap_matches_loop(entry):
  testing.check_vmap_matches_loop(harness(entry))


@pytest.mark.parametrize("entry", ALL)
def test_structure_and_dtypes_with_bf16_leaf(entry):
  testing.check_structure_and_dtypes(harness(entry))


@pytest.mark.parametrize("entry", ALL)
def test_state_stable_and_stateful_as_declared(entry):
  testing.check_state(harness(entry), entry.stateful)


@pytest.mark.parametrize("entry", BOUNDED)
def test_max_bits(entry):
  testing.check_max_bits(harness(entry), entry.max_bits_fraction)


@pytest.mark.parametrize("entry", UNBIASED)
def test_unbiased(entry):
  testing.check_unbiased(harness(entry))


@pytest.mark.parametrize("entry", LOSSLESS)
def test_lossless(entry):
  testing.check_lossless(harness(entry))


@pytest.mark.parametrize("entry", AGGREGATING)
def test_aggregate(entry):
  testing.check_aggregate(harness(entry), linear=entry.linear_aggregate)


REDUCING = _params([e for e in REGISTRY if e.make().reduce is not None])


@pytest.mark.parametrize("entry", REDUCING)
def test_reduce(entry):
  testing.check_reduce(harness(entry), linear=entry.linear_aggregate)


@pytest.mark.parametrize("entry", ALL)
def test_zero_input_finite(entry):
  testing.check_zero_input(harness(entry))


@pytest.mark.parametrize("entry", ALL)
def test_nonfinite_input_raises(entry):
  testing.check_rejects_nonfinite(harness(entry))


@pytest.mark.parametrize("entry", HEAVY)
def test_optax_transformation_and_grad_under_jit(entry):
  testing.check_optax_transformation(harness(entry))


# --- the checks have power: they reject compressors that break the contract ---


def test_unbiased_check_rejects_biased():
  with pytest.raises(AssertionError, match="biased"):
    testing.check_unbiased(harness(testing.by_name("sign_sgd_scaled")))


def test_lossless_check_rejects_lossy():
  with pytest.raises(AssertionError):
    testing.check_lossless(harness(testing.by_name("top_k")))


def test_state_check_rejects_wrong_declaration():
  with pytest.raises(AssertionError, match="declared stateful"):
    testing.check_state(harness(testing.by_name("identity")), stateful=True)
  with pytest.raises(AssertionError, match="declared stateful"):
    testing.check_state(harness(testing.by_name("ef_top_k")), stateful=False)


def test_max_bits_check_rejects_dense():
  with pytest.raises(AssertionError, match="bits >"):
    testing.check_max_bits(harness(testing.by_name("identity")), 0.5)


def _halving() -> Compressor:
  """A deliberately broken codec: no finiteness check, decode halves, aggregate doubles."""

  def encode_fn(updates, state, keys, params=None):
    del keys, params
    return jax.tree.map(lambda x: Field(x, x.dtype.itemsize * 8), updates), state

  def decode_fn(payload, state, keys, like):
    del keys
    return jax.tree.map(lambda f, l: (0.5 * f.data).astype(l.dtype), payload, like,
                        is_leaf=lambda x: isinstance(x, Field)), state

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    return jax.tree.map(lambda f, l: jnp.tensordot(weights, f.data.astype(jnp.float32),
                                                   axes=1).astype(l.dtype),
                        payloads, like, is_leaf=lambda x: isinstance(x, Field))

  return Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn)


def test_checks_reject_broken_codec():
  h = testing.Harness(_halving())
  with pytest.raises(AssertionError):
    testing.check_rejects_nonfinite(h)
  with pytest.raises(AssertionError):
    testing.check_aggregate(h)
  with pytest.raises(AssertionError, match="biased"):
    testing.check_unbiased(h, num_samples=10)
  testing.check_bits_and_wire(h)  # its bits are honest, though
  assert h.init() == (EmptyState(), EmptyState())


def test_wire_check_rejects_dishonest_width():
  c = compressors.identity()
  liar = c._replace(encode=lambda u, s, k, p=None: (
      jax.tree.map(lambda x: Field(x, 16), u), s))
  with pytest.raises(ValueError, match="width"):
    testing.check_bits_and_wire(testing.Harness(liar))
