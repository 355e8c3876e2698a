"""The training loop: runs (or resumes) an experiment in its workdir.

The loop dispatches steps without waiting for them; the host reads values back from the device only
at log, eval and checkpoint steps. The trainer receives its Task (tasks.prepare) and knows nothing
task-specific: batches, loss, weights and evaluators come from it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmjax import model, tasks
from lmjax.core import files, sharding
from lmjax.data import loader
from lmjax.run import config as config_lib, rundir
from lmjax.train import (
  metrics_log,
  preflight,
  state as state_lib,
  step as step_lib,
)


def _peak(tc, model_cfg) -> tuple:
  """(peak FLOP/s of all devices for MFU, or None; how it was found). Per device: train.peak_tflops,
  else the device's datasheet number, else measured when train.measure_peak asks for it, else none
  (MFU is then not reported); times the device count, as the logged tokens/s are the global batch's."""
  dtype = model_cfg.matmul_dtype or model_cfg.dtype
  device, count = jax.devices()[0].device_kind, jax.device_count()
  if tc.peak_tflops:
    peak, how = tc.peak_tflops * 1e12, "train.peak_tflops"
  elif (peak := model.datasheet_peak_flops(device, dtype)) is not None:
    how = f"{device} datasheet, {dtype}"
  elif tc.measure_peak:
    peak, how = model.measure_matmul_peak(dtype), f"measured now, {dtype} matmul"
  else:
    return (
      None,
      f"no datasheet peak for {device}: MFU not reported (set train.peak_tflops or train.measure_peak)",
    )
  return peak * count, f"MFU peak {peak / 1e12:.4g} TFLOP/s per device x {count} ({how})"


