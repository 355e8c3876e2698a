"""Orbax checkpoints of the train state: async saves, keep-N, safe restore.

Safety rules (nothing good is ever lost):
- Orbax writes each step to a temporary directory and renames it when
  complete; old steps beyond `max_to_keep` are removed only after a newer one
  has been committed.
- A checkpoint that fails to restore (truncated, corrupted) is reported, moved
  aside to `<workdir>/corrupt_checkpoints/<step>` (not deleted), and the
  previous one is tried.
- The state is restored into whatever shardings the caller asks for, so a run
  can resume on another mesh.
"""
from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp
from absl import logging


def load_params(step_dir: str):
  """The params of one saved step (`<workdir>/checkpoints/<step>`), for inference."""
  item = os.path.join(os.path.abspath(step_dir), "default")
  if not os.path.isdir(item):
    raise FileNotFoundError(f"{step_dir} is not an lmjax checkpoint step directory (no 'default' item inside); "
                            "pass <workdir>/checkpoints/<step>")
  try:
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(item)
    tree = getattr(metadata, "item_metadata", metadata)
    # Restore onto this process's first device, whatever mesh or process count saved it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return checkpointer.restore(item, target)["params"]
  except Exception as err:
    raise ValueError(f"checkpoint {step_dir} could not be read ({type(err).__name__}: {str(err)[:200]}); it may be "
                     "truncated or corrupted: use an earlier step") from err


class Checkpointer:

  def __init__(self, workdir: str, max_to_keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.quarantine = os.path.join(os.path.abspath(workdir), "corrupt_checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True,
                                             create=True))

  def steps(self) -> list:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    """Starts an async save of `state` at `step` (waits for the previous save first)."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state):
    """(step, state) of the newest checkpoint that restores, or (None, None) when there is none.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with the target shardings.
    """
    for step in reversed(self.steps()):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        jax.block_until_ready(state)
        return step, state
      except Exception as err:  # any failure to read means this step cannot be trusted
        target = os.path.join(self.quarantine, str(step))
        logging.warning("checkpoint at step %d failed to restore (%s: %s); moved it to %s and trying the "
                        "previous one", step, type(err).__name__, str(err)[:300], target)
        print(f"WARNING: checkpoint at step {step} failed to restore ({type(err).__name__}); "
              f"moved to {target}, falling back to the previous checkpoint", flush=True)
        self._quarantine(step, target)
    return None, None

  def _quarantine(self, step: int, target: str) -> None:
    os.makedirs(self.quarantine, exist_ok=True)
    if os.path.exists(target):
      target = f"{target}.{len(os.listdir(self.quarantine))}"
    shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()
