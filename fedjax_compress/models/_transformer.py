"""A GPT-2-style decoder-only transformer language model (flax linen).

Pre-norm blocks `x + Attn(LN(x))`, `x + MLP(LN(x))` with causal multi-head self-attention,
a 4x GELU MLP, learned token and position embeddings and an output head tied to the token
embedding (logits `= LN(h) W_te^T`). `TransformerLM.gpt2_small()` is GPT-2 small's shape: 12
layers, width 768, 12 heads, vocabulary 50,257, 1,024 positions = 124,439,808 parameters, the
model of the IGC paper's language-modelling runs. The sequence length of the data can be
anything up to `max_len`; it does not change the parameter count.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

GPT2_SMALL_PARAMS = 124_439_808


class _Block(nn.Module):
  """One pre-norm transformer block."""

  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    t = x.shape[-2]
    init = nn.initializers.normal(0.02)
    h = nn.LayerNorm(epsilon=1e-5, name="ln_1")(x)
    qkv = nn.Dense(3 * self.width, kernel_init=init, name="attn_in")(h)
    q, k, v = jnp.split(qkv.reshape(x.shape[:-1] + (3, self.heads, -1)), 3, axis=-3)
    q, k, v = (a.squeeze(-3) for a in (q, k, v))                  # [B, T, H, Dh]
    causal = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.dot_product_attention(q, k, v, mask=causal[None, None])
    x = x + nn.Dense(self.width, kernel_init=init, name="attn_out")(
        att.reshape(x.shape[:-1] + (self.width,)))
    h = nn.LayerNorm(epsilon=1e-5, name="ln_2")(x)
    h = nn.gelu(nn.Dense(4 * self.width, kernel_init=init, name="mlp_in")(h), approximate=True)
    return x + nn.Dense(self.width, kernel_init=init, name="mlp_out")(h)


class TransformerLM(nn.Module):
  """Decoder-only LM: int tokens `[B, T]` -> next-token logits `[B, T, vocab_size]`.

  >>> m = TransformerLM(vocab_size=11, width=8, layers=1, heads=2, max_len=6)
  >>> p = m.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))['params']
  >>> m.apply({'params': p}, jnp.zeros((2, 5), jnp.int32)).shape
  (2, 5, 11)
  """

  vocab_size: int
  width: int = 768
  layers: int = 12
  heads: int = 12
  max_len: int = 1024

  @staticmethod
  def gpt2_small(vocab_size: int = 50_257, **kwargs) -> "TransformerLM":
    """GPT-2 small: 12 x 768, 12 heads, 1,024 positions (124,439,808 params at 50,257 tokens)."""
    return TransformerLM(vocab_size=vocab_size, **kwargs)

  @nn.compact
  def __call__(self, tokens):
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
    t = tokens.shape[-1]
    if t > self.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len {self.max_len}")
    wte = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                   name="wte")
    wpe = self.param("wpe", nn.initializers.normal(0.01), (self.max_len, self.width))
    x = wte(tokens) + wpe[None, :t]
    for i in range(self.layers):
      x = _Block(self.width, self.heads, name=f"block_{i}")(x)
    return wte.attend(nn.LayerNorm(epsilon=1e-5, name="ln_f")(x))
