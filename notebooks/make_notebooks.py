"""Generate the per-family notebooks (committed without outputs).

  python notebooks/make_notebooks.py          # writes notebooks/<name>.ipynb

Each notebook is small enough to execute in CI (tests/test_family_notebooks.py) and ends its
plots with `assert` cells, so a change in a compressor's behaviour fails the notebook.
"""

from __future__ import annotations

import pathlib
import textwrap

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

SETUP = """\
import os, sys
try:
  import fedjax_compress  # installed with `pip install -e .`
except ImportError:  # running from a source checkout
  sys.path.insert(0, os.path.abspath('..'))
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from fedjax_compress import Keys, bits, compressors as C
"""


def md(text):
  return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text):
  return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())


# ----------------------------------------------------------------------------- Fastfood / IGC

FASTFOOD = [
    md("""
    # Fastfood projections and intrinsic gradient compression (IGC)

    IGC uploads `c = V^T g` (d numbers) for a model of D parameters and the server applies
    `V c`, where `V: R^d -> R^D` is a Fastfood map `V z = c R_D H G P H B E_d z`
    regenerated from a key (it costs 0 bits and is never materialized). This notebook checks
    the properties the method relies on: columns of `V` are ~unit norm and nearly orthogonal
    (so `||V z|| ~ ||z||`), `fastfood_transpose` is the exact adjoint, and
    `E[V V^T] ~ (d/D) I` (the decoded update is a shrunk, unbiased-in-direction estimate).
    """),
    code(SETUP + textwrap.dedent("""
    from fedjax_compress import ops
    d, D = 16, 200           # L = next_pow2(D) = 256
    NUM_MAPS = 200
    """)),
    md("""
    ## Norm preservation

    For a fixed `z` and many independent maps, the histogram of `||V z|| / ||z||`
    concentrates around 1: `E||Vz||^2 = sum_i ||v_i||^2 z_i^2 ~ ||z||^2` because each column
    `v_i` has squared norm `D/L`-corrected to ~1.
    """),
    code("""
    # materialize V (columns V e_i) for many maps; small enough to hold [maps, D, d] in memory
    def dense_v(k):
      p = ops.fastfood_params(k, d, D)
      return jax.vmap(lambda e: ops.fastfood_project(p, e), out_axes=1)(jnp.eye(d))  # [D, d]
    vs = jax.jit(jax.vmap(dense_v))(jax.random.split(jax.random.key(0), NUM_MAPS))
    z = jax.random.normal(jax.random.key(1), (d,))
    ratio = np.asarray(jnp.linalg.norm(vs @ z, axis=1) / jnp.linalg.norm(z))
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(ratio, bins=30)
    ax.axvline(1.0, color='k', ls='--')
    ax.set_xlabel('||V z|| / ||z||'); ax.set_ylabel('maps'); plt.show()
    print(f'mean {ratio.mean():.4f}  std {ratio.std():.4f}  min {ratio.min():.3f}  max {ratio.max():.3f}')
    """),
    code("""
    assert abs(ratio.mean() - 1) < 0.1, ratio.mean()
    assert np.quantile(np.abs(ratio - 1), 0.9) < 0.25
    assert np.allclose(jnp.linalg.norm(vs, axis=1), 1, atol=0.3)   # ~unit-norm columns
    """),
    md("""
    ## Adjoint identity

    `fastfood_transpose(p, y)` must equal `V^T y` exactly: `<V z, y> = <z, V^T y>` for all
    `z, y`, here checked for several (z, y) pairs and blocked maps (`block_rows`).
    """),
    code("""
    import functools
    @functools.partial(jax.jit, static_argnums=0)
    def both_sides(block_rows, key, zz, yy):
      p = ops.fastfood_params(key, d, D, block_rows=block_rows)
      return (jnp.vdot(ops.fastfood_project(p, zz), yy), jnp.vdot(zz, ops.fastfood_transpose(p, yy)))

    rows = []
    for block_rows in (None, 100):
      for i in range(3):
        kz, ky = jax.random.split(jax.random.key(10 + i))
        zz, yy = jax.random.normal(kz, (d,)), jax.random.normal(ky, (D,))
        lhs, rhs = map(float, both_sides(block_rows, jax.random.key(3 + i), zz, yy))
        rows.append((block_rows, lhs, rhs, abs(lhs - rhs) / max(abs(lhs), 1e-6)))
    for r in rows:
      print('block_rows=%-5s <Vz,y>=% .6f  <z,V^T y>=% .6f  rel.err=%.1e' % r)
    assert max(r[3] for r in rows) < 1e-4
    """),
    md("""
    ## `E[V V^T] ~ (d/D) I`

    With the materialized maps of the first section, average `V V^T` over the maps: the
    diagonal sits at `d/D` (`trace(V V^T) = sum_i ||v_i||^2 ~ d`) and off-diagonal entries
    average out. This is why IGC's decoded update is shrunk by `d/D` and learning rates must
    be re-tuned.
    """),
    code("""
    mean_vvt = np.asarray(jnp.einsum('kij,klj->il', vs, vs) / NUM_MAPS)   # same maps as above
    d2, D2, n2 = d, D, NUM_MAPS
    diag, off = np.diag(mean_vvt), mean_vvt[~np.eye(D2, dtype=bool)]
    fig, axs = plt.subplots(1, 2, figsize=(9, 3.5))
    im = axs[0].imshow(mean_vvt, cmap='RdBu_r', vmin=-2 * d2 / D2, vmax=2 * d2 / D2)
    axs[0].set_title(f'mean of V V^T over {n2} maps'); fig.colorbar(im, ax=axs[0])
    axs[1].hist(off, bins=50, alpha=0.7, label='off-diagonal')
    axs[1].hist(diag, bins=20, alpha=0.7, label='diagonal')
    axs[1].axvline(d2 / D2, color='k', ls='--', label='d/D'); axs[1].legend(); plt.show()
    print(f'd/D = {d2 / D2:.4f}; mean diagonal {diag.mean():.4f}; max |off-diagonal| {np.abs(off).max():.4f}')
    """),
    code("""
    assert abs(diag.mean() - d2 / D2) < 0.05 * d2 / D2
    assert np.abs(off).mean() < 0.25 * d2 / D2
    """),
    md("""
    ## IGC variants: bits and training

    All variants upload `32 d` bits per client per round. They differ downstream:
    static sends `z_t` (`32 d`), K-subspace `32 min(K d, D)`, time-varying the dense model
    (`32 D`), because a fresh map every round changes every coordinate. A tiny federated run
    (logistic regression, synthetic data; the server learning rate scaled by `D/d` to undo
    the shrinkage) shows that both variants learn with `d/D` of the dense uplink.
    """),
    code("""
    import optax
    from fedjax_compress import data, federated, models
    ROUNDS = int(os.environ.get('FAMILY_NB_ROUNDS', 15))
    fd = data.synthetic(0.5, 0.5, num_clients=10, samples_per_client=50, seed=0)
    model = models.LogisticRegression(fd.num_classes)
    loss_fn = models.classification_loss(model)
    params0 = models.init_params(model, fd.clients[0]['x'][:1])
    num_params = sum(x.size for x in jax.tree.leaves(params0))
    dd = 64

    def train(uplink, server_lr):
      tx = optax.sgd(server_lr)
      state = federated.init_server_state(params0, tx, uplink, num_clients=fd.num_clients)
      rnd = jax.jit(federated.build_round(loss_fn, optax.sgd(0.1), tx, uplink, local_steps=2))
      up, loss = 0, []
      for r in range(ROUNDS):
        cohort = federated.sample_cohort(fd, r, cohort_size=5, local_steps=2, batch_size=20)
        state, m = rnd(state, cohort, jax.random.key(0))
        up += int(np.asarray(m.up_bits, np.int64).sum())
        loss.append(float(np.sum(np.asarray(m.loss) * np.asarray(m.weight))))
      return up, loss

    # IGC's decoded update is shrunk by ~d/D: the server learning rate is scaled back up.
    boost = num_params / dd
    runs = {'IGC static': (C.intrinsic_static(dd, seed=0), boost, 'static'),
            'IGC time-varying': (C.intrinsic_time_varying(dd), boost, 'time_varying')}
    res = {}
    for name, (c, lr, variant) in runs.items():
      up, loss = train(c, lr)
      down = C.intrinsic_downlink_bits(variant, dd, num_params)
      res[name] = (up, down, loss)
      print(f'{name:18s} uplink {up:>9,d} bits  downlink/client/round {down:>7,d}  '
            f'loss {loss[0]:.3f} -> {loss[-1]:.3f}')
    print(f'uncompressed float32 would send {ROUNDS * 5 * 32 * num_params:,d} bits up '
          f'({num_params} parameters, d = {dd})')
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, (_, _, loss) in res.items():
      ax.plot(loss, label=name)
    ax.set_xlabel('round'); ax.set_ylabel('train loss'); ax.legend(); plt.show()
    """),
    code("""
    up_id = ROUNDS * 5 * 32 * num_params   # identity: 32 bits per parameter per message
    for name in ('IGC static', 'IGC time-varying'):
      up, down, loss = res[name]
      assert up == ROUNDS * 5 * 32 * dd, up           # exactly 32 d bits per client message
      assert up < up_id / 5
      assert loss[-1] < loss[0]                        # it still learns
    assert res['IGC static'][1] == 32 * dd and res['IGC time-varying'][1] == 32 * num_params
    """),
]

