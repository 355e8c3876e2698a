"""The run directory: who may write into it, how its files are written, and when a run is finished.

A workdir holds one run. Its owner (the process that holds `.lmjax.lock`) is the only writer, so
two commands started into one workdir never interleave metrics or checkpoints; the second one
refuses, naming the holder. Every small file (config.json, model.json, tokenizer.json, results)
is written through `write_atomic`: a reader sees the old or the new content, never a mix, and
two writers never share a temporary name.

A run is *finished* when it reached its `train.steps` and wrote `finished.json` for that step
count; an interrupted, failed or extended run is not. The sweep runner (and through its point
status, its results table and plots) and the scaling fit ask `is_finished`, so a preempted point is
never counted as a result.
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

from lmjax import errors

LOCK_FILE = ".lmjax.lock"
CONFIG_FILE = "config.json"
FINISHED_FILE = "finished.json"


class WorkdirInUse(errors.UserError):
  """Another live process holds the workdir's lock."""


def write_atomic(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` via a uniquely named temporary file in the same directory
  and one `os.replace`, so readers and concurrent writers never see a partial file."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json(path: str, value, **kwargs) -> None:
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
          f"workdir {workdir} is in use by another lmjax process: {holder}. Wait for it to finish (or stop it), "
          "or give this run its own --workdir.") from None
    os.ftruncate(fd, 0)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}, command: "
              f"{' '.join(sys.argv)}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # closing the descriptor releases the lock


def saved_config(workdir: str):
  """The ConfigDict saved in `<workdir>/config.json`, or None when there is none."""
  import ml_collections
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def write_config(cfg, workdir: str) -> None:
  write_atomic(os.path.join(workdir, CONFIG_FILE), cfg.to_json_best_effort(indent=2, sort_keys=True))


def mark_finished(workdir: str, steps: int, summary: dict) -> None:
  """Records that the run completed `steps` optimizer steps (its train.steps)."""
  write_json(os.path.join(workdir, FINISHED_FILE), {"steps": steps, **summary})


def clear_finished(workdir: str) -> None:
  """Removes the finished marker when the run trains again (extended, or restarted after its
  checkpoints were removed), so it does not vouch for steps not yet trained."""
  path = os.path.join(workdir, FINISHED_FILE)
  if os.path.exists(path):
    os.remove(path)


def is_finished(workdir: str, steps: int | None = None) -> bool:
  """True iff the run reached the train.steps its config.json asks for (an extended run is not),
  and, when given, `steps` (what the caller's config asks for now, e.g. a sweep whose experiment
  file raised train.steps since the run finished)."""
  path = os.path.join(workdir, FINISHED_FILE)
  cfg = saved_config(workdir) if os.path.exists(path) else None
  if cfg is None:
    return False
  with open(path, encoding="utf-8") as f:
    done = json.load(f).get("steps")
  return done == cfg.train.steps and (steps is None or done == steps)
