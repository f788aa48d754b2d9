"""How fast can any library train FedJAX's EMNIST CNN on this machine? A per-client bound.

A FedAvg client of the EMNIST CNN (batch 10, 5 local steps) does the same arithmetic in every
library: each step is a forward and backward pass with its own weights, so batching clients
saves no FLOP. The step is dominated by the 3x3x32x64 convolution: its forward, input
gradient and kernel gradient are ~64 of the ~72 MFLOP per example. This script measures, in
one process, the fastest this machine runs those pieces as top-level XLA programs (the
fastest place for them: inside loops XLA:CPU is slower) and prints the clients/s they allow:

  bound_conv   = 1 / (steps * t(conv2 forward + both gradients))      (everything else free)
  bound_step   = 1 / (steps * t(whole jitted SGD step))               (FedJAX's structure)
  bound_flops  = peak_gemm_flops / flops_per_client                   (XLA's cost analysis)

With `--fedjax_rate R` (FedJAX's clients/s measured by bench_vs_fedjax.py) it prints each bound
as a multiple of R: a target ratio above `bound_conv / R` needs a faster convolution kernel
than XLA:CPU has, whatever the client loop.

  python benchmarks/bench_cnn_bound.py --fedjax_rate 15.0
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fedjax_compress.models._fedjax_models import EmnistCNN  # FedJAX's EMNIST CNN, dropout on

DN = ("NHWC", "HWIO", "NHWC")


def timed(fn, *args, reps: int) -> float:
  """Median seconds of `fn(*args)` (jitted, after one warm-up call)."""
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t)
  return statistics.median(out)


def conv2_grad_fns(batch: int):
  """Forward + input and kernel gradients of the 3x3x32x64 layer: native and im2col forms."""
  def native(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN)

  def im2col(x, w):
    n, h, wd, c = x.shape
    p = jnp.stack([x[:, a:a + h - 2, b:b + wd - 2] for a in range(3) for b in range(3)], -2)
    return jnp.einsum("nhwkc,kcf->nhwf", p, w.reshape(9, c, -1))

  def grads(conv):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(conv(x, w))), argnums=(0, 1)))

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 26, 26, 32)).astype(np.float32))
  w = jnp.asarray(0.1 * rng.normal(size=(3, 3, 32, 64)).astype(np.float32))
  return {"native": (grads(native), x, w), "im2col": (grads(im2col), x, w)}


def step_fn(batch: int):
  """One jitted SGD step of the whole CNN (dropout on), and its arguments."""
  model = EmnistCNN()
  params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                      jnp.ones((1, 28, 28, 1)))["params"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((batch, 28, 28, 1), dtype=np.float32))
  y = jnp.asarray(rng.integers(0, 62, batch).astype(np.int32))

  def loss(p, x, y, k):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": k})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, x, y, k):
    g = jax.grad(loss)(p, x, y, k)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

  return step, (params, x, y, jax.random.key(2))


def peak_gemm(reps: int) -> float:
  """Best FLOP/s of a jitted float32 matmul over a few large shapes."""
  best = 0.0
  for m, k, n in [(2048, 2048, 2048), (14400, 288, 64), (57600, 288, 64)]:
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    best = max(best, 2 * m * k * n / timed(f, a, b, reps=reps))
  return best


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=10)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--fedjax_rate", type=float, default=0.0,
                 help="FedJAX's clients/s from bench_vs_fedjax.py (same machine, same load)")
  a = p.parse_args()
  print(f"jax {jax.__version__} on {jax.default_backend()}, batch {a.batch}, {a.steps} steps")
  conv = {name: timed(f, x, w, reps=a.reps) for name, (f, x, w) in conv2_grad_fns(a.batch).items()}
  step, args = step_fn(a.batch)
  t_step = timed(step, *args, reps=a.reps)
  flops = step.lower(*args).compile().cost_analysis()
  flops = (flops[0] if isinstance(flops, (list, tuple)) else flops).get("flops", float("nan"))
  peak = peak_gemm(max(3, a.reps // 3))
  t_conv = min(conv.values())
  bounds = {"bound_conv": 1 / (a.steps * t_conv), "bound_step": 1 / (a.steps * t_step),
            "bound_flops": peak / (a.steps * flops)}
  for name, t in conv.items():
    print(f"conv2 forward + both gradients ({name}): {t * 1e3:.2f} ms/step")
  print(f"whole SGD step (top-level jit): {t_step * 1e3:.2f} ms/step; XLA cost analysis "
        f"{flops / 1e6:.0f} MFLOP/step = {flops / t_step / 1e9:.1f} GFLOP/s achieved")
  print(f"peak float32 GEMM: {peak / 1e9:.1f} GFLOP/s")
  for name, v in bounds.items():
    extra = f" = {v / a.fedjax_rate:.2f}x FedJAX" if a.fedjax_rate else ""
    print(f"{name}: {v:.1f} clients/s{extra}")


if __name__ == "__main__":
  main()