# ----------------------------------------------------------------------------- M22

M22 = [
    md("""
    # M22: fitted weighted Lloyd-Max quantization

    M22 z-scores the kept (top-k) gradient entries, fits a generalized normal
    `f(z) = b / (2 a Gamma(1/b)) exp(-(|z|/a)^b)` or a double Weibull
    `f(z) = c / (2a) (|z|/a)^(c-1) exp(-(|z|/a)^c)` by profile MLE, then designs `2^R`
    levels minimising the *M-magnitude weighted* distortion `E[|z|^M (z - Q(z))^2]` by
    Lloyd iterations: `c_j = int_cell |z|^M z f / int_cell |z|^M f`, midpoint thresholds.
    """),
    code(SETUP + textwrap.dedent("""
    from jax.scipy import special as jsp
    from fedjax_compress.compressors import _m22
    """)),
    md("""
    ## A gradient and the fitted densities

    The gradient of a small MLP on synthetic data (top 60% of entries by magnitude, as M22
    keeps by default) is heavy-tailed: the GenNorm shape `b` fits below 2 (Gaussian) and the
    fitted densities follow the histogram of the z-scores better than a Gaussian.
    """),
    code("""
    from fedjax_compress import data, models
    fd = data.synthetic(1.0, 1.0, num_clients=4, samples_per_client=200, seed=0)
    model = models.MLP(fd.num_classes, hidden=(64,))
    params = models.init_params(model, fd.clients[0]['x'][:1])
    loss_fn = models.classification_loss(model)
    batch = {k: jnp.asarray(v) for k, v in fd.clients[0].items()}
    mask = jnp.ones(batch['y'].shape, bool)
    grad = jax.grad(loss_fn)(params, batch, mask, jax.random.key(0))
    g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grad)])
    g = g[np.argsort(-np.abs(g))[:int(0.6 * g.size)]]   # the kept top-60%
    z = (g - g.mean()) / g.std()
    fits = {fam: _m22.fit(g, fam) for fam in ('gennorm', 'weibull')}

    def pdf(fam, shape, scale, x):
      t = np.abs(x) / scale
      if fam == 'gennorm':
        return shape / (2 * scale * np.exp(jsp.gammaln(1 / shape))) * np.exp(-t**shape)
      return shape / (2 * scale) * np.maximum(t, 1e-12)**(shape - 1) * np.exp(-t**shape)

    xs = np.linspace(-5, 5, 801)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(z, bins=120, range=(-5, 5), density=True, alpha=0.4, label=f'z-scored gradient (n={z.size})')
    for fam, (mu, sd, shape, scale) in fits.items():
      ax.plot(xs, pdf(fam, float(shape), float(scale), xs), label=f'{fam}: shape {float(shape):.2f}, scale {float(scale):.2f}')
    ax.plot(xs, np.exp(-xs**2 / 2) / np.sqrt(2 * np.pi), 'k:', label='N(0,1)')
    ax.set_yscale('log'); ax.set_ylim(1e-4, 20)   # log scale: tails and the peak at 0 both visible
    ax.set_xlabel('z'); ax.legend(fontsize=7); plt.show()
    """),
    code("""
    def loglik(fam, shape, scale):
      return float(np.mean(np.log(pdf(fam, shape, scale, z) + 1e-300)))
    ll = {fam: loglik(fam, float(f[2]), float(f[3])) for fam, f in fits.items()}
    ll_normal = float(np.mean(-z**2 / 2 - 0.5 * np.log(2 * np.pi)))
    print('mean log-likelihood:', ll, 'normal:', round(ll_normal, 4))
    lo, hi = _m22.SHAPE_BOUNDS
    for fam, (_, _, shape, scale) in fits.items():
      assert lo <= float(shape) <= hi and float(scale) > 0
      dens = pdf(fam, float(shape), float(scale), xs)
      assert abs(np.trapezoid(dens, xs) - 1) < 0.05 or float(shape) < 1   # (spiky Weibull: < 1 is fine)
    # the GenNorm family contains the Gaussian (b = 2): its MLE cannot be worse
    assert ll['gennorm'] >= ll_normal - 1e-3
    assert float(fits['gennorm'][2]) < 2.0   # heavier tails than Gaussian
    """),
    md("""
    ## Lloyd-Max levels vs the density

    Levels for `R = 1, 2, 3` bits and weights `M = 0` (plain MSE) and `M = 2` (errors on large
    entries cost more), for the fitted GenNorm. Larger `M` pushes levels outward, toward the
    large-magnitude entries that dominate `|z|^M`-weighted error.
    """),
    code("""
    _, _, shape, scale = fits['gennorm']
    levels = {(R, M): np.asarray(_m22.lloyd_max('gennorm', shape, scale, R, M)[0])
              for R in (1, 2, 3) for M in (0.0, 2.0)}
    fig, axs = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
    for ax, R in zip(axs, (1, 2, 3)):
      span = 1.1 * max(np.abs(levels[(R, M)]).max() for M in (0.0, 2.0))
      xl = np.linspace(-span, span, 801)
      ax.semilogy(xl, pdf('gennorm', float(shape), float(scale), xl), 'k', lw=1)
      for M, col in ((0.0, 'tab:blue'), (2.0, 'tab:red')):
        for j, c in enumerate(levels[(R, M)]):
          ax.axvline(c, color=col, ls='-' if M == 0 else '--', label=f'M={M:g}' if j == 0 else None)
      ax.set_title(f'R = {R} ({2**R} levels)'); ax.legend(fontsize=7)
    plt.show()
    for k, v in levels.items():
      print('R=%d M=%g' % k, np.round(v, 3))
    """),
    code("""
    for (R, M), c in levels.items():
      assert c.shape == (2**R,)
      assert np.all(np.diff(c) > 0), (R, M, c)          # strictly increasing
      assert np.allclose(c, -c[::-1], atol=1e-5)        # symmetric design
    for R in (1, 2, 3):
      assert levels[(R, 2.0)][-1] > levels[(R, 0.0)][-1]  # M=2 reaches further out
      assert levels[(R + 1, 0.0)][-1] > levels[(R, 0.0)][-1] if R < 3 else True
    """),
    md("""
    ## Distortion over Lloyd iterations

    Each Lloyd step (centroids, then midpoint thresholds) cannot increase the weighted
    distortion `E[|z|^M (z - Q(z))^2]` (closed form via incomplete gamma functions); from the
    quantile start it drops quickly and flattens (shown for `R = 3`). Every extra bit lowers
    the converged distortion.
    """),
    code("""
    ITERS = 40
    import functools
    @functools.partial(jax.jit, static_argnums=0)
    def trajectory(R, M):
      def step(c, _):
        c = _m22.lloyd_step(c, 'gennorm', shape, scale, M)
        return c, _m22.weighted_distortion(c, 'gennorm', shape, scale, M)
      c0 = _m22.initial_levels('gennorm', shape, scale, R)
      _, dist = jax.lax.scan(step, c0, None, ITERS)
      return jnp.concatenate([_m22.weighted_distortion(c0, 'gennorm', shape, scale, M)[None], dist])
    curves = {(3, M): np.asarray(trajectory(3, M), np.float64) for M in (0.0, 2.0)}
    # the converged designs of the previous cell, scored with the same closed form
    distortion = jax.jit(lambda c, M: _m22.weighted_distortion(c, 'gennorm', shape, scale, M))
    final = {(R, M): float(distortion(jnp.asarray(c[2**(R - 1):]), M))
             for (R, M), c in levels.items()}
    print('weighted distortion of the lloyd_max designs:', {k: round(v, 4) for k, v in final.items()})
    fig, ax = plt.subplots(figsize=(5, 3))
    for (R, M), dist in curves.items():
      ax.plot(dist, label=f'R={R}, M={M:g}')
    ax.set_yscale('log'); ax.set_xlabel('Lloyd iteration'); ax.set_ylabel('weighted distortion')
    ax.legend(); plt.show()
    """),
    code("""
    for key, dist in curves.items():
      assert np.all(np.diff(dist) <= 1e-5 * dist[0]), key   # monotone (up to float32 rounding)
      assert dist[-1] < dist[0]
    for M in (0.0, 2.0):                                      # one more bit, less distortion
      assert final[(1, M)] > final[(2, M)] > final[(3, M)], final
      assert final[(3, M)] <= curves[(3, M)][-1] * (1 + 1e-4)  # 100 iterations beat 40
    """),
]

