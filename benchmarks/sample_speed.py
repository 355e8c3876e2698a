"""Sampling speed: prefill time and KV-cache decode tokens/s, batch 1 and 8.

Model shapes of the Shakespeare experiments (random weights: speed does not
depend on them). Also counts prefill compilations for 5 prompt lengths.

  python benchmarks/sample_speed.py
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lmjax import config as config_lib, model, sample

_SHAPES = flags.DEFINE_list("shapes", ["default", "gpu"], "Experiment shapes: default (4x128, ctx 64), gpu (6x384, ctx 256).")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "shakespeare_char.py")


def timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def main(_):
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
  greedy = sample.SamplingConfig(temperature=0.0)
  for shape in _SHAPES.value:
    cfg = config_lib.model_config(config_lib.load_experiment(_EXPERIMENT + (":gpu" if shape == "gpu" else "")), 78)
    params = model.init_params(cfg, jax.random.key(0))
    prompt_len, new = cfg.max_len // 4, cfg.max_len - cfg.max_len // 4
    for batch in map(int, _BATCHES.value):
      tokens = jnp.asarray(np.random.default_rng(0).integers(0, 78, (batch, prompt_len)), jnp.int32)
      positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
      stops = jnp.zeros((0, 0), jnp.int32)
      args = dict(sampling=greedy, eos_id=-1, pad_id=0)
      run_prefill = lambda: sample.prefill(cfg, params, tokens, positions, stops, jax.random.key(0), num_new=new, **args)
      state, first = timed(run_prefill)
      _, prefill_s = timed(run_prefill)
      run_decode = lambda: sample.decode(cfg, params, state, stops, num_new=new, **args)
      _, decode_first = timed(run_decode)
      _, decode_s = timed(run_decode)
      print(f"{shape:7s} batch {batch}: prompt {prompt_len} tokens, prefill {1e3 * prefill_s:7.1f} ms "
            f"(first call with compile {first:.1f} s); decode {new - 1} steps in {decode_s:.3f} s = "
            f"{batch * (new - 1) / decode_s:8.0f} tokens/s, {1e3 * decode_s / (new - 1):.2f} ms/step "
            f"(first call with compile {decode_first:.1f} s)", flush=True)
    before = sample.prefill._cache_size()
    for length in (3, 7, 12, 20, 33):
      sample.generate_tokens(cfg, params, [list(range(1, length + 1))], 4, greedy)
    print(f"{shape:7s} 5 prompts of lengths 3, 7, 12, 20, 33: {sample.prefill._cache_size() - before} prefill "
          f"compilations (buckets 16, 32, 64)")


if __name__ == "__main__":
  app.run(main)
