"""Train-step throughput of the real train step at the experiment shapes.

For each shape prints compile time, steps/s, tokens/s, model TFLOP/s and MFU
against this machine's matmul peak, measured in the same run (fp32 and bf16).

  python benchmarks/train_throughput.py                      # default and :gpu shapes
  python benchmarks/train_throughput.py --shapes=default --precisions=fp32,bf16-matmul
  python benchmarks/train_throughput.py --shapes=gpu --precisions=bf16-matmul \
      --set=model.dropout=0 --set=model.attn_dropout=0   # the no-dropout comparison
  python benchmarks/train_throughput.py --experiment=experiments/llama_1b.py --vocab=32000 \
      --shapes=default --precisions=bf16 --peak_tflops=989   # an accelerator: MFU against its spec
"""

import ast
import os
import time

from lmjax.core import hugepages

if __name__ == "__main__":  # before JAX is imported: this may re-execute the process
  hugepages.reexec_with_huge_pages()

import jax
import numpy as np
from absl import app, flags

from lmjax import model, train
from lmjax.run import config as config_lib

_EXPERIMENT = flags.DEFINE_string(
  "experiment",
  os.path.join(os.path.dirname(__file__), "..", "experiments", "shakespeare_char.py"),
  "Experiment file; 'default' is its shape as configured, 'gpu' its :gpu variant at batch 16.",
)
_VOCAB = flags.DEFINE_integer("vocab", 78, "Vocabulary size (78: Shakespeare's characters).")
_PEAK = flags.DEFINE_float(
  "peak_tflops", 0.0, "MFU against this dense peak (e.g. 989 for an H100/H200 in bf16); 0: measured here."
)

_SHAPES = flags.DEFINE_list(
  "shapes", ["default", "gpu"], "default: 4x128, batch 12x64; gpu: 6x384, batch 16x256."
)
# precision name -> (model.dtype, model.matmul_dtype); parameters stay fp32 in all of them.
_PRECISIONS = {"fp32": ("float32", ""), "bf16-matmul": ("float32", "bfloat16"), "bf16": ("bfloat16", "")}
_PRECISION = flags.DEFINE_list(
  "precisions",
  list(_PRECISIONS),
  "fp32; bf16-matmul: bf16 matmul operands, fp32 activations; bf16: bf16 compute.",
)
_SECONDS = flags.DEFINE_float("seconds", 10.0, "Measuring time per configuration.")
_SET = flags.DEFINE_multi_string(
  "set",
  [],
  "FIELD=VALUE config overrides for every measured configuration, "
  "e.g. model.attn_dropout=0 (the readings of BUILD_NOTES' comparisons).",
)


def experiment(shape: str, precision: str):
  cfg = config_lib.load_experiment(_EXPERIMENT.value + (":gpu" if shape == "gpu" else ""))
  if shape == "gpu":
    cfg.train.batch_size = 16  # the shape of the nanoGPT reference measurement on this machine
  cfg.model.dtype, cfg.model.matmul_dtype = _PRECISIONS[precision]
  for item in _SET.value:
    key, _, text = item.partition("=")
    if key not in config_lib.flat_keys(cfg):
      raise ValueError(f"--set={item}: unknown field {key!r}; fields are {config_lib.flat_keys(cfg)}")
    section, field = key.rsplit(".", 1)
    old = cfg[section][field]
    value = text if isinstance(old, str) else ast.literal_eval(text)
    cfg[section][field] = float(value) if isinstance(old, float) else value
  return cfg


def _time_steps(compiled, state, batches, steps: int, first: int = 0):
  """Runs `steps` train steps; returns the new state and the seconds per step."""
  start = time.perf_counter()
  for i in range(first, first + steps):
    state, _ = compiled(state, batches[i % len(batches)], None)
  jax.block_until_ready(state)
  return state, (time.perf_counter() - start) / steps


def measure(cfg) -> dict:
  model_cfg = config_lib.model_config(cfg, _VOCAB.value)
  tc = cfg.train
  run = train.setup(cfg, model_cfg)
  state = train.init_state(model_cfg, run.optimizer, 0, run.shardings)
  step_fn = train.make_train_step(
    model_cfg, run.optimizer, run.schedule, 0, tc.grad_accum, run.shardings, run.batch_sharding
  )
  rng = np.random.default_rng(0)
  spec = train.batch_spec(cfg, run.batch_sharding)
  batches = [
    {k: rng.integers(0, _VOCAB.value, s.shape).astype(s.dtype) for k, s in spec.items()} for _ in range(4)
  ]

  start = time.perf_counter()
  compiled = step_fn.lower(state, batches[0], None).compile()
  compile_s = time.perf_counter() - start
  state, first_step_s = _time_steps(compiled, state, batches, 1)
  # Timed in windows of about half a second: this VM's speed drifts by +-10-20% within
  # minutes, so the median window (the reported number) and the best window say more
  # than one long mean.
  window = max(1, int(0.5 / first_step_s))
  windows, start, steps = [], time.perf_counter(), 0
  while time.perf_counter() - start < _SECONDS.value or len(windows) < 3:
    state, seconds = _time_steps(compiled, state, batches, window, steps)
    windows.append(seconds)
    steps += window
  seconds, best = float(np.median(windows)), min(windows)
  tokens_per_sec = tc.batch_size * tc.seq_len / seconds
  model_flops = tokens_per_sec * model.train_flops_per_token(model_cfg, tc.seq_len)
  return dict(
    compile_s=compile_s,
    ms_per_step=1e3 * seconds,
    best_ms_per_step=1e3 * best,
    tokens_per_sec=tokens_per_sec,
    model_tflops=model_flops / 1e12,
    params=model.param_count(model_cfg),
  )


def main(_):
  peaks = {d: model.measure_matmul_peak(d) for d in ("float32", "bfloat16")}
  print(
    f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {jax.device_count()} device(s); "
    f"measured matmul peak: fp32 {peaks['float32'] / 1e12:.3f} TFLOP/s, bf16 {peaks['bfloat16'] / 1e12:.3f} "
    "TFLOP/s"
  )
  for shape in _SHAPES.value:
    for precision in _PRECISION.value:
      cfg = experiment(shape, precision)
      r = measure(cfg)
      print(
        f"{shape:7s} {precision:11s} {r['params'] / 1e6:5.2f}M params batch "
        f"{cfg.train.batch_size}x{cfg.train.seq_len}: "
        f"compile {r['compile_s']:5.1f} s  {r['ms_per_step']:8.1f} ms/step (best "
        f"{r['best_ms_per_step']:.1f})  {1e3 / r['ms_per_step']:6.2f} steps/s  "
        f"{r['tokens_per_sec']:8.0f} tok/s  {r['model_tflops']:.3f} TFLOP/s  "
        f"MFU {100 * r['model_tflops'] * 1e12 / peaks['float32']:.1f}% of fp32 peak, "
        f"{100 * r['model_tflops'] * 1e12 / peaks['bfloat16']:.1f}% of bf16 peak"
        + (
          f", {100 * r['model_tflops'] / _PEAK.value:.1f}% of {_PEAK.value:g} TFLOP/s" if _PEAK.value else ""
        )
        + peak_memory(),
        flush=True,
      )


def peak_memory() -> str:
  """The device's peak allocation so far, where the backend reports it (GPU/TPU; not XLA:CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return f", peak memory {stats['peak_bytes_in_use'] / 2**30:.2f} GiB" if "peak_bytes_in_use" in stats else ""


if __name__ == "__main__":
  app.run(main)
