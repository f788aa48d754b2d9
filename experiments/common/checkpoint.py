"""Run-level safety around the library checkpoints: one writer per workdir, config diffs.

The checkpoint files themselves are `fedjax_compress.checkpoint` (verified, atomic,
keep-last-N); this module adds what only a run directory needs:

  - `WorkdirLock(workdir)`: an exclusive `fcntl.flock` on `<workdir>/.lock`. The kernel drops
    the lock when its process exits, however it dies (kill -9 included), so a lock left by a
    dead process never blocks a rerun; a second live writer gets `WorkdirBusy` naming the
    holder's pid. The file is never deleted (deleting it would let two processes lock two
    different inodes of the same name).
  - `WorkdirError`: the workdir cannot be resumed safely as it is (the message says why and
    what to do); raised before anything in it is changed.
  - `config_diff(old, new)`: the dotted names of the fields that differ, ignoring `rounds`
    (the one field a resumed run may change).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Optional

try:
  import fcntl
except ImportError:  # pragma: no cover - not POSIX
  fcntl = None

LOCK_NAME = ".lock"


class WorkdirError(RuntimeError):
  """The workdir's contents prevent a safe run (e.g. no checkpoint verifies); nothing changed."""


class WorkdirBusy(WorkdirError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """Exclusive lock on a run directory for the duration of a `with` block (see module)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    """Take the lock or raise `WorkdirBusy`; records this pid and host in the lock file."""
    if self._fd is not None:
      raise RuntimeError(f"{self.path} is already held by this WorkdirLock")
    if fcntl is None:  # pragma: no cover
      print(f"experiments: no fcntl on this platform; {self.path} is not locked",
            file=sys.stderr)
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").split()
      os.close(fd)
      who = f"process {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
      raise WorkdirBusy(
          f"{os.path.dirname(self.path)} is in use by {who} (lock {self.path}); two runs "
          "must not write one workdir: wait for it to finish, stop it, or use another "
          "--workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    """Drop the lock (the file stays)."""
    if self._fd is not None:
      try:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
      finally:
        os.close(self._fd)
        self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc: Any) -> None:
    self.release()


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
  """Dotted names of differing fields of two plain (JSON) configs; top-level `rounds` ignored."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      if not prefix and k == "rounds":
        continue
      name = f"{prefix}{k}"
      if k not in old or k not in new:
        out.append(name)
      else:
        out.extend(config_diff(old[k], new[k], name + "."))
    return out
  return [] if old == new else [prefix.rstrip(".") or "<config>"]
