"""Checkpoint files of pytrees (e.g. `federated.ServerState`): atomic, checksummed, keep-last-N.

File layout (one file per checkpoint, little endian):

  b"FJCKPT01" | uint64 header length H | H bytes of JSON header | leaf bytes | SHA-256 (32 B)

The header holds the format version, the step, every leaf's key path, dtype and shape, and
the caller's JSON metadata; the leaves follow in `jax.tree.leaves` order, each as its raw
C-order bytes (zero-size leaves take 0 bytes). The SHA-256 digest of everything before it is
written last, so a file cut anywhere, or with any byte changed, fails verification on
restore (`CheckpointError`) instead of restoring a silently different state.

Why plain files rather than orbax (a dependency, used here before): the checksum has to
cover exactly the bytes that are restored, which is direct with one file we write and
indirect with orbax's directory of tensorstore chunks; atomicity is one `os.replace` of a
fully written, fsynced temporary file (no shared temporary directories, which collided when
two processes wrote one orbax directory); zero-size leaves (PowerSGD's placeholders), which
orbax refuses, need no special case; and there are no background threads. The cost is that
leaves pass through host memory one at a time, and arrays that are not fully addressable
(multi-process sharding) must be gathered first (`multihost_utils.process_allgather`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

MAGIC = b"FJCKPT01"
FORMAT_VERSION = 1
_DIGEST = 32  # SHA-256
_STEP_FILE = re.compile(r"^step_(\d+)\.ckpt$")
_TMP_FILE = re.compile(r"^\.step_\d+\.ckpt\.tmp\.(\d+)\.[0-9a-f]+$")


class CheckpointError(ValueError):
  """A checkpoint file is truncated, corrupted (checksum mismatch) or not a checkpoint."""


def _dtype(x: Any) -> np.dtype:
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _check_key(path: str, x: Any) -> None:
  if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    raise ValueError(f"checkpoint leaf {path} is a typed PRNG key; store "
                     "jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data")


def _entry(path: Any, x: Any) -> dict:
  """Header entry (key path, dtype name, shape) of one leaf."""
  name = jax.tree_util.keystr(path)
  _check_key(name, x)
  return {"path": name, "dtype": np.dtype(_dtype(x)).name,
          "shape": [int(d) for d in np.shape(x)]}


def _host(path: str, x: Any) -> np.ndarray:
  """`x` as a C-contiguous NumPy array (device -> host), with errors naming `path`."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    raise ValueError(f"checkpoint leaf {path} is not fully addressable by this process "
                     "(multi-process sharding); gather it first, e.g. with "
                     "jax.experimental.multihost_utils.process_allgather")
  a = np.asarray(x)
  return a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def save(path: str, tree: Any, *, step: int = 0, metadata: Optional[dict] = None) -> None:
  """Write `tree` to `path` atomically: a temporary file, fsynced, then renamed over `path`.

  `metadata` (JSON-serializable) is stored in the header and covered by the checksum. On
  any error the temporary file is removed and an existing `path` is left untouched.
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be a non-negative integer, got {step!r}")
  leaves_with_path = jax.tree_util.tree_leaves_with_path(tree)
  entries = [_entry(p, x) for p, x in leaves_with_path]
  if metadata is not None and not isinstance(metadata, dict):
    raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
  try:  # NaN / Inf are kept as Python's json writes them (metric rows may hold a NaN loss)
    header = json.dumps({"format": FORMAT_VERSION, "step": int(step), "leaves": entries,
                         "metadata": {} if metadata is None else metadata},
                        sort_keys=True).encode()
  except (TypeError, ValueError) as e:
    raise ValueError(f"metadata must be JSON-serializable: {e}") from e
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}."
                                f"{secrets.token_hex(4)}")
  digest = hashlib.sha256()
  try:
    with open(tmp, "wb") as f:
      for chunk in (MAGIC, struct.pack("<Q", len(header)), header):
        f.write(chunk)
        digest.update(chunk)
      for (p, x), e in zip(leaves_with_path, entries):
        a = _host(e["path"], x)
        if list(a.shape) != e["shape"] or a.dtype.name != e["dtype"]:
          raise ValueError(f"checkpoint leaf {e['path']} changed while saving")
        if a.size:
          raw = memoryview(a.reshape(-1).view(np.uint8))
          f.write(raw)
          digest.update(raw)
      f.write(digest.digest())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise
  _fsync_dir(directory)


def _read(path: str) -> tuple[dict, list[np.ndarray]]:
  """Header and leaf arrays of `path`, verified against the trailing SHA-256."""
  try:
    size = os.path.getsize(path)
    f = open(path, "rb")
  except OSError as e:
    raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from e
  with f:
    digest = hashlib.sha256()
    head = f.read(len(MAGIC) + 8)
    if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
      raise CheckpointError(f"{path} is not a checkpoint of this format (bad magic or "
                            f"truncated at {size} bytes)")
    (hlen,) = struct.unpack("<Q", head[len(MAGIC):])
    if hlen > size:
      raise CheckpointError(f"checkpoint {path} is truncated or corrupted (header length "
                            f"{hlen} > file size {size})")
    raw_header = f.read(hlen)
    digest.update(head)
    digest.update(raw_header)
    try:
      header = json.loads(raw_header)
      entries = header["leaves"]
      dtypes = [jnp.dtype(e["dtype"]) for e in entries]
      shapes = [tuple(int(d) for d in e["shape"]) for e in entries]
      if header.get("format") != FORMAT_VERSION or any(d < 0 for s in shapes for d in s):
        raise ValueError(f"format {header.get('format')!r} or a negative dimension")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointError(f"checkpoint {path} has a corrupted header ({e})") from e
    nbytes = [int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in zip(shapes, dtypes)]
    expected = len(head) + hlen + sum(nbytes) + _DIGEST
    if size != expected:
      raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({size} bytes, "
                            f"its header describes {expected})")
    arrays = []
    for shape, dtype, n in zip(shapes, dtypes, nbytes):
      a = np.empty(shape, dtype)
      if n:
        buf = memoryview(a.reshape(-1).view(np.uint8))
        if f.readinto(buf) != n:
          raise CheckpointError(f"checkpoint {path} is truncated")
        digest.update(buf)
      arrays.append(a)
    if f.read(_DIGEST + 1) != digest.digest():
      raise CheckpointError(f"checkpoint {path} failed its SHA-256 integrity check "
                            "(corrupted data)")
  return header, arrays


def _leaf_like(saved: np.ndarray, like: Any) -> Any:
  """`saved` as the kind of leaf `like` is: jax.Array with like's sharding, NumPy or scalar."""
  sharding = getattr(like, "sharding", None)
  if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)):
    if sharding is None:
      return jnp.asarray(saved)
    return jax.make_array_from_callback(saved.shape, sharding, lambda idx: saved[idx])
  if isinstance(like, np.ndarray):
    return saved
  if isinstance(like, np.generic):
    return saved[()]
  return type(like)(saved.item())


