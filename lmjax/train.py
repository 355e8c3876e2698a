"""Train state, optimizer, compiled train/eval steps and the training loop.

The loop dispatches steps without waiting for them; the host reads values
back from the device only at log, eval and checkpoint steps.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.experimental import multihost_utils

from lmjax import (checkpoint, config as config_lib, flops, losses, metrics_log, model, preflight,
                   rundir, run_outputs, sharding, sources)

# Parameters that get weight decay: the matrices. Norm scales and biases do not.
_DECAYED = {"embedding", "lm_head", "pos_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  first_bad_step: jax.Array  # first step whose loss or gradient was NaN/Inf; -1 if none


def _param_name(path) -> str:
  return next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))


class Interrupted(Exception):
  """The run stopped on a signal after saving its current step; it is not finished."""

  def __init__(self, signal_name: str, step: int):
    super().__init__(f"{signal_name} received: saved step {step} and stopped; re-run the same command to resume")
    self.signal_name, self.step = signal_name, step

  @property
  def exit_code(self) -> int:
    """128 + the signal number, the shell's status for a process a signal ended (143 for SIGTERM),
    so schedulers and sweep runners see a non-zero, retryable status."""
    return 128 + signal.Signals[self.signal_name].value


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup and cosine decay to `min_lr`, after global-norm clipping.

  The decay spans `optim.decay_steps` (0 or absent: `total_steps`); after it the rate stays at min_lr,
  so a finished run extended to more steps can keep its original schedule.
  """
  decay_steps = optim_cfg.get("decay_steps") or total_steps
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=max(decay_steps, optim_cfg.warmup_steps + 1), end_value=optim_cfg.min_lr)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: _param_name(p) in _DECAYED, params)
  optimizer = optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip),
      optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  return optimizer, schedule


def state_shardings(model_cfg, optimizer, mesh, rules, trainable=None):
  """Abstract train state (shapes) and its shardings.

  Model params shard by their logical axis names; a `trainable` tree of another shape (LoRA
  adapters, small) is replicated.
  """
  params = model.boxed_param_shapes(model_cfg) if trainable is None else trainable
  boxed = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p),
                                              jnp.zeros((), jnp.int32)), params)
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def init_state(model_cfg, optimizer, seed: int, shardings, params=None) -> TrainState:
  """A fresh state: newly initialised params, or the given ones (fine-tuning)."""
  def init(params):
    if params is None:
      params = model.init_params(model_cfg, jax.random.key(seed))
    params = jax.tree.map(lambda x: x.astype(model_cfg.param_dtype), params)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jnp.full((), -1, jnp.int32))
  return jax.jit(init, out_shardings=shardings)(params)


