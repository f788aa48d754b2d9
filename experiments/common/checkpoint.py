"""Orbax checkpoints of the `ServerState` (resume from the latest step).

The state is stored as a flat `{leaf index: array}` dict of its non-empty leaves: orbax
refuses zero-size arrays, which compressor states legitimately hold (e.g. PowerSGD's
placeholder for 1-D leaves). Empty leaves carry no data and are rebuilt from the template.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Synchronous orbax `CheckpointManager` over `<workdir>/ckpt`, keeping the last `keep`."""

  def __init__(self, directory: str, keep: int = 2):
    self._mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    """The newest saved step (round), or None."""
    return self._mngr.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Save `state` as `step` (no-op if that step exists) and wait until it is on disk."""
    if step in self._mngr.all_steps():
      return
    leaves = jax.tree.leaves(state)
    self._mngr.save(step, args=ocp.args.StandardSave(
        {str(i): x for i, x in enumerate(leaves) if x.size}))
    self._mngr.wait_until_finished()

  def restore(self, step: int, like: Any) -> Any:
    """Restore `step` into the structure (and shardings) of `like`."""
    leaves, treedef = jax.tree.flatten(like)
    abstract = {str(i): ocp.utils.to_shape_dtype_struct(x)
                for i, x in enumerate(leaves) if x.size}
    saved = self._mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    return jax.tree.unflatten(treedef, [saved[str(i)] if x.size else x
                                        for i, x in enumerate(leaves)])

  def close(self) -> None:
    """Release the manager."""
    self._mngr.close()
