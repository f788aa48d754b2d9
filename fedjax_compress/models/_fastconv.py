"""Convolutions as matmuls (im2col) inside any JAX function, by rewriting its jaxpr.

XLA:CPU runs a convolution's kernel gradient inside a loop body (the simulator's `lax.scan`
over local steps and over client chunks) through a generic path ~4-15x slower than at top
level, and a vmapped convolution with per-client kernels becomes a grouped convolution that
is slower still; the same arithmetic as `patches @ kernel` runs at matmul speed in both.
`im2col_convs(fun)` traces `fun` and evaluates its jaxpr with every `conv_general_dilated`
replaced by that matmul form, so a model written with `flax.linen.Conv` (or haiku, or
`lax.conv` directly) gets it without changing the model.

For an output position `o` and kernel offset `k` (per spatial dim, stride `s`, kernel
dilation `r`): `out[n, o, f] = sum_{k, c} x_pad[n, o s + k r, c] w[k, c, f]`, so stacking the
`K` strided slices `x_pad[:, k r :: s]` on the channel axis gives `patches[n, o, (k, c)]` and
`out = patches @ w.reshape(K C, F)` (per group for `feature_group_count > 1`). Values equal
the convolution's up to float summation order. Input (lhs) dilation and
`batch_group_count > 1` keep the original convolution.

Max pools with non-overlapping windows (`window == stride`, no padding or dilation, e.g.
`flax.linen.max_pool(x, (2, 2), strides=(2, 2))`) are rewritten too: XLA:CPU computes their
gradient with `select_and_scatter`, ~6x slower than the rest of the pool, so the pool is a
reshape into `[..., out, window, ...]` blocks and a max, with a custom gradient that routes
each output's cotangent to the first (row-major) maximum of its window: the same choice as
`select_and_scatter`'s `>=`, so values and gradients are unchanged.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

_CONV = jcore.primitives.conv_general_dilated_p
_MAXPOOL = jcore.primitives.reduce_window_max_p
_INLINE = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint")
CONV_IMPLS = ("auto", "xla", "im2col")


def _sub_jaxprs(params: dict) -> list:
  out = []
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jcore.ClosedJaxpr):
        out.append(x.jaxpr)
      elif isinstance(x, jcore.Jaxpr):
        out.append(x)
  return out


def has_conv(jaxpr: jcore.Jaxpr) -> bool:
  """True if `jaxpr` (or any sub-jaxpr) has a `conv_general_dilated` or a windowed max."""
  return any(e.primitive in (_CONV, _MAXPOOL) or any(has_conv(j) for j in _sub_jaxprs(e.params))
             for e in jaxpr.eqns)


def _window_slices(x: jax.Array, window: tuple[int, ...]) -> list[jax.Array]:
  """`x` cut to whole windows; one `[o_0, ..., o_r]` slice per window offset (row-major).

  The cut `x` is reshaped (for free, row-major) to `[o_0, w_0, o_1, w_1, ...]` and each
  offset's slice picks one element per window, so every op below is elementwise (XLA:CPU
  fuses them into one loop; a window-last transpose plus a reduce cost ~1 ms per pool here).
  """
  out = [n // w for n, w in zip(x.shape, window)]
  x = x[tuple(slice(0, o * w) for o, w in zip(out, window))]
  x = x.reshape([v for o, w in zip(out, window) for v in (o, w)])
  return [x[tuple(v for a in off for v in (slice(None), a))]
          for off in itertools.product(*[range(w) for w in window])]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_blocks(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  return functools.reduce(jnp.maximum, _window_slices(x, window))


def _max_pool_fwd(x, window):
  return _max_pool_blocks(x, window), x


def _max_pool_bwd(window, x, g):
  """Cotangent to the first maximum of each window (row-major), zero elsewhere."""
  parts = _window_slices(x, window)
  m = functools.reduce(jnp.maximum, parts)
  taken = jnp.zeros(m.shape, bool)
  grads = []
  for p in parts:
    hit = (p == m) & ~taken
    taken = taken | hit
    grads.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
  out = [n // w for n, w in zip(x.shape, window)]
  r = len(window)
  gb = jnp.stack(grads, axis=-1).reshape(out + list(window))
  gb = jnp.transpose(gb, [v for i in range(r) for v in (i, r + i)])
  gb = gb.reshape([o * w for o, w in zip(out, window)])
  return (jnp.pad(gb, [(0, n - o * w) for n, o, w in zip(x.shape, out, window)]),)


_max_pool_blocks.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_blocks(operand: jax.Array, *, window_dimensions, window_strides, padding,
                    base_dilation, window_dilation) -> jax.Array | None:
  """A non-overlapping `reduce_window_max` as reshape + max; None where unsupported."""
  window = tuple(int(w) for w in window_dimensions)
  if (tuple(window_strides) != window or any(d != 1 for d in base_dilation)
      or any(d != 1 for d in window_dilation) or any(p != (0, 0) for p in map(tuple, padding))
      or not jnp.issubdtype(operand.dtype, jnp.floating)
      or any(n < w for n, w in zip(operand.shape, window)) or all(w == 1 for w in window)):
    return None
  return _max_pool_blocks(operand, window)


def conv_im2col(lhs: jax.Array, rhs: jax.Array, *, window_strides, padding, lhs_dilation,
                rhs_dilation, dimension_numbers, feature_group_count=1, batch_group_count=1,
                precision=None, preferred_element_type=None, **unused) -> jax.Array | None:
  """`lax.conv_general_dilated` as strided slices + one matmul; None where unsupported."""
  del unused
  if any(d != 1 for d in lhs_dilation) or batch_group_count != 1:
    return None
  lspec, rspec, ospec = dimension_numbers
  nsp = len(lspec) - 2
  x = jnp.transpose(lhs, (lspec[0],) + tuple(lspec[2:]) + (lspec[1],))     # N, *S, C
  w = jnp.transpose(rhs, tuple(rspec[2:]) + (rspec[1], rspec[0]))          # *K, Cg, F
  x = lax.pad(x, jnp.zeros((), x.dtype),
              [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] + [(0, 0, 0)])
  ksize = w.shape[:nsp]
  out_sp = [(x.shape[1 + i] - (ksize[i] - 1) * rhs_dilation[i] - 1) // window_strides[i] + 1
            for i in range(nsp)]
  if any(o <= 0 for o in out_sp):
    return None
  slices = []
  for off in itertools.product(*[range(k) for k in ksize]):
    start = [0] + [o * r for o, r in zip(off, rhs_dilation)] + [0]
    limit = ([x.shape[0]] + [st + (o - 1) * s + 1 for st, o, s in
                             zip(start[1:-1], out_sp, window_strides)] + [x.shape[-1]])
    slices.append(lax.slice(x, start, limit, [1] + list(window_strides) + [1]))
  g, cin, cout = feature_group_count, x.shape[-1], w.shape[-1]
  cg, fg = cin // g, cout // g
  patches = jnp.stack(slices, axis=-2)                                    # N, *O, K, C
  if g == 1:  # one contracting dim (K*C, row-major as stacked): no transpose of the patches
    out = lax.dot_general(patches.reshape(patches.shape[:-2] + (len(slices) * cin,)),
                          w.reshape((len(slices) * cin, cout)),
                          (((patches.ndim - 2,), (0,)), ((), ())), precision=precision,
                          preferred_element_type=preferred_element_type)
  else:
    patches = patches.reshape(patches.shape[:-2] + (len(slices), g, cg))
    kernel = w.reshape((len(slices), cg, g, fg))
    out = jnp.einsum("...kgc,kcgf->...gf", patches, kernel, precision=precision,
                     preferred_element_type=preferred_element_type)
    out = out.reshape(out.shape[:-2] + (cout,))                           # N, *O, F
  perm = [0] * (nsp + 2)  # out axis ospec[j] holds our axis (0 = N, nsp+1 = F, 1.. = spatial)
  perm[ospec[0]], perm[ospec[1]] = 0, nsp + 1
  for i in range(nsp):
    perm[ospec[2 + i]] = 1 + i
  out = jnp.transpose(out, perm)
  return out.astype(preferred_element_type or lhs.dtype)


def _retrace(closed: jcore.ClosedJaxpr) -> jcore.ClosedJaxpr:
  """`closed` with its convolutions rewritten (same input/output types)."""
  avals = [v.aval for v in closed.jaxpr.invars]
  fn = lambda *a: _eval(closed.jaxpr, closed.consts, a)  # noqa: E731
  return jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])


def _rewrite_params(params: dict) -> dict:
  out = {}
  for k, v in params.items():
    if isinstance(v, jcore.ClosedJaxpr) and has_conv(v.jaxpr):
      v = _retrace(v)
    elif isinstance(v, tuple) and any(isinstance(x, jcore.ClosedJaxpr) for x in v):
      v = tuple(_retrace(x) if isinstance(x, jcore.ClosedJaxpr) and has_conv(x.jaxpr) else x
                for x in v)
    out[k] = v
  return out


def _bind(eqn, invals, params):
  bound = eqn.primitive.get_bind_params(params)
  subfuns, bind_params = bound if isinstance(bound, tuple) else ((), bound)  # jax < 0.7: a pair
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  return out if eqn.primitive.multiple_results else [out]


def _eval(jaxpr: jcore.Jaxpr, consts, args) -> list:
  """Evaluate `jaxpr` with convolutions computed by `conv_im2col` (recursing into calls)."""
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    outs = None
    if eqn.primitive is _CONV:
      out = conv_im2col(*invals, **eqn.params)
      outs = None if out is None else [out]
    elif eqn.primitive is _MAXPOOL:
      out = max_pool_blocks(*invals, **eqn.params)
      outs = None if out is None else [out]
    elif any(has_conv(j) for j in _sub_jaxprs(eqn.params)):
      sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      if eqn.primitive.name in _INLINE and sub is not None:
        sub = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
        outs = _eval(sub.jaxpr, sub.consts, invals)
      elif eqn.primitive.name in ("scan", "while", "cond"):
        outs = _bind(eqn, invals, _rewrite_params(eqn.params))
      # other higher-order primitives (custom_jvp/vjp rules...) keep their convolutions
    if outs is None:
      outs = _bind(eqn, invals, eqn.params)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def im2col_convs(fun: Callable[..., Any]) -> Callable[..., Any]:
  """`fun` with every convolution as strided slices and a matmul, and every non-overlapping
  max pool as reshape + max (same values and gradients).

  Positional arguments are traced (pytrees of arrays); keyword arguments are closed over.
  Functions without a convolution run unchanged.

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> f = lambda x, w: jax.lax.conv(x, w, (1, 1), 'SAME')
  >>> x, w = jnp.ones((2, 3, 8, 8)), jnp.ones((4, 3, 3, 3))
  >>> bool(np.allclose(im2col_convs(f)(x, w), f(x, w), rtol=1e-5))
  True
  """

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    closed, shape = jax.make_jaxpr(functools.partial(fun, **kwargs), return_shape=True)(*args)
    if not has_conv(closed.jaxpr):
      return fun(*args, **kwargs)
    out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shape), out)

  return wrapped


def with_conv_impl(fun: Callable[..., Any], conv_impl: str) -> Callable[..., Any]:
  """`fun` as written ('xla'), rewritten ('im2col'), or rewritten on CPU only ('auto')."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
  if conv_impl == "xla":
    return fun
  rewritten = im2col_convs(fun)
  if conv_impl == "im2col":
    return rewritten

  @functools.wraps(fun)
  def auto(*args, **kwargs):
    return (rewritten if jax.default_backend() == "cpu" else fun)(*args, **kwargs)

  return auto


