"""The run directory's one owner: what describes a run (its config, architecture, tokenizer,
checkpoints and finished marker) is written and read here. Logs and results (metrics.jsonl,
TensorBoard, loss.png, samples, task_eval, lm_eval_NAME) are written by their producers
(train/metrics_log.py, tasks/evaluators.py) through core/files.py.

    <workdir>/config.json        the experiment config the run was started with (write_config)
    <workdir>/model.json         its architecture, and for fine-tuning the exact base it started from
    <workdir>/tokenizer.json     (+ tokenizer.model / tokenizer_hf.json) the run's tokenizer
    <workdir>/checkpoints/STEP/  Orbax checkpoints (run.checkpoint)
    <workdir>/finished.json      written last, when the run reached its train.steps
    <workdir>/.lmjax.lock        held by the process that trains in it (core.files.lock)

A run is *finished* when it reached its `train.steps` and wrote `finished.json` for that step
count; an interrupted, failed or extended run is not. The sweep runner (and through its point
status, its results table and plots) and the scaling fit ask `is_finished`, so a preempted point is
never counted as a result.

Runs written before model.json existed for pretraining runs are read by deriving the architecture
from config.json and the tokenizer's vocabulary (the rule `config.model_config` applies).
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from lmjax.core import errors, files
from lmjax.data import tokenizers
from lmjax.model import ModelConfig
from lmjax.run import checkpoint, config as config_lib

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
FINISHED_FILE = "finished.json"


class NoCheckpoint(errors.UserError, FileNotFoundError):
  """The run has no checkpoint (or not the step asked for)."""


def checkpoint_dir(workdir: str, step: int) -> str:
  """`<workdir>/checkpoints/<step>`."""
  return os.path.join(workdir, "checkpoints", str(step))


def steps(workdir: str) -> list:
  """The run's checkpointed steps, ascending."""
  return checkpoint.step_dirs(workdir)


def checkpointer(workdir: str, max_to_keep: int) -> checkpoint.Checkpointer:
  """The Orbax manager that saves and restores the run's train state."""
  return checkpoint.Checkpointer(workdir, max_to_keep)


def load_params(workdir: str, step: int | None = None):
  """The params of checkpoint `step` (default: the latest) on the default device.

  Raises NoCheckpoint when the run has no checkpoint (or not that step)."""
  saved = steps(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not saved:
    raise NoCheckpoint(
      f"no checkpoints in {ckpt_dir}; train first: "
      f"lmjax-train --config=experiments/NAME.py --workdir={workdir}"
    )
  if step is not None and step not in saved:
    raise NoCheckpoint(f"no checkpoint for step {step} in {ckpt_dir}; available: {saved}")
  return checkpoint.load_params(checkpoint_dir(workdir, saved[-1] if step is None else step))


def split_step_dir(path: str) -> tuple:
  """(workdir, step) for `RUN/checkpoints/STEP`, else (path, None): a run and its latest step."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  if os.path.basename(path).isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent), int(os.path.basename(path))
  return path, None


def is_run(path: str) -> bool:
  """Whether `path` is an lmjax run directory (or one of its checkpoint steps): it has checkpoints,
  model.json or the lock every run takes (a Hugging Face directory has none of them)."""
  workdir, _ = split_step_dir(path)
  return any(
    os.path.exists(os.path.join(workdir, name)) for name in ("checkpoints", MODEL_FILE, files.LOCK_FILE)
  )


def save_tokenizer(workdir: str, tokenizer) -> None:
  """Writes the run's tokenizer (tokenizer.json, plus its model file) into `workdir`."""
  tokenizer.save(workdir)


def has_tokenizer(workdir: str) -> bool:
  """Whether `workdir` holds a saved tokenizer."""
  return os.path.exists(os.path.join(workdir, tokenizers.SPEC_FILE))


def load_tokenizer(workdir: str):
  """The tokenizer saved in `workdir` (data.tokenizers.load)."""
  return tokenizers.load(workdir)


def write_model(
  workdir: str,
  model_cfg: ModelConfig,
  *,
  init: dict | None = None,
  base: dict | None = None,
  lora_scale: float | None = None,
) -> None:
  """model.json: the architecture the run trains (for fine-tuning: its source's, not cfg.model), and
  for fine-tuning the init fields and the exact base weights it started from (`base`: the origin of
  pretrained.load_init) and the LoRA scale (None: full weights)."""
  spec = {"model": dataclasses.asdict(model_cfg), "lora_scale": lora_scale}
  if init is not None:
    spec.update(init=init, base=base)
  files.write_json(os.path.join(workdir, MODEL_FILE), spec)


def read_model(workdir: str) -> tuple:
  """(ModelConfig, spec): the run's architecture and its model.json (spec {} for runs that predate
  model.json, whose architecture follows from config.json and the saved tokenizer)."""
  path = os.path.join(workdir, MODEL_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
    return ModelConfig(**spec["model"]), spec
  cfg = saved_config(workdir)
  if cfg is None:
    raise errors.UserError(f"{workdir} is not an lmjax run: it has neither {MODEL_FILE} nor {CONFIG_FILE}")
  return config_lib.model_config(cfg, load_tokenizer(workdir).vocab_size), {}


def saved_config(workdir: str):
  """The ConfigDict saved in `<workdir>/config.json`, or None when there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def write_config(cfg, workdir: str) -> None:
  """config.json: the experiment config the run was started with (atomic)."""
  files.write_atomic(os.path.join(workdir, CONFIG_FILE), cfg.to_json_best_effort(indent=2, sort_keys=True))


def mark_finished(workdir: str, steps: int, summary: dict) -> None:
  """Records that the run completed `steps` optimizer steps (its train.steps)."""
  files.write_json(os.path.join(workdir, FINISHED_FILE), {"steps": steps, **summary})


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
