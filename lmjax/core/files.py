"""Files a run writes: atomic writes, and the lock that makes one process a directory's only writer.

Every small file (config.json, model.json, tokenizer.json, results) is written through
`write_atomic`: a reader sees the old or the new content, never a mix, and two writers never share
a temporary name. `lock` holds `.lmjax.lock` (an exclusive flock) in a run or sweep directory, so
two commands started into one directory never interleave their files; the second one refuses,
naming the holder.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import secrets
import socket
import sys

from lmjax.core import errors

LOCK_FILE = ".lmjax.lock"


class WorkdirInUse(errors.UserError):
  """Another live process holds the workdir's lock."""


def write_atomic(path: str, text) -> None:
  """Writes `text` (str as UTF-8, or any bytes-like object: bytes, a numpy array's memoryview) to
  `path` via a uniquely named temporary file in the same directory and one `os.replace`, so readers
  and concurrent writers never see a partial file. The temporary file is created with mode 0o666, as
  open() creates files, so the kernel applies the process's umask (mkstemp's own 0600 hid exports and
  runs from other users; reading the umask instead means setting it, a race with other threads)."""
  fd, tmp = _create_unique(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(text.encode("utf-8") if isinstance(text, str) else text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def _create_unique(directory: str, prefix: str) -> tuple[int, str]:
  """(fd, path) of a new empty file `directory/prefix<random>.tmp`, opened for writing with O_EXCL.
  Raises FileExistsError after os.TMP_MAX names taken (as tempfile gives up)."""
  for _ in range(os.TMP_MAX):
    tmp = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}.tmp")
    try:
      return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
    except FileExistsError:
      continue
  raise FileExistsError(f"no free temporary name {prefix}*.tmp in {directory}")


def write_json(path: str, value, **kwargs) -> None:
  """`value` as indented UTF-8 JSON (non-ASCII kept) at `path`, written atomically (`write_atomic`)."""
  write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False, **kwargs) + "\n")


@contextlib.contextmanager
def lock(workdir: str):
  """Holds `<workdir>/.lmjax.lock` (an exclusive `flock`) for the body; the kernel releases it when
  the process dies, so a killed run never leaves a stale lock behind.

  Raises WorkdirInUse, naming the holder's pid, host, start time and command, when another
  process holds it.
  """
  os.makedirs(workdir, exist_ok=True)
  with _held(os.path.join(workdir, LOCK_FILE)) as (acquire, holder):
    if not acquire(block=False):
      raise WorkdirInUse(
        f"workdir {workdir} is in use by another lmjax process: {holder()}. Wait for it to finish (or "
        "stop it), or give this run its own --workdir."
      )
    yield


@contextlib.contextmanager
def waiting_lock(path: str, what: str):
  """Holds the `flock` at `path` for the body, waiting for another process that holds it; while it
  waits it says so once on stderr, naming `what` is locked and the holder (pid, host, start time,
  command), so a run blocked behind another's preparation is never silent."""
  with _held(path) as (acquire, holder):
    if not acquire(block=False):
      print(f"waiting for {what}: held by {holder()}", file=sys.stderr, flush=True)
      acquire(block=True)
    yield


@contextlib.contextmanager
def _held(path: str):
  """(acquire(block) -> bool, holder() -> str) over the lock file `path`; a successful acquire writes
  this process's pid, host, start time and command into it. Closing releases the lock."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

  def acquire(block: bool) -> bool:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
      return False
    os.ftruncate(fd, 0)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    line = f"pid {os.getpid()} on {socket.gethostname()}, started {started}, command: {' '.join(sys.argv)}\n"
    os.pwrite(fd, line.encode(), 0)
    return True

  def holder() -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "(no details written yet)"

  try:
    yield acquire, holder
  finally:
    os.close(fd)  # closing the descriptor releases the lock
