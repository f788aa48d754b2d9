"""Offline synthetic next-token data for language models (any vocabulary, e.g. GPT-2's 50,257)."""

from __future__ import annotations

import numpy as np

from fedjax_compress._src import checks
from fedjax_compress.data._dataset import FederatedData


def synthetic_tokens(num_clients: int = 8, *, vocab_size: int = 50_257, seq_len: int = 128,
                     sequences_per_client: int = 8, test_sequences: int = 16,
                     follow: float = 0.7, zipf: float = 1.2, seed: int = 0) -> FederatedData:
  """Token sequences with learnable, client-specific structure; `x` = tokens, `y` = next tokens.

  Client k draws a start token from a Zipf(`zipf`) law over a client permutation of the
  vocabulary; each next token is `(a t + b_k) mod V` with probability `follow` (a shared
  multiplier `a`, a client offset `b_k`: non-IID bigram rules) and a fresh Zipf draw
  otherwise. `x[i] = t[i, :T]`, `y[i] = t[i, 1:T+1]` (int32, `T = seq_len`). The test set
  pools `test_sequences` sequences drawn like those of random clients.

  >>> d = synthetic_tokens(3, vocab_size=100, seq_len=5, sequences_per_client=2)
  >>> d.clients[0]['x'].shape, d.clients[0]['y'].dtype, d.num_classes
  ((2, 5), dtype('int32'), 100)
  """
  num_clients = checks.check_positive_int(num_clients, "num_clients")
  vocab_size = checks.check_positive_int(vocab_size, "vocab_size")
  seq_len = checks.check_positive_int(seq_len, "seq_len")
  n = checks.check_positive_int(sequences_per_client, "sequences_per_client")
  test_sequences = checks.check_positive_int(test_sequences, "test_sequences")
  if not 0.0 <= follow <= 1.0:
    raise ValueError(f"follow must be in [0, 1], got {follow}")
  if not zipf > 1.0:
    raise ValueError(f"zipf must be > 1, got {zipf}")
  rng = np.random.default_rng(seed)
  a = int(rng.integers(1, vocab_size)) | 1
  offsets = rng.integers(0, vocab_size, num_clients)
  perms = [rng.permutation(vocab_size) for _ in range(num_clients)]

  def draw(k: int, count: int) -> np.ndarray:
    t = np.empty((count, seq_len + 1), np.int64)
    fresh = lambda size: perms[k][np.minimum(rng.zipf(zipf, size) - 1, vocab_size - 1)]  # noqa: E731
    t[:, 0] = fresh(count)
    for i in range(1, seq_len + 1):
      rule = (a * t[:, i - 1] + offsets[k]) % vocab_size
      t[:, i] = np.where(rng.random(count) < follow, rule, fresh(count))
    return t.astype(np.int32)

  clients = []
  for k in range(num_clients):
    t = draw(k, n)
    clients.append({"x": t[:, :-1], "y": t[:, 1:]})
  test = [draw(int(k), 1) for k in rng.integers(0, num_clients, test_sequences)]
  test = np.concatenate(test)
  return FederatedData(clients, {"x": test[:, :-1], "y": test[:, 1:]}, vocab_size,
                       f"synthetic_tokens(V={vocab_size},T={seq_len})")