# ----------------------------------------------------------------------------- LBGM

LBGM = [
    md("""
    # LBGM: recycling look-back gradients

    LBGM (Azam et al., ICLR 2022) keeps, per client, the last gradient it sent in full
    (the look-back gradient `b`). When the new (compressed) update `g` is nearly collinear
    with `b` — `sin^2(g, b) = 1 - <g,b>^2 / (||g||^2 ||b||^2) <= delta` — the client sends only
    the scalar `rho = <g,b>/||b||^2` and the server uses `rho b`. A larger threshold `delta`
    recycles more often and sends fewer bits.

    Setup: FedSGD (one full-batch gradient per client per round), full participation, the
    whole model as one LBGM unit (`per_tensor=False`), so each client message is either a
    scalar (a few dozen bits) or the full update.
    """),
    code(SETUP + textwrap.dedent("""
    import optax
    from fedjax_compress import data, federated, models
    ROUNDS = int(os.environ.get('FAMILY_NB_ROUNDS', 15)) * 2
    fd = data.synthetic(0.5, 0.5, num_clients=8, samples_per_client=40, seed=0)
    model = models.LogisticRegression(fd.num_classes)
    loss_fn = models.classification_loss(model)
    params0 = models.init_params(model, fd.clients[0]['x'][:1])
    num_params = sum(x.size for x in jax.tree.leaves(params0))
    BATCH = int(fd.client_sizes().max())
    """)),
    code("""
    def run(uplink):
      tx = optax.sgd(0.5, momentum=0.9)
      state = federated.init_server_state(params0, tx, uplink, num_clients=fd.num_clients)
      rnd = jax.jit(federated.build_round(loss_fn, optax.sgd(1.0), tx, uplink, local_steps=1))
      up, loss = [], []
      for r in range(ROUNDS):
        cohort = federated.sample_cohort(fd, r, cohort_size=fd.num_clients, local_steps=1,
                                         batch_size=BATCH, cycle=False)
        state, m = rnd(state, cohort, jax.random.key(0))
        up.append(np.asarray(m.up_bits, np.int64))
        loss.append(float(np.sum(np.asarray(m.loss) * np.asarray(m.weight))))
      return np.array(up), np.array(loss)

    THRESHOLDS = (0.0, 0.05, 0.2, 0.5)
    results = {}
    for delta in THRESHOLDS:
      c = C.lbgm(C.identity(), delta, per_tensor=False)   # delta = 0: plain FedSGD
      results[delta] = run(c)
    full_bits = results[0.0][0][0, 0]
    print('full message:', full_bits, 'bits for', num_params, 'parameters')
    """),
    md("""
    ## Recycle rate per round and cumulative uplink bits

    A message is a recycled scalar when its size is far below a full send (a scalar costs
    `1 + 32 + H` bits). The recycle rate is the fraction of the clients that sent a scalar.
    The first round is always full (no look-back gradient yet).
    """),
    code("""
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.2))
    rate = {}
    for delta, (up, loss) in results.items():
      scalar = up < full_bits / 4
      rate[delta] = scalar.mean(axis=1)
      axs[0].plot(rate[delta], label=f'delta={delta:g}')
      axs[1].plot(np.cumsum(up.sum(axis=1)), label=f'delta={delta:g}')
      axs[2].plot(loss, label=f'delta={delta:g}')
    axs[0].set_ylabel('recycle rate'); axs[1].set_ylabel('cumulative uplink bits')
    axs[2].set_ylabel('train loss')
    for ax in axs:
      ax.set_xlabel('round'); ax.legend(fontsize=7)
    plt.show()
    for delta, (up, loss) in results.items():
      print(f'delta={delta:<5g} recycle rate {rate[delta].mean():.2f}  uplink {up.sum():>9,d} bits  '
            f'final loss {loss[-1]:.4f}')
    """),
    code("""
    means = [rate[d].mean() for d in THRESHOLDS]
    totals = [results[d][0].sum() for d in THRESHOLDS]
    assert means[0] == 0 and np.all(rate[0.0] == 0)         # threshold 0: never recycle
    assert all(r[0] == 0 for r in rate.values())             # first round always full
    assert all(b >= a for a, b in zip(means, means[1:])), means   # recycle rate rises with delta
    assert means[-1] > 0.2, means
    assert all(b <= a for a, b in zip(totals, totals[1:])), totals  # and bits fall
    # recycling must not wreck training on this easy problem
    assert results[0.5][1][-1] < results[0.5][1][0]
    """),
]