def load(path: str, like: Any) -> tuple[Any, dict]:
  """`(tree, metadata)` from `path`, in the structure, dtypes and shardings of `like`.

  `like` may hold arrays or `jax.ShapeDtypeStruct`s (with `sharding`). Raises
  `CheckpointError` for a truncated or corrupted file and `ValueError` naming the first
  leaf whose path, shape or dtype differs from `like`.
  """
  header, arrays = _read(path)
  like_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  entries = header["leaves"]
  if len(entries) != len(like_leaves):
    raise ValueError(f"checkpoint {path} has {len(entries)} leaves, the template "
                     f"{len(like_leaves)}")
  for e, a, (p, x) in zip(entries, arrays, like_leaves):
    _check_key(jax.tree_util.keystr(p), x)
    want = (jax.tree_util.keystr(p), tuple(np.shape(x)), np.dtype(_dtype(x)))
    got = (e["path"], a.shape, a.dtype)
    if got != want:
      raise ValueError(f"checkpoint {path} does not match the template at leaf {want[0]}: "
                       f"saved {got[0]} {got[1]} {got[2]}, template {want[1]} {want[2]}")
  tree = jax.tree_util.tree_unflatten(
      treedef, [_leaf_like(a, x) for a, (_, x) in zip(arrays, like_leaves)])
  return tree, header.get("metadata", {})


def restore(path: str, like: Any) -> Any:
  """The tree saved at `path`, in the structure and shardings of `like` (see `load`)."""
  return load(path, like)[0]


def read_metadata(path: str) -> dict:
  """The metadata saved with `path` (the whole file is verified first)."""
  return _read(path)[0].get("metadata", {})


