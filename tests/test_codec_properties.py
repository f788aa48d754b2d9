"""Bad-input properties of every registered compressor (issue 13), driven by REGISTRY.

Each (entry, check) pair runs one of `testing.BAD_INPUT_CHECKS`: finite inputs up to 1e38
give finite outputs; float16/bfloat16 updates near 6e4 decode finite; NaN/Inf under jit
propagate; empty leaves and trees cost 0 bits; mismatched decode templates and malformed
keys raise `ValueError`. A new registry entry is checked automatically. Cost control: the
checks reuse each entry's cached jitted round trip (`testing.harness`) and otherwise run
eagerly on the tiny test model, except the low-precision check (one compile per entry).
"""

import jax
import jax.numpy as jnp
import pytest

from fedjax_compress import compressors, testing
from fedjax_compress.testing import BAD_INPUT_CHECKS, REGISTRY, harness

# Run by default (the codecs issue 13 names); every other entry runs under `-m slow`
# (the whole matrix takes ~15 min on 2 busy cores, mostly compiles and eager m22/hsq).
FAST = {"qsgd", "sign_sgd", "sign_sgd_scaled", "random_k", "ef_top_k", "power_sgd",
        "lbgm_top_k"}


def _cases():
  for e in REGISTRY:
    for name in BAD_INPUT_CHECKS:
      marks = [] if e.name in FAST else [pytest.mark.slow]
      yield pytest.param(e, name, id=f"{e.name}-{name}", marks=marks)


@pytest.mark.parametrize("entry, check", list(_cases()))
def test_bad_input_property(entry, check):
  BAD_INPUT_CHECKS[check](harness(entry))


def test_fast_entries_registered():
  assert FAST <= {e.name for e in REGISTRY}


@pytest.mark.parametrize("name", ["m22", "ef_power_sgd", "igc_k_subspace_downlink"])
def test_named_codecs_stay_finite_on_huge_inputs(name):
  """Issue 13's overflow list beyond FAST (slow in the matrix), jitted on a small model: two
  messages at max|x| = 1e19 and 1e38 decode finite with finite payloads."""
  from fedjax_compress import bits
  # m22 quantizing every leaf with a short Lloyd design (the registry's compiles ~2x longer).
  c = (compressors.m22(min_layer_size=1, lloyd_iters=5) if name == "m22"
       else {e.name: e for e in REGISTRY}[name].make())
  like = {"w": jnp.zeros((8, 6), jnp.float32), "b": jnp.zeros((6,), jnp.float32)}
  step = jax.jit(lambda g, s, r, k: testing.roundtrip(c, g, s, r, k))
  for peak in (1e19, 1e38):
    sender, receiver = c.init(like)
    for t in range(2):
      g = testing.scaled_like(like, t, peak)
      decoded, sender, receiver, payload = step(g, sender, receiver, testing.message_keys(0, t))
      for x in jax.tree.leaves((decoded, [f.data for f in bits.fields(payload)])):
        assert bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))), (name, peak, t)


def test_igc_empty_models_and_bad_keys():
  """IGC (slow in the matrix), eagerly: `{}` / `float32[0]` models send 0 bits and decode to
  themselves, `d <= D` still holds for D > 0, round-keyed maps reject non-`Keys` keys."""
  from fedjax_compress import EmptyState, Keys, bits
  C = compressors
  for c in (C.intrinsic_static(4), C.intrinsic_time_varying(4),
            C.intrinsic_k_subspace(4, 2, schedule="cyclic"), C.intrinsic_static_downlink(4)):
    for tree in ({}, {"e": jnp.zeros((0,), jnp.float32)}):
      sender, receiver = c.init(tree)
      decoded, sender, _, payload = testing.roundtrip(c, tree, sender, receiver,
                                                      testing.message_keys(0, 0), tree)
      assert int(bits.count(payload)) == 0, (c, tree)
      testing.assert_same_avals(decoded, tree, "decoded empty model")
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
      c.init({"w": jnp.zeros((3,), jnp.float32)})
  g = {"w": jnp.ones((3, 5), jnp.float32)}
  keys = testing.message_keys(0, 0)
  # The keys are checked before any map is built: an abstract payload suffices (both stamp
  # the updates' signature on a float32[d] field), and no eager map is generated.
  payload = jax.eval_shape(C.intrinsic_time_varying(4).encode, g, EmptyState(), keys)[0]
  for c in (C.intrinsic_k_subspace(4, 2), C.intrinsic_time_varying(4)):
    sender, receiver = c.init(g)
    for bad in (None, (keys.shared, keys.private), Keys(0, 1)):
      with pytest.raises(ValueError, match="keys"):
        c.encode(g, sender, bad)
      with pytest.raises(ValueError, match="keys"):
        c.decode(payload, receiver, bad, g)


