"""Orbax checkpoints of the train state: async saves, keep-N, safe restore.

Safety rules (nothing good is ever lost):
- Orbax writes each step to a temporary directory and renames it when
  complete; old steps beyond `max_to_keep` are removed only after a newer one
  has been committed.
- A checkpoint whose parameters have other shapes than the run asks for is a
  config mismatch, not corruption: restoring stops with CheckpointMismatch and
  nothing is moved.
- A step that fails to restore while an older one restores (truncated,
  corrupted) is reported and moved aside to `<workdir>/corrupt_checkpoints/<step>`
  (not deleted). When no step restores, the cause is more likely the machine
  (memory, devices) than every checkpoint at once: restoring stops with
  CheckpointUnreadable and nothing is moved.
- Paths are taken literally. Orbax globs inside the checkpoint directory (the
  per-process OCDBT merge) and tensorstore reads a backslash as a separator, so
  a workdir named `run [v1]` would save steps that cannot be restored; such a
  directory is handed to Orbax as `/proc/self/fd/N` of an open descriptor.
- The state is restored into whatever shardings the caller asks for, so a run
  can resume on another mesh.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from lmjax.core import errors

_GLOB_OR_SEPARATOR = set("[]*?\\")


class CheckpointMismatch(errors.ConfigError):
  """A saved step holds parameters of other names or shapes than the config builds."""


class CheckpointUnreadable(errors.UserError):
  """The run has checkpoints and none of them restores."""


class _LiteralDir:
  """A directory path that Orbax and tensorstore read literally (see the module docstring)."""

  def __init__(self, directory: str):
    self.real = os.path.abspath(directory)
    self._fd = None
    self.path = self.real
    if _GLOB_OR_SEPARATOR & set(self.real):
      if not os.path.isdir("/proc/self/fd"):
        raise errors.UserError(
          f"{self.real}: checkpoint paths containing any of '[', ']', '*', '?', '\\' are only "
          "supported on Linux; rename the directory"
        )
      self._fd = os.open(self.real, os.O_RDONLY | os.O_DIRECTORY)
      self.path = f"/proc/self/fd/{self._fd}"

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def step_dirs(workdir: str) -> list:
  """The saved steps of a run (`<workdir>/checkpoints/<step>` directories), ascending."""
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def fingerprint(params) -> str:
  """SHA-256 over a parameter tree's paths, dtypes, shapes and bytes: the identity of a set of weights."""
  digest = hashlib.sha256()
  for path, leaf in sorted(
    jax.tree_util.tree_flatten_with_path(params)[0], key=lambda pl: jax.tree_util.keystr(pl[0])
  ):
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape};".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def load_params(step_dir: str):
  """The params of one saved step (`<workdir>/checkpoints/<step>`), for inference: restored without the
  optimizer state onto the default device. Raises FileNotFoundError when the step holds no state."""
  if not os.path.isdir(os.path.join(step_dir, "default")):
    raise FileNotFoundError(
      f"{step_dir} is not an lmjax checkpoint step directory (no 'default' item inside); "
      "pass <workdir>/checkpoints/<step>"
    )
  literal = _LiteralDir(step_dir)
  try:
    item = os.path.join(literal.path, "default")
    checkpointer = ocp.StandardCheckpointer()
    tree = _saved_tree(item)
    # Restore onto this process's first device, whatever mesh or process count saved it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return checkpointer.restore(item, target)["params"]
  except Exception as err:
    raise ValueError(
      f"checkpoint {step_dir} could not be read ({type(err).__name__}: {str(err)[:200]}); it may be "
      "truncated or corrupted: use an earlier step"
    ) from err
  finally:
    literal.close()


def _saved_tree(item: str) -> dict:
  """The array metadata (shape, dtype) tree saved in a StandardSave item directory, without data. Read by
  the item's handler: a StandardCheckpointer would look for the step's _CHECKPOINT_METADATA inside the
  item (a CheckpointManager keeps it one level up) and warn on every load that it is missing."""
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(item))
  return getattr(metadata, "tree", metadata)