# ----------------------------------------------------------------------------- LAQ

LAQ = [
    md("""
    # LAQ: lazily aggregated quantized gradients

    Each worker quantizes its gradient innovation `g - Qhat` with `b` bits and uploads it only
    when it is informative: `||Q - Qhat||^2 >= (1/eta^2) sum_d xi ||theta^{k+1-d} - theta^{k-d}||^2
    + 3 (eps + epshat)`, or after `t_bar` skips in a row. The server reuses the stale `Qhat`
    of skipping workers. Setup as the paper: softmax regression with `0.01/2 ||W||^2`,
    full participation, one full-batch gradient per worker per round (FedSGD form).
    """),
    code(SETUP + textwrap.dedent("""
    import optax
    from fedjax_compress import federated
    ROUNDS = int(os.environ.get('FAMILY_NB_ROUNDS', 15)) * 4
    M, N, P, K, ETA = 6, 100, 20, 5, 1.0
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(P, K)) * 3 / np.sqrt(P)
    x = rng.normal(size=(M * N, P)).astype(np.float32)
    y = (x @ w_true + rng.gumbel(size=(M * N, K))).argmax(1).astype(np.int32)
    x, y = jnp.asarray(x.reshape(M, N, P)), jnp.asarray(y.reshape(M, N))

    def loss_fn(params, xb, yb):
      logits = xb @ params['w'] + params['b']
      ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))
      return ce + 0.005 * jnp.sum(params['w']**2)
    """)),
    code("""
    params0 = {'w': jnp.zeros((P, K)), 'b': jnp.zeros((K,))}
    D = P * K + K
    cohort = federated.Cohort(ids=jnp.arange(M, dtype=jnp.int32), weight=jnp.ones(M),
                              batches={'x': x[:, None], 'y': y[:, None]},
                              mask=jnp.ones((M, 1, N), bool))
    global_loss = jax.jit(lambda pr: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(pr, x, y)))
    SKIP_BITS = 1 + bits.length_bits(D)   # a skip sends only the two length headers

    def run(c):
      tx = optax.sgd(ETA)
      state = federated.init_server_state(params0, tx, c, num_clients=M)
      rnd = jax.jit(federated.build_round(lambda pr, b, mask, k: loss_fn(pr, b['x'], b['y']),
                                          optax.sgd(1.0), tx, c, local_steps=1))
      loss, up = [], []
      for _ in range(ROUNDS):
        state, m = rnd(state, cohort, jax.random.key(0))
        loss.append(float(global_loss(state.params)))
        up.append(np.asarray(m.up_bits, np.int64))
      return np.array(loss), np.array(up)

    runs = {'GD (float32)': run(C.identity()),
            'QGD b=4 (no skipping)': run(C.laq(4, step_size=ETA, t_bar=0)),
            'LAQ b=4': run(C.laq(4, step_size=ETA))}
    for name, (loss, up) in runs.items():
      print(f'{name:22s} final loss {loss[-1]:.5f}  uplink {up.sum():>9,d} bits')
    """),
    md("""
    ## Skip pattern and bits vs loss

    Left: which worker uploaded in which round (dark = upload, light = skip). Early rounds
    are all uploads (the model moves fast, innovations are large); later, workers skip
    more and more. Right: training loss against cumulative uplink bits: LAQ reaches the same
    loss as GD with a fraction of the bits (4-bit innovations and skipped rounds).
    """),
    code("""
    sent = runs['LAQ b=4'][1] > SKIP_BITS
    fig, axs = plt.subplots(1, 2, figsize=(12, 3.2), gridspec_kw={'width_ratios': [1.4, 1]})
    axs[0].imshow(sent.T, aspect='auto', cmap='Greys', interpolation='nearest')
    axs[0].set_xlabel('round'); axs[0].set_ylabel('worker'); axs[0].set_title('LAQ uploads')
    for name, (loss, up) in runs.items():
      axs[1].plot(np.cumsum(up.sum(axis=1)), loss, label=name)
    axs[1].set_xscale('log'); axs[1].set_yscale('log')
    axs[1].set_xlabel('cumulative uplink bits'); axs[1].set_ylabel('training loss')
    axs[1].legend(fontsize=7); plt.show()
    print(f'LAQ uploads: {sent.sum()} of {sent.size} messages; per round:', sent.sum(1))
    """),
    code("""
    gd_loss, gd_up = runs['GD (float32)']
    laq_loss, laq_up = runs['LAQ b=4']
    assert sent[0].all()                          # the first upload is forced
    assert sent.sum() < sent.size                 # LAQ skips ...
    assert sent[ROUNDS // 2:].mean() < sent[:ROUNDS // 4].mean()   # ... more as it converges
    assert laq_up.sum() < gd_up.sum() / 8         # far fewer bits than GD
    assert np.all(laq_up[~sent] == SKIP_BITS)     # a skip costs exactly its headers
    assert laq_loss[-1] < gd_loss[0] and laq_loss[-1] < 1.1 * gd_loss[-1]  # similar loss
    """),
]

