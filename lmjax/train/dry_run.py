"""The dry run: compile the train step for the configured mesh without data or weights (AOT)."""

from __future__ import annotations

import time

import jax
import numpy as np

from lmjax import model
from lmjax.run import config as config_lib
from lmjax.train import state as state_lib, step as step_lib


def dry_run(cfg, vocab_size: int) -> dict:
  """Compiles the train step for the configured mesh without data or weights (AOT) and reports
  per-device memory and FLOPs, so batch size and remat can be sized before accelerator time is spent."""
  config_lib.validate(cfg)
  model_cfg = config_lib.model_config(cfg, vocab_size)
  tc = cfg.train
  run = state_lib.setup(cfg, model_cfg)
  mesh, abstract = run.mesh, run.abstract
  step = step_lib.make_train_step(
    model_cfg,
    run.optimizer,
    run.schedule,
    cfg.seed,
    tc.grad_accum,
    run.shardings,
    run.batch_sharding,
    rules=cfg.mesh.rules,
  )
  start = time.perf_counter()
  compiled = step.lower(abstract, state_lib.batch_spec(cfg, run.batch_sharding), None).compile()
  compile_s = time.perf_counter() - start

  def per_device_bytes(tree):
    return sum(
      int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )

  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  report = {
    "devices": mesh.devices.size,
    "mesh": dict(mesh.shape),
    "params": model.param_count(model_cfg),
    "params_bytes_per_device": per_device_bytes(abstract.params),
    "optimizer_bytes_per_device": per_device_bytes(abstract.opt_state),
    "temp_bytes_per_device": int(getattr(memory, "temp_size_in_bytes", 0)),
    "xla_flops_per_step_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
    "model_flops_per_step": model.train_flops_per_token(model_cfg, tc.seq_len) * tc.batch_size * tc.seq_len,
    "compile_s": compile_s,
  }
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  print(
    f"dry run: {report['params'] / 1e9:.3f}B params on mesh {report['mesh']}, batch "
    f"{tc.batch_size}x{tc.seq_len}, "
    f"remat={model_cfg.remat}, dtype={model_cfg.dtype}; compiled in {compile_s:.1f} s\n"
    f"  per device: params {gib(report['params_bytes_per_device'])}, optimizer state "
    f"{gib(report['optimizer_bytes_per_device'])}, temporaries {gib(report['temp_bytes_per_device'])}\n"
    f"  FLOPs per step: model {report['model_flops_per_step'] / 1e12:.2f} TFLOP (6N + attention), "
    f"XLA count {report['xla_flops_per_step_per_device'] / 1e12:.2f} TFLOP per device",
    flush=True,
  )
  return report