def _shapes(tree) -> dict:
  """{'blocks/attn/wq': shape, ...} of a params tree (nested dicts, saved or abstract)."""
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


class Checkpointer:
  """Saves the train state every few steps (async, keep the newest `max_to_keep`) and restores the latest
  step that reads, by the rules in the module docstring."""

  def __init__(self, workdir: str, max_to_keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.quarantine = os.path.join(os.path.abspath(workdir), "corrupt_checkpoints")
    os.makedirs(self.directory, exist_ok=True)
    self._literal = _LiteralDir(self.directory)
    self._manager = ocp.CheckpointManager(
      self._literal.path,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=True, create=True
      ),
    )

  def steps(self) -> list:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    """Starts an async save of `state` at `step` (waits for the previous save first)."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state):
    """(step, state) of the newest checkpoint that restores, or (None, None) when there is none.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with the target shardings. Raises
    CheckpointMismatch, moving nothing, when a step's parameters have other shapes than
    `abstract_state.params`. Steps newer than the one restored that failed are quarantined; if no
    step restores, raises CheckpointUnreadable and moves nothing.
    """
    failed = []
    for step in reversed(self.steps()):
      try:
        saved_tree = _saved_tree(os.path.join(self._literal.path, str(step), "default"))
        saved_tree["params"]  # noqa: B018 (a step without params is not a train state)
      except Exception as err:  # no readable metadata
        failed.append((step, err))
        continue
      self._check_shapes(step, saved_tree, abstract_state)
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        jax.block_until_ready(state)
      except Exception as err:  # the metadata matched, the data did not read
        failed.append((step, err))
        continue
      for bad_step, err in failed:
        self._quarantine(bad_step, err)
      return step, state
    if failed:
      causes = "\n  ".join(f"step {s}: {type(e).__name__}: {str(e)[:200]}" for s, e in failed)
      raise CheckpointUnreadable(
        f"no checkpoint in {self.directory} restores:\n  {causes}\nNothing was moved. If the error is about "
        "memory or devices, fix that and re-run; if the checkpoints are damaged, move them aside to start "
        "this run over."
      )
    return None, None

  def _check_shapes(self, step: int, saved_tree, abstract_state) -> None:
    saved, wanted = _shapes(saved_tree["params"]), _shapes(abstract_state.params)
    if saved == wanted:
      return
    differences = [
      f"{k}: saved {saved.get(k, 'absent')}, this config {wanted.get(k, 'absent')}"
      for k in sorted(set(saved) | set(wanted))
      if saved.get(k) != wanted.get(k)
    ]
    raise CheckpointMismatch(
      f"checkpoint step {step} in {self.directory} holds parameters of other names or shapes than this "
      "config "
      f"builds ({len(differences)} differ):\n  "
      + "\n  ".join(differences[:10])
      + "\nNothing was moved or changed. Resume with the config the run was saved with (its config.json), "
      "or start this config in a new --workdir."
    )

  def _quarantine(self, step: int, err: Exception) -> None:
    os.makedirs(self.quarantine, exist_ok=True)
    target = os.path.join(self.quarantine, str(step))
    if os.path.exists(target):
      target = f"{target}.{len(os.listdir(self.quarantine))}"
    logging.warning(
      "checkpoint at step %d failed to restore (%s: %s); moved it to %s and using an earlier one",
      step,
      type(err).__name__,
      str(err)[:300],
      target,
    )
    print(
      f"WARNING: checkpoint at step {step} failed to restore ({type(err).__name__}); "
      f"moved to {target}, falling back to the previous checkpoint",
      flush=True,
    )
    if jax.process_index() == 0:  # one mover; the others wait for it before re-listing the steps
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"lmjax_quarantine_{step}")
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()
    self._literal.close()