def make_train_step(model_cfg, optimizer, schedule, seed: int, grad_accum: int, shardings, batch_sharding,
                    frozen_shardings=None, model_params=None, loss=losses.lm_loss, rules=sharding.DEFAULT_RULES):
  """The jitted step `(state, batch, frozen) -> (state, metrics)`.

  `model_params(trainable, frozen)` builds the weights the model runs with (LoRA: the merged
  base); by default the trainable params are the model params and `frozen` is None. `loss(run_model,
  batch)` is the objective as (loss sum, weight) (losses.py; next-token prediction by default). With
  `grad_accum` micro-batches the sums and weights are added before dividing, so the step equals one
  full-batch step.
  """
  transformer = model.Transformer(model_cfg)
  model_params = model_params or (lambda trainable, frozen: trainable)

  def loss_fn(params, frozen, batch, rng):
    weights = {"params": model_params(params, frozen)}
    run_model = lambda tokens, **kw: transformer.apply(weights, tokens, deterministic=False, rngs={"dropout": rng}, **kw)
    with sharding.activation_sharding(batch_sharding.mesh, rules):
      return loss(run_model, batch)

  sum_and_grads = jax.value_and_grad(loss_fn, has_aux=True)  # ((loss sum, weight), grads of the sum)

  def loss_and_grads(params, frozen, batch, rng):
    if grad_accum == 1:
      (total, weight), grads = sum_and_grads(params, frozen, batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def accumulate(carry, i_and_batch):
        i, micro_batch = i_and_batch
        (total, weight), grads = sum_and_grads(params, frozen, micro_batch, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (total, weight, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (total, weight, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
    weight = jnp.maximum(weight, 1.0)
    return total / weight, jax.tree.map(lambda g: g / weight, grads)

  def train_step(state: TrainState, batch: dict, frozen):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)  # dropout depends on (seed, step) only
    loss, grads = loss_and_grads(state.params, frozen, batch, rng)
    grad_norm = optax.tree.norm(grads)
    healthy = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.first_bad_step < 0)

    def update():
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state

    # A NaN/Inf step leaves params and optimizer state as they were and is recorded; the host
    # stops the run at its next check, so a poisoned state is never saved.
    params, opt_state = jax.lax.cond(healthy, update, lambda: (state.params, state.opt_state))
    first_bad = jnp.where((state.first_bad_step < 0) & ~healthy, state.step, state.first_bad_step)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state, first_bad), metrics

  return jax.jit(train_step, in_shardings=(shardings, batch_sharding, frozen_shardings),
                 out_shardings=(shardings, None), donate_argnums=0)


def make_eval_step(model_cfg, param_shardings, batch_sharding, frozen_shardings=None, model_params=None,
                   loss=losses.lm_loss, rules=sharding.DEFAULT_RULES):
  """The jitted `(params, batch, frozen) -> (loss sum, weight)` on one validation batch."""
  transformer = model.Transformer(model_cfg)
  model_params = model_params or (lambda trainable, frozen: trainable)

  def eval_step(params, batch, frozen):
    weights = {"params": model_params(params, frozen)}
    with sharding.activation_sharding(batch_sharding.mesh, rules):
      return loss(lambda tokens, **kw: transformer.apply(weights, tokens, **kw), batch)

  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding, frozen_shardings))


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
  primary = jax.process_index() == 0
  with rundir.lock(workdir) if primary else contextlib.nullcontext():
    return _train(cfg, workdir, primary)


