"""Checkpoints of pytrees such as `federated.ServerState`: atomic, SHA-256 verified, keep-last-N.

Public API:
  - `save(path, tree, *, step=0, metadata=None)`: one file, written atomically (temporary
    file, fsync, rename), with a trailing SHA-256 of everything before it.
  - `load(path, like) -> (tree, metadata)`, `restore(path, like) -> tree`: verified, then
    rebuilt in the structure, dtypes and shardings of the template `like` (arrays or
    `jax.ShapeDtypeStruct`s); `read_metadata(path)`.
  - `CheckpointManager(directory, *, keep=2)`: `save(step, tree, metadata=...)`,
    `restore_latest(like) -> Restored(step, tree, metadata, skipped)` (falls back to the
    newest checkpoint that verifies), `steps()`, `latest_step()`, `load`, `restore`,
    `quarantine`.
  - `CheckpointError`: a truncated, corrupted or unreadable file (a `ValueError`).

A whole `ServerState` (server params, optimizer state, every client's uplink sender and
receiver state, the round, the downlink's broadcast and states) round-trips bit for bit:

>>> import tempfile, jax.numpy as jnp, optax
>>> from fedjax_compress import checkpoint, compressors, error_feedback, federated
>>> c = error_feedback(compressors.top_k(k=1))
>>> state = federated.init_server_state({"w": jnp.arange(3.0)}, optax.sgd(1.0), c,
...                                     num_clients=4)
>>> m = checkpoint.CheckpointManager(tempfile.mkdtemp())
>>> _ = m.save(int(state.round), state, metadata={"config": {"lr": 1.0}})
>>> got = m.restore_latest(state)
>>> got.step, got.metadata, got.tree.params["w"].tolist()
(0, {'config': {'lr': 1.0}}, [0.0, 1.0, 2.0])
"""

from fedjax_compress.checkpoint._checkpoint import (CheckpointError, CheckpointManager,
                                                    Restored, load, read_metadata, restore,
                                                    save)

__all__ = ["save", "load", "restore", "read_metadata", "CheckpointManager", "Restored",
           "CheckpointError"]