# --- the checks have power: each rejects a codec that breaks its property ---


def _squared_norm_codec():
  """Sends `x / ||x||` and `||x||` computed the naive way (overflows at 1e19)."""
  from fedjax_compress import Field
  from fedjax_compress._src.base import stateless_init

  def encode_fn(updates, state, keys, params=None):
    out = {}
    for k, x in updates.items():
      n = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))
      out[k] = {"n": Field(n.reshape(1), 32),
                "u": Field(x.astype(jnp.float32) / jnp.where(n > 0, n, 1.0), 32)}
    return out, state

  def decode_fn(payload, state, keys, like):
    return {k: (m["u"].data * m["n"].data[0]).astype(like[k].dtype)
            for k, m in payload.items()}, state

  return testing.Harness(compressors.identity()._replace(
      init=stateless_init, encode=encode_fn, decode=decode_fn, aggregate=None))


def test_huge_check_rejects_naive_norms():
  with pytest.raises(AssertionError, match="non-finite output"):
    testing.check_huge_finite(_squared_norm_codec())


def test_low_precision_check_rejects_unsaturated_cast():
  c = compressors.random_k(fraction=0.25, sampling="uniform")
  # Undo the saturation: scale in the template dtype (float16 overflows at 4 x 6e4).
  def decode_fn(payload, state, keys, like):
    out, state = c.decode(payload, state, keys, like)
    return jax.tree.map(lambda o: o * jnp.asarray(2.0, o.dtype), out), state
  with pytest.raises(AssertionError, match="non-finite output"):
    testing.check_low_precision(testing.Harness(c._replace(decode=decode_fn)))


def test_nonfinite_check_rejects_sign_without_flag():
  c = compressors.sign_sgd()

  def decode_fn(payload, state, keys, like):  # ignore the finite flag: NaN -> -1
    return jax.tree.map(
        lambda m, l: jnp.where(m["sign"].data, 1.0, -1.0).astype(l.dtype),
        payload, like, is_leaf=lambda x: isinstance(x, dict) and "sign" in x), state

  with pytest.raises(AssertionError, match="decoded to finite"):
    testing.check_nonfinite_propagates(testing.Harness(c._replace(decode=decode_fn)))


def test_template_and_keys_checks_reject_lax_codecs():
  c = compressors.identity()
  lax = c._replace(decode=lambda p, s, k, like: (
      jax.tree.map(lambda f: f.data, p, is_leaf=lambda x: hasattr(x, "width")), s))
  with pytest.raises(AssertionError, match="template"):
    testing.check_rejects_bad_template(testing.Harness(lax))
  careless = c._replace(encode=lambda u, s, k, p=None: (c.encode(u, s, k)[0], (k.shared, s)[1]))
  with pytest.raises(AssertionError, match="raised AttributeError"):
    testing.check_bad_keys(testing.Harness(careless))


def test_empty_check_rejects_bits_for_empty_leaves():
  from fedjax_compress import Field
  c = compressors.identity()
  padded = c._replace(encode=lambda u, s, k, p=None: (
      jax.tree.map(lambda x: Field(jnp.zeros((max(x.size, 1),), x.dtype), 32), u), s),
      decode=lambda p, s, k, like: (jax.tree.map(jnp.zeros_like, like), s), aggregate=None)
  with pytest.raises(AssertionError):
    testing.check_empty(testing.Harness(padded))
