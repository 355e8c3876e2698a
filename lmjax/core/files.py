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
import socket
import sys
import tempfile

from lmjax.core import errors

LOCK_FILE = ".lmjax.lock"


class WorkdirInUse(errors.UserError):
  """Another live process holds the workdir's lock."""


def write_atomic(path: str, text) -> None:
  """Writes `text` (str as UTF-8, or any bytes-like object: bytes, a numpy array's memoryview) to
  `path` via a uniquely named temporary file in the same directory and one `os.replace`, so readers
  and concurrent writers never see a partial file."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
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
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "(no details written yet)"
      raise WorkdirInUse(
        f"workdir {workdir} is in use by another lmjax process: {holder}. Wait for it to finish (or stop "
        "it), "
        "or give this run its own --workdir."
      ) from None
    os.ftruncate(fd, 0)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    os.pwrite(
      fd,
      f"pid {os.getpid()} on {socket.gethostname()}, started {started}, command: "
      f"{' '.join(sys.argv)}\n".encode(),
      0,
    )
    yield
  finally:
    os.close(fd)  # closing the descriptor releases the lock
