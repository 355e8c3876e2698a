"""Where a run's metrics go: metrics.jsonl, TensorBoard events, the console, loss.png, and Weights &
Biases when the config asks for it.

Only process 0 writes (the others get a logger that prints nothing), so a
multi-host run leaves one copy of everything in its workdir.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

from lmjax.core import files

WANDB_ID_FILE = "wandb_id.txt"  # in the workdir: the W&B run a resumed run continues
# Evaluators' numbers are logged as "NAME/metric" (tasks/evaluators.py); the trainer's own have no "/".
EVALUATOR_SEPARATOR = "/"


class MetricsLogger:
  """Writes metrics.jsonl, TensorBoard events and console lines on process 0 (a silent logger elsewhere).

  `wandb_options`: the config's logging block plus `config` (the run's whole config, shown in W&B),
  or None for no W&B run. The run's id is kept in WANDB_ID_FILE, so a resumed run logs into the same
  W&B run; its files go to <workdir>/wandb (with WANDB_MODE=offline, all of it, for `wandb sync`).
  W&B keeps the first value logged at a step: the steps a resumed run repeats (after its last
  checkpoint) keep the earlier attempt's values there, while metrics.jsonl keeps the new ones.
  """

  def __init__(
    self, workdir: str, total_steps: int, start_step: int, enabled: bool = True, wandb_options=None
  ):
    self.enabled = enabled
    self._wandb = None
    self.total_steps, self.start_step = total_steps, start_step
    self.tty = sys.stdout.isatty()
    self._start_time = time.time()
    if enabled:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow

      path = os.path.join(workdir, "metrics.jsonl")
      drop_records_after(path, start_step)
      self._jsonl = open(path, "a", encoding="utf-8")
      # purge_step: TensorBoard hides events at or after it that an earlier attempt wrote
      self._tb = SummaryWriter(
        os.path.join(workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None
      )
      if wandb_options:
        self._wandb = _wandb_run(workdir, wandb_options)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in metrics.items():
      self._tb.add_scalar(key, float(value), step)
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
    self._console(step, record)

  def _console(self, step: int, record: dict) -> None:
    evaluated = {k: v for k, v in record.items() if EVALUATOR_SEPARATOR in k}
    if evaluated:
      print(("\n" if self.tty else "") + f"step {step} evaluators: " + format_values(evaluated), flush=True)
    if "loss" not in record:  # an evaluation between logging steps
      return
    elapsed = time.time() - self._start_time
    done = step - self.start_step
    eta = elapsed / done * (self.total_steps - step) if done > 0 else 0.0
    text = f"step {step}/{self.total_steps}  loss {record['loss']:.4f}"
    if "val_loss" in record:
      text += f"  val_loss {record['val_loss']:.4f}  val_ppl {record['val_ppl']:.2f}"
    if "tokens_per_sec" in record:
      text += f"  {record['tokens_per_sec']:.0f} tok/s"
    if "mfu" in record:
      text += f"  mfu {100 * record['mfu']:.1f}%"
    text += f"  eta {eta:.0f}s"
    # On a terminal the progress line rewrites itself; eval lines stay. Piped output gets plain lines.
    end = "\n" if not self.tty or "val_loss" in record or step == self.total_steps else ""
    print(("\r" if self.tty else "") + text, end=end, flush=True)

  def info(self, text: str) -> None:
    if self.enabled:
      print(("\n" if self.tty else "") + text, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
    if self._wandb is not None:  # called from the loop's `finally`: an exception marks the run failed
      self._wandb.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)


def format_values(values: dict) -> str:
  """ "name value, ..." with values to 4 significant digits (console lines)."""
  return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def evaluator_names(workdir: str, step: int) -> set:
  """The NAMEs of the evaluators whose numbers metrics.jsonl holds at `step`."""
  at_step = [r for r in read_metrics(workdir) if r["step"] == step]
  return {k.split(EVALUATOR_SEPARATOR)[0] for r in at_step for k in r if EVALUATOR_SEPARATOR in k}


def evaluator_values(records: list) -> dict:
  """{"NAME/metric": value} of the evaluators' latest numbers in `records` (read_metrics order)."""
  latest = {}
  for record in records:
    latest.update({k: v for k, v in record.items() if EVALUATOR_SEPARATOR in k})
  return latest


def _wandb_run(workdir: str, options: dict):
  """Starts (or, with the id saved in the workdir, continues) the run's W&B run."""
  import wandb

  id_path = os.path.join(workdir, WANDB_ID_FILE)
  if os.path.exists(id_path):
    with open(id_path, encoding="utf-8") as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:12]  # W&B ids are [a-z0-9]
    files.write_atomic(id_path, run_id + "\n")
  return wandb.init(
    project=options["wandb_project"],
    entity=options["wandb_entity"] or None,
    name=options["wandb_name"] or os.path.basename(os.path.abspath(workdir)),
    id=run_id,
    resume="allow",
    dir=workdir,
    config=options["config"],
  )


def drop_records_after(path: str, step: int) -> None:
  """Removes records of steps after `step` (the checkpoint a run resumes from): an interrupted
  attempt logged them, the resumed run logs them again, and each step should appear once."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = [json.dumps(r) + "\n" for r in _records(lines) if r["step"] <= step]
  if kept != lines:
    files.write_atomic(path, "".join(kept))


def _records(lines) -> list:
  """The parsed records; a line a killed process left half-written is skipped, not fatal."""
  records = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and "step" in record:
      records.append(record)
  return records


def read_metrics(workdir: str) -> list:
  """All records of metrics.jsonl; for a step logged twice (a resumed run), the last one."""
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for record in _records(f):
      by_step.setdefault(record["step"], {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def val_losses(workdir: str) -> dict:
  """{step: validation loss} of the run's metrics.jsonl ({} when it has none yet)."""
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return {}
  return {r["step"]: r["val_loss"] for r in read_metrics(workdir) if "val_loss" in r}


def plot_loss(workdir: str, reference=None) -> str:
  """Train and validation loss against step, saved as workdir/loss.png.

  `reference`: a config's `reference` block (step, val_loss, source), drawn as a star.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(workdir)
  fig, ax = plt.subplots(figsize=(7, 4))
  for key, label in (("loss", "train"), ("val_loss", "validation")):
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
      ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, label=label)
  if reference and reference.val_loss:
    ax.plot(
      [reference.step],
      [reference.val_loss],
      "*",
      markersize=12,
      color="black",
      label=f"reference: {reference.source or 'published'} ({reference.val_loss})",
    )
  ax.set(
    xlabel="step", ylabel="cross-entropy loss (nats/token)", title=os.path.basename(os.path.abspath(workdir))
  )
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, "loss.png")
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path