# ----------------------------------------------------------------------------- HSQ + baselines

HSQ = [
    md("""
    # HSQ and the baseline compressors: bits vs error

    Hyper-sphere quantization cuts the model into `dc`-chunks `x_i` and sends the index of the
    codeword best aligned with each chunk, `k_i = argmax_k |<c_k, x_i>|`, plus a low-bit
    scalar `u_i = <c_{k_i}, x_i>`: `log2 K + n` bits per `dc` coordinates. Its quality hinges
    on how well the unit codebook covers the sphere (up to sign).
    """),
    code(SETUP + textwrap.dedent("""
    from fedjax_compress.compressors import _hsq
    """)),
    md("""
    ## Codebook coverage

    Left: an 8-word codebook in 2-D (axial k-means places the `±c_k` lines evenly around the
    circle). Right: for random directions `x` in 16-D, the distribution of
    `max_k |<c_k, x>|/||x||` (the cosine HSQ keeps) for the k-means codebook vs unit
    Gaussian codewords of the same size; higher is better coverage.
    """),
    code("""
    cb2 = _hsq.codebook(8, 2, seed=0)
    cb = _hsq.codebook(256, 16, seed=0)
    rand = np.array(jax.random.normal(jax.random.key(5), (256, 16)))
    rand /= np.linalg.norm(rand, axis=1, keepdims=True)
    xq = np.array(jax.random.normal(jax.random.key(6), (4000, 16)))
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    cover = {'k-means codebook': np.abs(xq @ cb.T).max(1), 'random codebook': np.abs(xq @ rand.T).max(1)}
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.5))
    t = np.linspace(0, 2 * np.pi, 200)
    axs[0].plot(np.cos(t), np.sin(t), 'k:', lw=0.8)
    for c in cb2:
      axs[0].plot([-c[0], c[0]], [-c[1], c[1]], '-o', ms=3)
    axs[0].set_aspect('equal'); axs[0].set_title('K=8, dc=2')
    for name, v in cover.items():
      axs[1].hist(v, bins=40, alpha=0.6, label=f'{name} (mean {v.mean():.3f})')
    axs[1].set_xlabel('max_k |cos(c_k, x)|'); axs[1].legend(fontsize=8); plt.show()
    """),
    code("""
    assert np.allclose(np.linalg.norm(cb, axis=1), 1, atol=1e-5)
    assert cover['k-means codebook'].mean() > cover['random codebook'].mean()
    ang = np.sort(np.mod(np.arctan2(cb2[:, 1], cb2[:, 0]), np.pi))   # axial angles in [0, pi)
    gaps = np.diff(np.concatenate([ang, ang[:1] + np.pi]))
    assert gaps.max() < 2.5 * np.pi / 8, gaps                         # roughly even lines
    """),
    md("""
    ## Bits per coordinate and reconstruction error

    One message of a 64x64 "gradient" (heavy-tailed Student-t entries), compressed once by
    each family over a sweep of its knob; relative error `||decode(encode(g)) - g|| / ||g||`
    against the exact wire bits per coordinate (`bits.count`). Error feedback is off (one
    shot). Stochastic codecs are averaged over a few keys.
    """),
    code("""
    g = {'w': jnp.asarray(np.random.default_rng(0).standard_t(3, size=(64, 64)), jnp.float32)}
    NUMEL = 64 * 64

    def measure(c, trials=2):
      s, r = c.init(g)
      @jax.jit
      def roundtrip(g, s, r, keys):
        p, _ = c.encode(g, s, keys)
        out, _ = c.decode(p, r, keys, g)
        return bits.count(p), jnp.linalg.norm(out['w'] - g['w']) / jnp.linalg.norm(g['w'])
      res = [roundtrip(g, s, r, Keys(jax.random.key(100 + t), jax.random.key(200 + t)))
             for t in range(trials)]
      return int(res[0][0]) / NUMEL, float(np.mean([float(e) for _, e in res]))

    sweeps = {
      'hsq (K=256, dc=16)': [C.hsq(scalar_bits=n, error_feedback=False) for n in (2, 6, 8)],
      'hsq (K=2^k, dc=8)': [C.hsq(codebook_size=k, chunk=8, error_feedback=False) for k in (16, 64, 256)],
      'qsgd': [C.qsgd(s, bucket_size=128) for s in (1, 7, 255)],
      'top_k': [C.top_k(fraction=f) for f in (0.01, 0.1, 0.5)],
      'sign_sgd (scaled)': [C.sign_sgd(scaled=True)],
      'count_sketch': [C.count_sketch(1, w) for w in (256, 1024, 4096)],
      'power_sgd': [C.power_sgd(r, min_compression_rate=1.0) for r in (1, 4, 16)],
    }
    curves = {name: np.array([measure(c) for c in cs]) for name, cs in sweeps.items()}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
      ax.plot(pts[:, 0], pts[:, 1], 'o-', label=name)
    ax.set_xscale('log'); ax.set_xlabel('bits per coordinate')
    ax.set_ylabel('relative error'); ax.legend(fontsize=7); plt.show()
    for name, pts in curves.items():
      print(f'{name:20s}', ' '.join(f'({b:.3f} b/c, err {e:.3f})' for b, e in pts))
    """),
    code("""
    # exact HSQ wire size: ceil(D/dc) (log2 K + n) + 32 bits
    hsq6 = curves['hsq (K=256, dc=16)'][1]
    assert abs(hsq6[0] - (NUMEL / 16 * (8 + 6) + 32) / NUMEL) < 1e-9
    assert abs(hsq6[0] - _hsq.bits_per_message(NUMEL) / NUMEL) < 1e-9
    for name, pts in curves.items():
      assert np.all(np.diff(pts[:, 0]) > 0), name                  # knob sweeps add bits
      if name not in ('qsgd', 'count_sketch'):                     # deterministic codecs:
        assert np.all(np.diff(pts[:, 1]) < 1e-6), (name, pts)      # more bits, less error
    assert curves['qsgd'][-1, 1] < curves['qsgd'][0, 1]
    assert curves['count_sketch'][-1, 1] < curves['count_sketch'][0, 1]
    assert curves['top_k'][0, 1] < 1 and curves['sign_sgd (scaled)'][0, 0] < 1.1
    """),
]

NOTEBOOKS = {
    "fastfood_igc": FASTFOOD,
    "m22": M22,
    "lbgm": LBGM,
    "laq": LAQ,
    "hsq_baselines": HSQ,
}


def build(name: str) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.cells = NOTEBOOKS[name]
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  return nb


def main():
  for name in NOTEBOOKS:
    nb = build(name)
    for i, cell in enumerate(nb.cells):
      cell["id"] = f"{name}-{i}"  # stable ids: regenerating gives identical files
    nbformat.validate(nb)
    nbformat.write(nb, str(HERE / f"{name}.ipynb"))
    print("wrote", HERE / f"{name}.ipynb")


if __name__ == "__main__":
  main()