def _train(cfg, workdir: str, primary: bool) -> dict:
  saved_cfg = preflight.check_resume(cfg, workdir)
  tc = cfg.train
  mesh = preflight.mesh_for(cfg)
  setup = sources.prepare(cfg, workdir)
  preflight.check_sizes(cfg, setup)
  model_cfg = setup.model_cfg
  batch_sh = sharding.batch_sharding(mesh, cfg.mesh.rules)
  optimizer, schedule = make_optimizer(cfg.optim, tc.steps)
  lora = setup.lora_scale is not None
  abstract, shardings = state_shardings(model_cfg, optimizer, mesh, cfg.mesh.rules,
                                        trainable=setup.initial if lora else None)
  frozen, frozen_sh = None, None
  if setup.frozen is not None:  # the frozen base shards like model params
    frozen_sh = sharding.logical_shardings(model.boxed_param_shapes(model_cfg), mesh, cfg.mesh.rules)
    frozen = jax.device_put(jax.tree.map(lambda x: np.asarray(x, model_cfg.param_dtype), setup.frozen), frozen_sh)

  ckpt = checkpoint.Checkpointer(workdir, tc.max_to_keep)
  try:
    start_step, state = ckpt.restore_latest(abstract)
  except BaseException:
    ckpt.close()
    raise
  if state is None:
    start_step, state = 0, init_state(model_cfg, optimizer, cfg.seed, shardings, setup.initial)
  if primary:  # only now, with every check passed and the checkpoint restored, does the run write
    rundir.write_config(cfg, workdir)
    setup.save(workdir)
    if start_step < tc.steps:
      rundir.clear_finished(workdir)
  step_args = dict(frozen_shardings=frozen_sh, model_params=setup.model_params, rules=cfg.mesh.rules,
                   loss=losses.contrastive_loss if setup.task == "search" else losses.lm_loss)
  train_step = make_train_step(model_cfg, optimizer, schedule, cfg.seed, tc.grad_accum, shardings, batch_sh,
                               **step_args)
  eval_step = make_eval_step(model_cfg, shardings.params, batch_sh, **step_args)

  def global_batch(make, index):
    local = make(index, jax.process_index(), jax.process_count())
    return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}

  def evaluate(params) -> float:  # token-weighted over all eval batches, like one big batch
    sums = jax.device_get([eval_step(params, global_batch(setup.val_batch, i), frozen) for i in range(tc.eval_steps)])
    return float(sum(s for s, _ in sums) / max(sum(w for _, w in sums), 1.0))

  if setup.task and start_step == 0:
    before = _host_params(setup, state.params, frozen)  # every process takes part in the gather
    if primary:
      run_outputs.write_task_eval(setup, before, workdir, "before")

  tokens_per_step = tc.batch_size * tc.seq_len
  flops_per_token = model.train_flops_per_token(model_cfg, tc.seq_len)
  peak = tc.peak_tflops * 1e12 or flops.measure_matmul_peak(model_cfg.dtype)
  log = metrics_log.MetricsLogger(workdir, tc.steps, start_step, enabled=primary)
  log.info(f"model: {model.param_count(model_cfg):,} parameters, {flops_per_token / 1e6:.2f} MFLOPs/token"
           + (f", training {sum(x.size for x in jax.tree.leaves(state.params)):,} LoRA parameters" if lora else "")
           + f"; data: {setup.train_tokens:,} train / {setup.val_tokens:,} val tokens, vocab "
           f"{setup.tokenizer.vocab_size}; mesh {dict(mesh.shape)}; matmul peak {peak / 1e12:.3f} TFLOP/s; "
           + (f"resumed from step {start_step}" if start_step else "starting at step 0"))
  if start_step and saved_cfg is not None:
    note = preflight.schedule_change_note(saved_cfg, cfg, start_step, make_optimizer)
    if note:
      log.info(note)

  def check_health(state):
    bad = int(jax.device_get(state.first_bad_step))
    if bad >= 0:
      saved = ckpt.steps()
      raise FloatingPointError(
          f"the loss or gradient became NaN/Inf at step {bad + 1}; stopping. The last good checkpoint "
          f"({'step ' + str(saved[-1]) if saved else 'none yet'}) is kept in {ckpt.directory}. Lower "
          "optim.lr, raise optim.warmup_steps, tighten optim.grad_clip, or use dtype='float32'.")

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
      state, step_metrics = train_step(state, global_batch(setup.train_batch, step), frozen)
      window_steps += 1
      if step == start_step:  # keep compilation out of the throughput numbers
        jax.block_until_ready(state)
        log.info(f"first step (compilation included) took {time.perf_counter() - window_start:.1f} s")
        window_start, window_steps = time.perf_counter(), 0
      done = step + 1
      eval_now = done % tc.eval_every == 0 or done == tc.steps
      if done % tc.log_every == 0 or eval_now:
        metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        check_health(state)
        elapsed = time.perf_counter() - window_start
        metrics["tokens_per_sec"] = window_steps * tokens_per_step / elapsed if window_steps else 0.0
        metrics["mfu"] = flops.mfu(metrics["tokens_per_sec"], flops_per_token, peak)
        if eval_now:
          metrics["val_loss"] = evaluate(state.params)
          metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 700))
        log.write(done, metrics)
        window_start, window_steps = time.perf_counter(), 0
      if done % tc.ckpt_every == 0 or done == tc.steps:
        check_health(state)
        ckpt.save(done, state)
        last_saved = done
      stopping = stop.agreed(at_sync_point=done % tc.log_every == 0 or done % tc.ckpt_every == 0)
    ckpt.wait()
  finally:
    stop.restore()
    ckpt.close()
    log.close()
  if setup.task or tc.num_samples:
    final_params = _host_params(setup, state.params, frozen)  # every process takes part in the gather
    if primary and setup.task:
      run_outputs.write_task_eval(setup, final_params, workdir, "after")
    elif primary:
      run_outputs.write_samples(cfg, model_cfg, final_params, setup.tokenizer, workdir)
  if primary:
    metrics_log.plot_loss(workdir, cfg.reference)
    # From metrics.jsonl, not `metrics`: a finished run re-started only re-samples and has no new eval.
    evals = [r for r in metrics_log.read_metrics(workdir) if "val_loss" in r]
    if evals and cfg.reference.val_loss:
      print(f"final val loss {evals[-1]['val_loss']:.4f} at step {evals[-1]['step']}; reference "
            f"{cfg.reference.val_loss} at step {cfg.reference.step} ({cfg.reference.source})", flush=True)
    rundir.mark_finished(workdir, tc.steps, {"val_loss": evals[-1]["val_loss"]} if evals else {})
  return metrics