class Restored(NamedTuple):
  """Result of `CheckpointManager.restore_latest`.

  Attributes:
    step: the restored step, or None if no checkpoint passed verification.
    tree: the restored pytree (None with `step`).
    metadata: its metadata.
    skipped: `(step, reason)` of every newer checkpoint that failed verification.
  """

  step: Optional[int]
  tree: Any
  metadata: dict
  skipped: list


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class CheckpointManager:
  """Numbered checkpoints `<directory>/step_<step>.ckpt`, keeping the newest `keep`.

  `save` never deletes a checkpoint newer than the one it writes, and only removes older
  ones once the new file is complete on disk. `restore_latest` falls back to the newest
  checkpoint that passes verification. Leftover temporary files of dead processes are
  removed on construction; the directory is created by the first `save`.

  >>> import tempfile, jax.numpy as jnp
  >>> m = CheckpointManager(tempfile.mkdtemp(), keep=2)
  >>> for s in (1, 2, 3):
  ...   _ = m.save(s, {"w": jnp.full(2, s)}, metadata={"note": s})
  >>> m.steps(), m.restore_latest({"w": jnp.zeros(2, jnp.int32)}).tree["w"].tolist()
  ([2, 3], [3, 3])
  """

  def __init__(self, directory: str, *, keep: Optional[int] = 2):
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
      raise ValueError(f"keep must be a positive integer or None, got {keep!r}")
    self.directory = os.path.abspath(directory)
    self.keep = keep
    for name in self._names():
      m = _TMP_FILE.match(name)
      if m and not _alive(int(m.group(1))):
        try:
          os.remove(os.path.join(self.directory, name))
        except OSError:
          pass

  def _names(self) -> list[str]:
    try:
      return os.listdir(self.directory)
    except FileNotFoundError:  # created by the first save
      return []

  def path(self, step: int) -> str:
    """File of `step`."""
    return os.path.join(self.directory, f"step_{int(step)}.ckpt")

  def steps(self) -> list[int]:
    """Saved steps, ascending (quarantined and temporary files excluded)."""
    return sorted(int(m.group(1)) for m in map(_STEP_FILE.match, self._names()) if m)

  def latest_step(self) -> Optional[int]:
    """The newest saved step, or None (not verified; see `restore_latest`)."""
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, tree: Any, *, metadata: Optional[dict] = None) -> str:
    """Atomically write `step` (replacing an existing file), then prune; returns its path.

    Pruning keeps `step` and the `keep - 1` newest steps below it; steps above `step`
    (e.g. left by a run that is being redone) are never removed here.
    """
    path = self.path(step)
    save(path, tree, step=step, metadata=metadata)
    if self.keep is not None:
      older = [s for s in self.steps() if s < step]
      for s in older[:max(0, len(older) - (self.keep - 1))]:
        try:
          os.remove(self.path(s))
        except FileNotFoundError:
          pass
    return path

  def load(self, step: int, like: Any) -> tuple[Any, dict]:
    """`(tree, metadata)` of `step` (see module `load`)."""
    return load(self.path(step), like)

  def restore(self, step: int, like: Any) -> Any:
    """The tree of `step` in the structure and shardings of `like`."""
    return load(self.path(step), like)[0]

  def quarantine(self, step: int) -> Optional[str]:
    """Rename `step`'s file to `step_<step>.ckpt.corrupt[.n]` (kept, no longer listed)."""
    src = self.path(step)
    dst, n = src + ".corrupt", 0
    while os.path.exists(dst):
      n += 1
      dst = f"{src}.corrupt.{n}"
    try:
      os.replace(src, dst)
    except OSError:
      return None
    return dst

  def restore_latest(self, like: Any, *, quarantine: bool = False) -> Optional[Restored]:
    """The newest checkpoint that passes verification; None if the directory holds none.

    Checkpoints that fail (`CheckpointError`: truncated, corrupted, unreadable) are listed
    in `Restored.skipped` and, with `quarantine=True`, renamed by `quarantine` (never
    deleted); if all fail, `Restored.step` is None. A verified checkpoint that does not
    match `like` raises `ValueError`.
    """
    skipped = []
    for step in reversed(self.steps()):
      try:
        tree, metadata = self.load(step, like)
      except CheckpointError as e:
        reason = str(e)
        if quarantine:
          moved = self.quarantine(step)
          reason += f" (moved to {moved})" if moved else ""
        skipped.append((step, reason))
        continue
      return Restored(step, tree, metadata, skipped)
    return None if not skipped else Restored(None, None, {}, skipped)
