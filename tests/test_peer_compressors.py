"""The peers' compressors (issue 14) against float64 NumPy references and their invariants.

Conformance (honest bits == packed bytes, jit/vmap, bad inputs, unbiasedness where claimed)
comes from the registry; here each codec's arithmetic is recomputed in NumPy from the same
randomness (rotation signs from `keys.shared`, dithers from `hash_uniform(keys.private)`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from fedjax_compress import Keys, bits, compressors as C
from fedjax_compress.compressors import _peers, _rotated
from fedjax_compress.compressors._quantize import hash_uniform

KEYS = Keys(jax.random.key(3), jax.random.key(4))


def _vec(n, seed=0, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), (n,), jnp.float32)


def _roundtrip(c, g, keys=KEYS):
  """One jitted message: `(payload, decoded)`."""
  sender, receiver = c.init(g)
  p, _ = jax.jit(c.encode)(g, sender, keys)
  return p, jax.jit(c.decode)(p, receiver, keys, g)[0]


def _np_blocks(x, block):
  nb, b = _rotated.block_shape(x.size, block)
  xb = np.zeros(nb * b)
  xb[:x.size] = x
  return xb.reshape(nb, b), nb, b


def _np_rotation(key, nb, b):
  """Per-block `R = H diag(s) / sqrt(B)` in float64, signs as the codec draws them."""
  s = np.asarray(jax.random.rademacher(key, (nb, b), jnp.float32), np.float64)
  h = scipy.linalg.hadamard(b).astype(np.float64) / math.sqrt(b)
  return [h * s[i][None, :] for i in range(nb)]


# --------------------------------------------------------------------- rotations


def test_rotation_is_orthogonal_and_matches_numpy():
  x = np.asarray(_vec(3 * 64, 1)).reshape(3, 64)
  got = np.asarray(_rotated.rotate(jnp.asarray(x), KEYS.shared))
  rs = _np_rotation(KEYS.shared, 3, 64)
  ref = np.stack([r @ xi for r, xi in zip(rs, x.astype(np.float64))])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rs[0].T @ rs[0], np.eye(64), atol=1e-12)
  back = np.asarray(_rotated.unrotate(jnp.asarray(got), KEYS.shared))
  np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


def test_block_shape_pads_only_the_last_block():
  assert _rotated.block_shape(126, 2**16) == (1, 128)
  assert _rotated.block_shape(1000, 256) == (4, 256)
  assert _rotated.block_shape(0, 64) == (0, 1)


def _np_drive(x, key, block, scale):
  xb, nb, b = _np_blocks(x.astype(np.float64), block)
  out = []
  for r_mat, xi in zip(_np_rotation(key, nb, b), xb):
    r = r_mat @ xi
    sign = np.where(r >= 0, 1.0, -1.0)
    l1 = np.abs(r).sum()
    s = (xi @ xi / l1 if scale == "unbiased" else l1 / b) if l1 > 0 else 0.0
    out.append(s * r_mat.T @ sign)
  return np.concatenate(out)[:x.size]


@pytest.mark.parametrize("scale", ["mse", "unbiased"])
def test_drive_matches_numpy(scale):
  g = {"w": _vec(300, 2)}
  p, d = _roundtrip(C.drive(scale=scale, block_size=128), g)
  ref = _np_drive(np.asarray(g["w"]), KEYS.shared, 128, scale)
  np.testing.assert_allclose(np.asarray(d["w"]), ref, rtol=1e-4, atol=1e-5)
  assert int(bits.count(p)) == 3 * (128 + 32)


def test_drive_scales_unbiased_inner_product_and_mse_optimal():
  x = np.asarray(_vec(256, 5), np.float64)
  g = {"w": jnp.asarray(x, jnp.float32)}
  _, du = _roundtrip(C.drive(scale="unbiased"), g)
  np.testing.assert_allclose(x @ np.asarray(du["w"], np.float64), x @ x, rtol=1e-5)
  _, dm = _roundtrip(C.drive(scale="mse"), g)
  dm = np.asarray(dm["w"], np.float64)
  err = np.sum((x - dm) ** 2)
  for f in (0.9, 1.1):  # same signs, another scale: never better
    assert err < np.sum((x - f * dm) ** 2)


def test_gaussian_lloyd_max_levels():
  c1, _ = _rotated.gaussian_lloyd_max(1)
  np.testing.assert_allclose(c1, [-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], rtol=1e-9)
  c2, t2 = _rotated.gaussian_lloyd_max(2)  # Max (1960): 0.4528, 1.5104, threshold 0.9816
  np.testing.assert_allclose(c2, [-1.5104, -0.4528, 0.4528, 1.5104], atol=2e-4)
  np.testing.assert_allclose(t2, [-0.9816, 0.0, 0.9816], atol=2e-4)


def _np_eden(x, key, block, nbits, scale):
  cents, bounds = _rotated.gaussian_lloyd_max(nbits)
  xb, nb, b = _np_blocks(x.astype(np.float64), block)
  out = []
  for r_mat, xi in zip(_np_rotation(key, nb, b), xb):
    r = r_mat @ xi
    z = r * math.sqrt(b) / np.linalg.norm(r)
    c = cents[np.searchsorted(bounds, z)]
    s = (r @ r) / (r @ c) if scale == "unbiased" else (r @ c) / (c @ c)
    out.append(s * r_mat.T @ c)
  return np.concatenate(out)[:x.size]


@pytest.mark.parametrize("nbits,scale", [(2, "unbiased"), (3, "mse")])
def test_eden_matches_numpy(nbits, scale):
  g = {"w": _vec(200, 7)}
  p, d = _roundtrip(C.eden(nbits, scale=scale, block_size=64), g)
  ref = _np_eden(np.asarray(g["w"]), KEYS.shared, 64, nbits, scale)
  np.testing.assert_allclose(np.asarray(d["w"]), ref, rtol=1e-4, atol=1e-5)
  assert int(bits.count(p)) == 4 * (nbits * 64 + 32)


def test_eden_one_bit_is_unbiased_drive_and_error_falls_with_bits():
  g = {"w": _vec(512, 8)}
  _, e1 = _roundtrip(C.eden(1), g)
  _, dr = _roundtrip(C.drive(scale="unbiased"), g)
  np.testing.assert_allclose(np.asarray(e1["w"]), np.asarray(dr["w"]), rtol=1e-5, atol=1e-6)
  errs = [float(jnp.sum((_roundtrip(C.eden(b, scale="mse"), g)[1]["w"] - g["w"]) ** 2))
          for b in (1, 4)]
  assert errs[0] > 10 * errs[1]  # 1 bit: ~0.36 ||x||^2; 4 bits: ~0.01 ||x||^2


def _np_rotated_uniform(x, keys, block, levels):
  xb, nb, b = _np_blocks(x.astype(np.float64), block)
  u = np.asarray(hash_uniform(keys.private, (nb, b)), np.float64)
  out = []
  for r_mat, xi, ui in zip(_np_rotation(keys.shared, nb, b), xb, u):
    r = r_mat @ xi
    lo, hi = r.min(), r.max()
    t = (r - lo) / (hi - lo) * (levels - 1)
    q = np.floor(t) + (ui < t - np.floor(t))
    out.append(r_mat.T @ (lo + q * (hi - lo) / (levels - 1)))
  return np.concatenate(out)[:x.size]


def test_rotated_uniform_matches_numpy():
  g = {"w": _vec(100, 9)}
  p, d = _roundtrip(C.rotated_uniform(8, block_size=32), g)
  ref = _np_rotated_uniform(np.asarray(g["w"]), KEYS, 32, 8)
  np.testing.assert_allclose(np.asarray(d["w"]), ref, rtol=1e-4, atol=1e-4)
  assert int(bits.count(p)) == 4 * (3 * 32 + 64)


def test_per_tensor_pads_each_tensor_like_fedjax():
  g = {"a": _vec(100, 1), "b": jnp.ones((3, 3))}
  p, d = _roundtrip(C.rotated_uniform(256, per_tensor=True), g)
  assert int(bits.count(p)) == 8 * (128 + 16) + 64 * 2
  p, _ = _roundtrip(C.drive(per_tensor=True), g)
  assert int(bits.count(p)) == (128 + 32) + (16 + 32)


def test_rotated_aggregate_sums_in_rotated_domain():
  c = C.eden(2, block_size=64)
  gs = [{"w": _vec(150, s)} for s in range(3)]
  w = jnp.asarray([0.2, 0.5, 0.3])
  ps, ds = zip(*[_roundtrip(c, g) for g in gs])
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *ps)
  keys = Keys(KEYS.shared, jnp.stack([KEYS.private] * 3))
  got = jax.jit(c.aggregate)(stacked, w, keys, gs[0])
  ref = sum(float(wi) * np.asarray(d["w"], np.float64) for wi, d in zip(w, ds))
  np.testing.assert_allclose(np.asarray(got["w"]), ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------- TernGrad


def test_trit_packing_roundtrip():
  rng = np.random.default_rng(0)
  for n in (0, 1, 5, 13, 200):
    t = rng.integers(0, 3, n)
    codes = np.asarray(_peers.pack_trits(jnp.asarray(t)))
    assert codes.shape == (-(-n // 5),) and codes.max(initial=0) < 243
    ref = [sum(int(v) * 3**j for j, v in enumerate(t[i:i + 5])) for i in range(0, n, 5)]
    np.testing.assert_array_equal(codes, ref)
    np.testing.assert_array_equal(np.asarray(_peers.unpack_trits(jnp.asarray(codes), n)), t)


@pytest.mark.parametrize("clip", [2.5, None])
def test_terngrad_matches_numpy(clip):
  x = np.asarray(_vec(37, 11), np.float64)
  x[3] = 9.0  # an outlier that the 2.5-sigma clip cuts
  g = {"w": jnp.asarray(x, jnp.float32)}
  p, d = _roundtrip(C.terngrad(clip=clip), g)
  v = x.copy()
  if clip is not None:
    bound = clip * v.std()
    v = np.where(np.abs(v) > bound, bound * np.sign(v), v)
  s = np.abs(v).max()
  u = np.asarray(hash_uniform(jax.random.fold_in(KEYS.private, 0), (37,)), np.float64)
  ref = s * np.sign(v) * (u < np.abs(v) / s)
  np.testing.assert_allclose(np.asarray(d["w"]), ref, rtol=1e-5, atol=1e-6)
  assert int(bits.count(p)) == 8 * 8 + 32  # ceil(37 / 5) bytes + the scale


# ------------------------------------------------------------ natural compression


def test_natural_compression_matches_numpy_and_is_9_bits():
  x = np.concatenate([np.asarray(_vec(60, 12), np.float64), [0.0, -0.0, 1.0, -0.75, 3e-39,
                                                             2.0**-130]])
  g = {"w": jnp.asarray(x, jnp.float32)}
  p, d = _roundtrip(C.natural_compression(), g)
  x32 = x.astype(np.float32)
  e = np.floor(np.log2(np.where(x32 != 0, np.abs(x32), 1.0).astype(np.float64)))
  lower = np.where(e < -126, 0.0, 2.0 ** np.maximum(e, -126))  # subnormals: 0 or 2^-126
  upper = np.where(e < -126, 2.0**-126, 2.0 ** (e + 1))
  p_up = (np.abs(x32) - lower) / (upper - lower)
  r = np.floor(np.asarray(hash_uniform(KEYS.private, (x.size,)), np.float64) * 2**23)
  up = r < np.round(p_up * 2**23)
  ref = np.where(x32 == 0, 0.0, np.sign(x32) * np.where(up, upper, lower))
  np.testing.assert_array_equal(np.asarray(d["w"], np.float64), ref)
  assert int(bits.count(p)) == 9 * x.size


def _np_natural_dithering(x, keys, s, bucket):
  n = x.size
  nb = -(-n // bucket)
  xb = np.zeros(nb * bucket)
  xb[:n] = x
  xb = xb.reshape(nb, bucket)
  u = np.asarray(hash_uniform(keys.private, (nb, bucket)), np.float64)
  levels = np.concatenate([[0.0], 2.0 ** (np.arange(1, s + 1) - s)])
  out = np.zeros_like(xb)
  for i in range(nb):
    nrm = np.linalg.norm(xb[i])
    r = np.abs(xb[i]) / nrm
    j = np.clip(np.searchsorted(levels, r, side="right") - 1, 0, s)
    hi = levels[np.minimum(j + 1, s)]
    p = np.where(hi > levels[j], (r - levels[j]) / np.where(hi > levels[j], hi - levels[j], 1), 0)
    k = j + (u[i] < p)
    out[i] = nrm * np.sign(xb[i]) * levels[k]
  return out.reshape(-1)[:n]


def test_natural_dithering_matches_numpy():
  x = np.asarray(_vec(150, 13), np.float64)
  g = {"w": jnp.asarray(x, jnp.float32)}
  p, d = _roundtrip(C.natural_dithering(5, bucket_size=64), g)
  ref = _np_natural_dithering(x, KEYS, 5, 64)
  np.testing.assert_allclose(np.asarray(d["w"]), ref, rtol=1e-5, atol=1e-6)
  assert int(bits.count(p)) == 32 * 3 + 150 * (math.ceil(math.log2(6)) + 1)
  # decoded magnitudes are norm * powers of two
  r = np.abs(np.asarray(d["w"], np.float64))[:64] / np.linalg.norm(x[:64])
  nz = r[r > 0]
  np.testing.assert_allclose(np.log2(nz), np.round(np.log2(nz)), atol=1e-5)


# ------------------------------------------------------------------------ casting


def test_cast_float16_rounds_to_nearest_and_saturates():
  x = np.array([0.1, -3.14159, 1e-8, 7e4, -1e6, 65504.0], np.float32)
  p, d = _roundtrip(C.cast("float16"), {"w": jnp.asarray(x)})
  ref = np.clip(x, -65504, 65504).astype(np.float16).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(d["w"]), ref)
  assert int(bits.count(p)) == 16 * 6


def test_cast_bfloat16_and_scaled_float8_errors():
  x = np.asarray(_vec(500, 14, scale=1e-3), np.float64)
  _, d = _roundtrip(C.cast("bfloat16"), {"w": jnp.asarray(x, jnp.float32)})
  assert np.max(np.abs(np.asarray(d["w"], np.float64) - x) / np.abs(x)) <= 2.0**-8
  p, d = _roundtrip(C.cast("float8_e4m3fn"), {"w": jnp.asarray(x, jnp.float32)})
  err = np.abs(np.asarray(d["w"], np.float64) - x)
  # 3 mantissa bits: relative error <= 2^-4 above the smallest normal (2^-6 of 448, scaled)
  normal = np.abs(x) >= 2.0**-6 * np.abs(x).max() / 448
  assert np.all(err[normal] <= 2.0**-4 * np.abs(x[normal]) * 1.0001)
  assert int(bits.count(p)) == 8 * 500 + 32
  _, d = _roundtrip(C.cast("float8_e4m3fn", scaled=False), {"w": jnp.asarray(x, jnp.float32)})
  assert np.mean(np.asarray(d["w"]) == 0) > 0.5  # unscaled fp8 flushes small updates


# ---------------------------------------------------------------------- threshold


def test_threshold_matches_numpy_and_bits():
  x = np.asarray(_vec(200, 15), np.float64)
  g = {"w": jnp.asarray(x, jnp.float32)}
  p, d = _roundtrip(C.threshold(1.2), g)
  keep = np.abs(x.astype(np.float32)) > 1.2
  np.testing.assert_array_equal(np.asarray(d["w"]), np.where(keep, x.astype(np.float32), 0))
  c = int(keep.sum())
  assert int(bits.count(p)) == c * (32 + 8) + 2 * 8
  p, d = _roundtrip(C.threshold(100.0), g)  # nothing passes: only the two count headers
  assert int(bits.count(p)) == 16 and not np.any(np.asarray(d["w"]))


# ---------------------------------------------------------------------------- DGC


def test_dgc_matches_numpy_over_steps():
  n, frac, m = 50, 0.1, 0.9
  c = C.dgc(frac, momentum=m)
  sender, receiver = c.init({"w": jnp.zeros(n)})
  encode, decode = jax.jit(c.encode), jax.jit(c.decode)
  u = np.zeros(n)
  v = np.zeros(n)
  k = math.ceil(frac * n)
  sent_total = np.zeros(n)
  for t in range(4):
    g = np.asarray(_vec(n, 20 + t), np.float64)
    p, sender = encode({"w": jnp.asarray(g, jnp.float32)}, sender, KEYS)
    d, _ = decode(p, receiver, KEYS, {"w": jnp.zeros(n)})
    u = m * u + g
    v = v + u
    idx = np.sort(np.argsort(-np.abs(v), kind="stable")[:k])
    ref = np.zeros(n)
    ref[idx] = v[idx]
    np.testing.assert_allclose(np.asarray(d["w"]), ref, rtol=1e-5, atol=1e-5)
    v[idx] = 0
    u[idx] = 0
    sent_total += ref
    inner = sender  # flattened: the DgcState of the raveled model
    np.testing.assert_allclose(np.asarray(inner.accumulated), v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(inner.momentum), u, rtol=1e-5, atol=1e-5)
    assert int(bits.count(p)) == k * (32 + 6)


def test_dgc_without_masking_conserves_the_velocity():
  """Without masking nothing is lost: sent + accumulated == sum_t u_t."""
  n = 40
  c = C.dgc(0.05, momentum=0.5, masking=False)
  sender, _ = c.init({"w": jnp.zeros(n)})
  encode, decode = jax.jit(c.encode), jax.jit(c.decode)
  total_u = np.zeros(n)
  u = np.zeros(n)
  sent = np.zeros(n)
  for t in range(5):
    g = np.asarray(_vec(n, 40 + t), np.float64)
    p, sender = encode({"w": jnp.asarray(g, jnp.float32)}, sender, KEYS)
    sent += np.asarray(decode(p, None, KEYS, {"w": jnp.zeros(n)})[0]["w"])
    u = 0.5 * u + g
    total_u += u
  np.testing.assert_allclose(sent + np.asarray(sender.accumulated), total_u, rtol=1e-4,
                             atol=1e-4)


def test_bad_arguments_raise_naming_them():
  for make, name in [(lambda: C.drive(block_size=100), "block_size"),
                     (lambda: C.drive(scale="l1"), "scale"),
                     (lambda: C.eden(9), "bits"),
                     (lambda: C.rotated_uniform(1), "levels"),
                     (lambda: C.terngrad(clip=0.0), "clip"),
                     (lambda: C.natural_dithering(0), "levels"),
                     (lambda: C.cast("int4"), "dtype"),
                     (lambda: C.threshold(-1.0), "tau"),
                     (lambda: C.dgc(0.0), "fraction"),
                     (lambda: C.dgc(0.1, momentum=1.0), "momentum")]:
    with pytest.raises(ValueError, match=name):
      make()