def _host_params(setup, trainable, frozen):
  """The weights the model runs with, as host-local arrays every process holds in full.

  Parameters sharded across processes (FSDP, TP) cannot be read or run by one process alone, so
  all processes call this together (a collective); afterwards process 0 may sample or evaluate on
  its own devices.
  """
  if jax.process_count() > 1:
    trainable, frozen = multihost_utils.process_allgather((trainable, frozen), tiled=True)
  return setup.model_params(trainable, frozen)


def dry_run(cfg, vocab_size: int) -> dict:
  """Compiles the train step for the configured mesh without data or weights (AOT) and reports
  per-device memory and FLOPs, so batch size and remat can be sized before accelerator time is spent."""
  config_lib.validate(cfg)
  model_cfg = config_lib.model_config(cfg, vocab_size)
  tc = cfg.train
  mesh = preflight.mesh_for(cfg)
  batch_sh = sharding.batch_sharding(mesh, cfg.mesh.rules)
  optimizer, schedule = make_optimizer(cfg.optim, tc.steps)
  abstract, shardings = state_shardings(model_cfg, optimizer, mesh, cfg.mesh.rules)
  step = make_train_step(model_cfg, optimizer, schedule, cfg.seed, tc.grad_accum, shardings, batch_sh,
                         rules=cfg.mesh.rules)
  batch = {k: jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), jnp.int32, sharding=batch_sh)
           for k in ("inputs", "targets")}
  start = time.perf_counter()
  compiled = step.lower(abstract, batch, None).compile()
  compile_s = time.perf_counter() - start

  def per_device_bytes(tree):
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))

  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  report = {
      "devices": mesh.devices.size, "mesh": dict(mesh.shape), "params": model.param_count(model_cfg),
      "params_bytes_per_device": per_device_bytes(abstract.params),
      "optimizer_bytes_per_device": per_device_bytes(abstract.opt_state),
      "temp_bytes_per_device": int(getattr(memory, "temp_size_in_bytes", 0)),
      "xla_flops_per_step_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
      "model_flops_per_step": model.train_flops_per_token(model_cfg, tc.seq_len) * tc.batch_size * tc.seq_len,
      "compile_s": compile_s}
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  print(f"dry run: {report['params'] / 1e9:.3f}B params on mesh {report['mesh']}, batch {tc.batch_size}x{tc.seq_len}, "
        f"remat={model_cfg.remat}, dtype={model_cfg.dtype}; compiled in {compile_s:.1f} s\n"
        f"  per device: params {gib(report['params_bytes_per_device'])}, optimizer state "
        f"{gib(report['optimizer_bytes_per_device'])}, temporaries {gib(report['temp_bytes_per_device'])}\n"
        f"  FLOPs per step: model {report['model_flops_per_step'] / 1e12:.2f} TFLOP (6N + attention), "
        f"XLA count {report['xla_flops_per_step_per_device'] / 1e12:.2f} TFLOP per device", flush=True)
  return report