class Interrupted(Exception):
  """The run stopped on a signal after saving its current step; it is not finished."""

  def __init__(self, signal_name: str, step: int):
    super().__init__(
      f"{signal_name} received: saved step {step} and stopped; re-run the same command to resume"
    )
    self.signal_name, self.step = signal_name, step

  @property
  def exit_code(self) -> int:
    """128 + the signal number, the shell's status for a process a signal ended (143 for SIGTERM),
    so schedulers and sweep runners see a non-zero, retryable status."""
    return 128 + signal.Signals[self.signal_name].value


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (save, then raise Interrupted)."""

  def __init__(self):
    self.signal = None
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def agreed(self, at_sync_point: bool) -> str | None:
    """The signal to stop on, if any. One process decides at once; several processes stop only
    together, at steps they all reach (`at_sync_point`: log and checkpoint steps), since a process
    that stopped alone would wait forever in the checkpoint save the others never join."""
    if jax.process_count() == 1:
      return self.signal
    if not at_sync_point:
      return None
    mine = np.int32(signal.Signals[self.signal].value if self.signal else 0)
    first = int(np.max(multihost_utils.process_allgather(mine)))
    return signal.Signals(first).name if first else None

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def train(cfg, workdir: str) -> dict:
  """Runs (or resumes) the experiment `cfg` in `workdir`; returns the last logged metrics.

  Raises errors.ConfigError for bad values and for a workdir whose run was saved with another config
  (before anything is written), rundir.WorkdirInUse when another process trains in `workdir`, and
  Interrupted after saving when SIGTERM/SIGINT stopped the run early. A run that reaches train.steps
  writes `finished.json` last.
  """
  config_lib.validate(cfg)
  preflight.check_finetune_options(cfg)
  preflight.check_fields_used(cfg)
  preflight.check_logging(cfg)
  primary = jax.process_index() == 0
  with files.lock(workdir) if primary else contextlib.nullcontext():
    return _train(cfg, workdir, primary)


def _train(cfg, workdir: str, primary: bool) -> dict:
  saved_cfg = preflight.check_resume(cfg, workdir)
  tc = cfg.train
  mesh = preflight.mesh_for(cfg)  # a mesh that does not fit fails before any data is read
  task = tasks.prepare(cfg, workdir)
  preflight.check_sizes(cfg, task)
  model_cfg = task.model_cfg
  for warning in preflight.size_warnings(cfg, task, model.param_count(model_cfg)) if primary else ():
    print(f"warning: {warning}", file=sys.stderr, flush=True)
  lora = task.lora_scale is not None
  run = state_lib.setup(cfg, model_cfg, trainable=task.initial if lora else None, mesh=mesh)
  batch_sh, shardings = run.batch_sharding, run.shardings
  frozen, frozen_sh = None, None
  if task.frozen is not None:  # the frozen base shards like model params
    frozen_sh = sharding.logical_shardings(model.boxed_param_shapes(model_cfg), mesh, cfg.mesh.rules)
    frozen = jax.device_put(
      jax.tree.map(lambda x: np.asarray(x, model_cfg.param_dtype), task.frozen), frozen_sh
    )

  ckpt = rundir.checkpointer(workdir, tc.max_to_keep)
  try:
    start_step, state = ckpt.restore_latest(run.abstract)
  except BaseException:
    ckpt.close()
    raise
  if state is None:
    start_step, state = 0, state_lib.init_state(model_cfg, run.optimizer, cfg.seed, shardings, task.initial)
  if primary:  # only now, with every check passed and the checkpoint restored, does the run write
    rundir.write_config(cfg, workdir)
    task.save(workdir)
    if start_step < tc.steps:
      rundir.clear_finished(workdir)
  step_args = dict(
    frozen_shardings=frozen_sh, model_params=task.model_params, rules=cfg.mesh.rules, loss=task.loss
  )
  train_step = step_lib.make_train_step(
    model_cfg, run.optimizer, run.schedule, cfg.seed, tc.grad_accum, shardings, batch_sh, **step_args
  )
  eval_step = step_lib.make_eval_step(model_cfg, shardings.params, batch_sh, **step_args)

  def place(local):  # this process's rows -> the global batch on the mesh
    return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}

  def global_batch(make, index):
    return place(make(index, jax.process_index(), jax.process_count()))

  def evaluate(params) -> float:  # token-weighted over all eval batches, like one big batch
    sums = jax.device_get(
      [eval_step(params, global_batch(task.val_batch, i), frozen) for i in range(tc.eval_steps)]
    )
    return float(sum(s for s, _ in sums) / max(sum(w for _, w in sums), 1.0))

  tokens_per_step = tc.batch_size * (task.tokens_per_row or tc.seq_len)  # padding is not throughput
  trainable = sum(x.size for x in jax.tree.leaves(state.params))
  flops_per_token = model.train_flops_per_token(model_cfg, tc.seq_len, trainable if lora else None)
  peak, peak_text = _peak(tc, model_cfg)
  wandb_options = dict(cfg.logging, config=cfg.to_dict()) if cfg.logging.wandb else None
  log = metrics_log.MetricsLogger(workdir, tc.steps, start_step, enabled=primary, wandb_options=wandb_options)
  log.info(
    f"model: {model.param_count(model_cfg):,} parameters, {flops_per_token / 1e6:.2f} MFLOPs/token"
    + (f", training {trainable:,} LoRA parameters" if lora else "")
    + f"; data: {task.train_tokens:,} train / {task.val_tokens:,} val tokens"
    + (
      f" ({task.tokens_per_row:.1f} tokens per row of {tc.seq_len}: tokens/s and MFU skip padding)"
      if task.tokens_per_row
      else ""
    )
    + ", vocab "
    f"{task.tokenizer.vocab_size}; mesh {dict(mesh.shape)}; {peak_text}; "
    + (f"resumed from step {start_step}" if start_step else "starting at step 0")
  )
  if start_step and saved_cfg is not None:
    note = preflight.schedule_change_note(saved_cfg, cfg, start_step)
    if note:
      log.info(note)
  evaluated = (
    _run_evaluators(task, state.params, frozen, workdir, "before", 0, primary) if not start_step else {}
  )
  if evaluated:
    log.write(0, evaluated)

  def check_health(state):
    bad = int(jax.device_get(state.first_bad_step))
    if bad >= 0:
      saved = ckpt.steps()
      raise FloatingPointError(
        f"the loss or gradient became NaN/Inf at step {bad + 1}; stopping. The last good checkpoint "
        f"({'step ' + str(saved[-1]) if saved else 'none yet'}) is kept in {ckpt.directory}. These "
        "settings define the experiment, so try again in a new --workdir: lower optim.lr, raise "
        "optim.warmup_steps, tighten optim.grad_clip, or compute in float32 (model.dtype='float32' "
        "with model.matmul_dtype unset)."
      )

  # Batches are made ahead on background threads (Grain), so the step never waits on data.
  train_batches = loader.prefetch(
    task.train_batch, start_step, tc.steps, jax.process_index(), jax.process_count()
  )
  stop = _StopRequest()
  metrics, last_saved, stopping = {}, start_step, None
  window_start, window_steps = time.perf_counter(), 0
  try:
    for step in range(start_step, tc.steps):
      if stopping:
        check_health(state)
        log.info(f"{stopping} received: saving step {step} and exiting")
        if step != last_saved:  # the signal may follow a regular save of this step
          ckpt.save(step, state)
        ckpt.wait()
        raise Interrupted(stopping, step)
      state, step_metrics = train_step(state, place(next(train_batches)), frozen)
      window_steps += 1
      if step == start_step:  # keep compilation out of the throughput numbers
        jax.block_until_ready(state)
        log.info(f"first step (compilation included) took {time.perf_counter() - window_start:.1f} s")
        window_start, window_steps = time.perf_counter(), 0
      done = step + 1
      eval_now = done % tc.eval_every == 0 or done == tc.steps
      log_now = done % tc.log_every == 0 or eval_now
      if log_now:
        metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        check_health(state)
        elapsed = time.perf_counter() - window_start
        metrics["tokens_per_sec"] = window_steps * tokens_per_step / elapsed if window_steps else 0.0
        if peak:
          metrics["mfu"] = model.mfu(metrics["tokens_per_sec"], flops_per_token, peak)
        if eval_now:
          metrics["val_loss"] = evaluate(state.params)
          metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 700))
        log.write(done, metrics)  # before the save: a checkpoint never lacks its step's record
        window_start, window_steps = time.perf_counter(), 0
      if done % tc.ckpt_every == 0 or done == tc.steps:
        check_health(state)
        ckpt.save(done, state)  # asynchronous: the evaluators below run while it writes
        last_saved = done
      due = "step" if done < tc.steps else "after"
      if evaluated := _run_evaluators(task, state.params, frozen, workdir, due, done, primary):
        log.write(done, evaluated)  # a second record of the step (read_metrics merges them)
        metrics = {**metrics, **evaluated}
        window_start, window_steps = time.perf_counter(), 0  # evaluation time is not throughput
      stopping = stop.agreed(at_sync_point=done % tc.log_every == 0 or done % tc.ckpt_every == 0)
    if start_step >= tc.steps:  # a finished run re-started: end-of-run evaluators not on record run
      on_record = metrics_log.evaluator_names(workdir, tc.steps) if primary else set()
      evaluated = _run_evaluators(task, state.params, frozen, workdir, "after", tc.steps, primary, on_record)
      if evaluated:
        log.write(tc.steps, evaluated)
    ckpt.wait()
  finally:
    stop.restore()
    ckpt.close()
    log.close()
  if primary:
    reference = cfg.reference if config_lib.reference_applies(cfg) else None
    metrics_log.plot_loss(workdir, reference)
    # From metrics.jsonl, not `metrics`: a finished run re-started has no new validation loss.
    records = metrics_log.read_metrics(workdir)
    evals = [r for r in records if "val_loss" in r]
    if evals and reference:
      print(
        f"final val loss {evals[-1]['val_loss']:.4f} at step {evals[-1]['step']}; reference "
        f"{cfg.reference.val_loss} at step {cfg.reference.step} ({cfg.reference.source})",
        flush=True,
      )
    summary = {"val_loss": evals[-1]["val_loss"]} if evals else {}
    if final := metrics_log.evaluator_values(records):
      summary["evals"] = final
      print("final evaluations: " + metrics_log.format_values(final), flush=True)
    rundir.mark_finished(workdir, tc.steps, summary)
  return metrics


def _run_evaluators(
  task, trainable, frozen, workdir: str, when: str, step: int, primary: bool, skip=frozenset()
) -> dict:
  """Runs the task's evaluators due at `when`: "before" (step 0 of a fresh run), "after" (the end),
  or "step" (during training: those whose `every` divides `step`), except those named in `skip`;
  returns their numbers, {"NAME/metric": value} ({} on processes other than 0).

  Parameters sharded across processes (FSDP, TP) cannot be read or run by one process alone, so
  every process takes part in gathering the weights (a collective); then process 0 evaluates on
  its own devices.
  """
  if when == "step":
    due = [e for e in task.evaluators if e.every and step % e.every == 0]
  else:
    due = [e for e in task.evaluators if when in e.when]
  if not due:
    return {}
  if jax.process_count() > 1:
    trainable, frozen = multihost_utils.process_allgather((trainable, frozen), tiled=True)
  evaluated = {}
  if primary:
    params = task.model_params(trainable, frozen)
    for evaluator in (e for e in due if e.name not in skip):  # skip: decided on process 0 only
      evaluated.update(evaluator(params, workdir, when, step))
  return evaluated
