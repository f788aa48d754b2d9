"""LAQ / SLAQ: spec ALGORITHMS_M22_HSQ_LAQ.md 3.10 invariants against NumPy float64 references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from fedjax_compress import Keys, bits, compressors as C, wire
from fedjax_compress.compressors._laq import quantize_innovation

M, N, P = 4, 30, 8  # clients, samples per client, features
KEYS = Keys(jax.random.key(0), jax.random.key(1))
LAM = 0.05


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(M, N, P)) / np.sqrt(P)
  w_true = rng.normal(size=P)
  y = np.sign(x @ w_true + 0.3 * rng.normal(size=(M, N)))
  return x, y


def _np_grad(theta, x, y):
  """Gradient of mean_n log(1 + exp(-y x.theta)) + LAM/2 ||theta||^2 (float64)."""
  z = y * (x @ theta)
  return -(x * (y / (1 + np.exp(z)))[:, None]).mean(0) + LAM * theta


def _np_loss(theta, x, y):
  return np.mean([np.mean(np.logaddexp(0, -y[m] * (x[m] @ theta))) for m in range(M)]) \
      + LAM / 2 * theta @ theta


def _jax_grads(theta, x, y):
  def loss(t, xm, ym):
    return jnp.mean(jnp.logaddexp(0.0, -ym * (xm @ t))) + LAM / 2 * t @ t
  return jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(theta, x, y)


def _ref_laq(x, y, rounds, eta, b, ck, memory, t_bar, es, off, fixed_w):
  """Library-form LAQ (spec 3.5) in float64 NumPy; returns losses and the upload mask."""
  levels = 2**b - 1
  theta = np.zeros(P)
  hist = [theta]
  qhat, epshat = np.zeros((M, P)), np.zeros(M)
  clock = np.full(M, t_bar)
  losses, ups = [], np.zeros((rounds, M), bool)
  for k in range(rounds):
    diffs = [np.sum((hist[-1 - d] - hist[-2 - d])**2) for d in range(min(k, memory))]
    w = ck / max(len(diffs), 1) if fixed_w is None else fixed_w
    rhs = w * sum(diffs) / eta**2
    for m in range(M):
      g = _np_grad(theta, x[m], y[m])
      inn = g - qhat[m]
      r = np.abs(inn).max()
      q = np.clip(np.floor((inn + r) / (2 * r / levels) + 0.5), 0, levels) if r > 0 else 0 * inn
      big_q = qhat[m] + q * (2 * r / levels) - r
      eps = np.sum((big_q - g)**2)
      innov = np.sum((big_q - qhat[m])**2)
      send = clock[m] >= t_bar or (innov >= rhs + es * (eps + epshat[m]) + off and r > 0)
      ups[k, m] = send
      if send:
        qhat[m], epshat[m], clock[m] = big_q, eps, 0
      else:
        clock[m] = min(clock[m] + 1, t_bar)
    theta = theta - eta * qhat.mean(0)
    hist.append(theta)
    losses.append(_np_loss(theta, x, y))
  return np.array(losses), ups


def _run(c, x, y, rounds, eta, dtype=jnp.float32):
  """Full-participation FedSGD with the uplink `c`: theta -= eta * mean_m decode_m."""
  theta = {"w": jnp.zeros(P, dtype)}
  s, r = c.init(theta)
  stack = lambda t: jax.tree.map(lambda v: jnp.stack([v] * M), t)  # noqa: E731
  ss, rs = stack(s), stack(r)
  xj, yj = jnp.asarray(x, dtype), jnp.asarray(y, dtype)

  @jax.jit
  def step(theta, ss, rs):
    g = {"w": _jax_grads(theta["w"], xj, yj)}
    ps, ss = jax.vmap(c.encode, in_axes=(0, 0, None, None))(g, ss, KEYS, theta)
    dec, rs = jax.vmap(c.decode, in_axes=(0, 0, None, None))(ps, rs, KEYS, theta)
    theta = jax.tree.map(lambda t, d: t - eta * d.mean(0), theta, dec)
    return theta, ss, rs, ps

  losses, ups, nbits = [], [], 0
  for _ in range(rounds):
    theta, ss, rs, ps = step(theta, ss, rs)
    chex.assert_trees_all_equal(ss.qhat, rs.qhat)  # server copy == client copy (3.10.4)
    losses.append(_np_loss(np.asarray(theta["w"], np.float64), x, y))
    ups.append(np.asarray(ps["radius"].count) > 0)
    nbits += wire.total_bits(ps, batch_dims=1)
  return np.array(losses), np.array(ups), nbits, theta


class QuantizerTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2, 4, 8)
  def test_grid_and_error_bound(self, b):
    rng = np.random.default_rng(b)
    g, qhat = rng.normal(size=200).astype(np.float32), rng.normal(size=200).astype(np.float32)
    r, q, big_q, eps = self.variant(lambda a, c: quantize_innovation(a, c, b))(g, qhat)
    g64, qhat64 = g.astype(np.float64), qhat.astype(np.float64)
    r_ref = np.abs(g64 - qhat64).max()
    np.testing.assert_allclose(r, r_ref, rtol=1e-7)
    q = np.asarray(q, np.int64)
    self.assertTrue(q.min() >= 0 and q.max() <= 2**b - 1)
    self.assertLessEqual(len(np.unique(q)), 2**b)
    tau = 1 / (2**b - 1)
    self.assertLessEqual(np.abs(np.asarray(big_q, np.float64) - g64).max(),
                         tau * r_ref * (1 + 1e-5) + 1e-6)
    big_ref = qhat64 + 2 * tau * r_ref * q - r_ref
    np.testing.assert_allclose(big_q, big_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eps, np.sum((big_ref - g64)**2), rtol=1e-3, atol=1e-7)

  def test_on_grid_is_exact_and_zero_radius(self):
    qhat = jnp.array([0.0, 1.0, -1.0, 0.5])
    g = qhat + jnp.array([1.0, -1.0, 0.0, 1.0])  # innovation on the b=1 grid {-1, +1} ... and 0
    r, q, big_q, eps = quantize_innovation(g[:2], qhat[:2], 1)
    chex.assert_trees_all_equal(big_q, g[:2])
    self.assertEqual(float(eps), 0.0)
    r, q, big_q, eps = quantize_innovation(qhat, qhat, 4)
    self.assertEqual(float(r), 0.0)
    chex.assert_trees_all_equal(big_q, qhat)
    self.assertEqual(float(eps), 0.0)
    chex.assert_tree_all_finite((r, q, big_q, eps))


class LAQTest(chex.TestCase, parameterized.TestCase):

  def test_no_skip_high_precision_is_gradient_descent(self):
    x, y = _data()
    eta, rounds = 1.0, 50
    with jax.enable_x64(True):
      c = C.laq(32, step_size=eta, t_bar=0)
      losses, ups, _, theta = _run(c, x, y, rounds, eta, jnp.float64)
    self.assertTrue(ups.all())
    theta_gd = np.zeros(P)
    gd = []
    for _ in range(rounds):
      theta_gd = theta_gd - eta * np.mean([_np_grad(theta_gd, x[m], y[m]) for m in range(M)], 0)
      gd.append(_np_loss(theta_gd, x, y))
    np.testing.assert_allclose(losses, gd, rtol=1e-9)
    np.testing.assert_allclose(theta["w"], theta_gd, rtol=1e-7, atol=1e-9)

  def test_no_skip_finite_bits_no_error_floor(self):
    x, y = _data(1)
    eta = 1.0
    theta_gd = np.zeros(P)
    for _ in range(2000):
      theta_gd = theta_gd - eta * np.mean([_np_grad(theta_gd, x[m], y[m]) for m in range(M)], 0)
    with jax.enable_x64(True):
      _, _, _, theta = _run(C.laq(3, step_size=eta, t_bar=0), x, y, 300, eta, jnp.float64)
    np.testing.assert_allclose(theta["w"], theta_gd, rtol=1e-8, atol=1e-9)

  @parameterized.named_parameters(
      ("laq", dict(b=4, ck=0.8, memory=10, t_bar=100, es=3.0, off=0.0, fixed_w=None)),
      ("laq_tbar5", dict(b=3, ck=0.8, memory=4, t_bar=5, es=3.0, off=0.0, fixed_w=None)),
      ("slaq", dict(b=3, ck=0.8, memory=9, t_bar=100, es=1.5, off=1e-3, fixed_w=0.08)))
  def test_matches_float64_reference(self, cfg):
    x, y = _data(2)
    eta, rounds = 1.0, 60
    ref_losses, ref_ups = _ref_laq(x, y, rounds, eta, **cfg)
    kw = dict(step_size=eta, ck=cfg["ck"], memory=cfg["memory"], t_bar=cfg["t_bar"],
              error_scale=cfg["es"], offset=cfg["off"])
    with jax.enable_x64(True):
      c = (C.slaq(cfg["b"], **kw) if cfg["fixed_w"] is not None else C.laq(cfg["b"], **kw))
      losses, ups, nbits, _ = _run(c, x, y, rounds, eta, jnp.float64)
    np.testing.assert_array_equal(ups, ref_ups)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-9)
    self.assertLess(ups.sum(), 0.8 * ups.size)  # the rule does skip
    # Bits (3.7 + headers): upload 1 + 64 (float64 R) + b P + hdr; skip 1 + hdr.
    hdr = bits.length_bits(P)
    n_up = int(ups.sum())
    self.assertEqual(nbits, n_up * (1 + 64 + cfg["b"] * P + hdr) + (ups.size - n_up) * (1 + hdr))

  def test_clock_forces_upload_every_t_bar_plus_one(self):
    x, y = _data(3)
    t_bar = 3
    c = C.laq(4, step_size=1.0, t_bar=t_bar, offset=float("inf"))  # rule never fires
    _, ups, _, _ = _run(c, x, y, 12, 1.0)
    expected = np.array([k % (t_bar + 1) == 0 for k in range(12)])
    np.testing.assert_array_equal(ups, np.repeat(expected[:, None], M, axis=1))

  def test_zero_threshold_uploads_iff_innovation_nonzero(self):
    c = C.laq(1, step_size=1.0, ck=0.0, error_scale=0.0, t_bar=50)
    like = {"w": jnp.zeros(2)}
    s, r = c.init(like)
    sent = []
    for g in ([1.0, -1.0], [1.0, -1.0], [3.0, 1.0], [3.0, 1.0]):
      p, s = c.encode({"w": jnp.array(g)}, s, KEYS, like)
      out, r = c.decode(p, r, KEYS, like)
      sent.append(int(p["radius"].count))
      chex.assert_trees_all_equal(out["w"], jnp.array(g))  # on the 1-bit grid: exact
    self.assertEqual(sent, [1, 0, 1, 0])

  def test_federated_simulator_matches_reference(self):
    # LAQ as documented: full participation, local_steps=1, client sgd(1.0) (delta = the
    # gradient), server sgd(eta) on the mean of the decoded updates.
    import optax
    from fedjax_compress import federated
    x, y = _data(5)
    eta, rounds, cfg = 1.0, 30, dict(b=4, ck=0.8, memory=10, t_bar=6, es=3.0, off=0.0,
                                      fixed_w=None)
    ref_losses, ref_ups = _ref_laq(x, y, rounds, eta, **cfg)
    with jax.enable_x64(True):
      c = C.laq(4, step_size=eta, t_bar=6)

      def loss(p, batch, mask, key):
        del mask, key
        t = p["w"]
        return jnp.mean(jnp.logaddexp(0.0, -batch["y"] * (batch["x"] @ t))) + LAM / 2 * t @ t

      server_tx = optax.sgd(eta)
      params = {"w": jnp.zeros(P, jnp.float64)}
      st = federated.init_server_state(params, server_tx, c, num_clients=M)
      rnd = jax.jit(federated.build_round(loss, optax.sgd(1.0), server_tx, c, local_steps=1))
      cohort = federated.Cohort(ids=jnp.arange(M), weight=jnp.ones(M),
                                batches={"x": jnp.asarray(x)[:, None], "y": jnp.asarray(y)[:, None]},
                                mask=jnp.ones((M, 1, N), bool))
      losses, ups = [], []
      for _ in range(rounds):
        st, m = rnd(st, cohort, jax.random.key(0))
        losses.append(_np_loss(np.asarray(st.params["w"]), x, y))
        ups.append(np.asarray(m.up_bits) > 1 + bits.length_bits(P))
        chex.assert_trees_all_equal(st.senders.qhat, st.receivers.qhat)
    np.testing.assert_array_equal(np.array(ups), ref_ups)
    # weighted_decode sums the decoded updates in float32, hence not 1e-10
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-7)
    self.assertLess(ref_ups.sum(), ref_ups.size)

  def test_larger_ck_fewer_uploads(self):
    x, y = _data(4)
    counts = [int(_run(C.laq(4, step_size=1.0, ck=ck), x, y, 40, 1.0)[1].sum())
              for ck in (0.05, 0.8, 5.0)]
    self.assertTrue(counts[0] >= counts[1] >= counts[2], counts)
    self.assertGreater(counts[0], counts[2])

  def test_wire_roundtrip_and_bits(self):
    c = C.laq(5, step_size=0.5)
    g = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([-1.0, 0.25])}
    s, r = c.init(g)
    for t in range(3):
      gt = jax.tree.map(lambda v: v * (1 + 0.01 * t), g)
      p, s = c.encode(gt, s, KEYS, g)
      data = wire.pack(p, raw=True)
      self.assertEqual(len(data), -(-int(bits.count(p)) // 8))
      q = wire.unpack(data, p, raw=True)
      out_p, _ = c.decode(p, r, KEYS, g)
      out_q, r = c.decode(q, r, KEYS, g)
      chex.assert_trees_all_equal(out_p, out_q)
      sent = int(p["radius"].count)
      self.assertEqual(int(bits.count(p)), 1 + 4 + sent * (32 + 5 * 8))

  def test_grad_safe(self):
    c = C.laq(4, step_size=1.0)
    g = {"w": jnp.array([0.3, -0.2, 1.0])}
    s, r = c.init(g)

    def f(v):
      p, _ = c.encode({"w": v}, s, KEYS, g)
      return jnp.sum(c.decode(p, r, KEYS, g)[0]["w"])

    chex.assert_tree_all_finite(jax.grad(f)(g["w"]))

  def test_validation(self):
    for kwargs in (dict(bits=0), dict(bits=33), dict(step_size=0.0), dict(t_bar=-1),
                   dict(memory=0), dict(ck=-1.0)):
      args = dict(bits=4, step_size=1.0)
      args.update(kwargs)
      with self.assertRaises(ValueError):
        C.laq(**args)
    with self.assertRaises(ValueError):
      C.laq(30, step_size=1.0).init({"w": jnp.zeros(3)})  # > 24 bits needs float64


if __name__ == "__main__":
  pytest.main([__file__])
