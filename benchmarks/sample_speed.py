"""Sampling speed: prefill time and KV-cache decode tokens/s, batch 1 and 8.

Shakespeare experiment shapes (random weights: speed does not depend on them)
and the pretrained SmolLM2-135M-Instruct in fp32 and bf16. Also counts prefill
compilations for 5 prompt lengths.

  python benchmarks/sample_speed.py                       # all
  python benchmarks/sample_speed.py --models=smollm2
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lmjax import model, pretrained
from lmjax.inference import sampler
from lmjax.run import config as config_lib

_MODELS = flags.DEFINE_list(
  "models",
  ["default", "gpu", "smollm2"],
  "default (4x128, ctx 64), gpu (6x384, ctx 256), smollm2 (135M, 20-token prompt, 128 new); "
  "smollm2-shape: SmolLM2-135M's shape with random weights (no GGUF needed), bf16.",
)
# SmolLM2-135M's architecture (its config.json): what `smollm2-shape` times without the weights file.
_SMOLLM2_SHAPE = dict(
  vocab_size=49152,
  max_len=2048,
  d_model=576,
  n_layers=30,
  n_heads=9,
  n_kv_heads=3,
  d_ff=1536,
  pos_encoding="rope",
  rope_theta=100000.0,
  mlp="swiglu",
  norm="rmsnorm",
  tie_embeddings=True,
  dtype="bfloat16",
)
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "shakespeare_char.py")
_GREEDY = sampler.SamplingConfig(temperature=0.0)


def timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def measure(name, cfg, params, batch, prompt_len, new):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
  args = dict(sampling=_GREEDY, eos_id=-1, pad_id=0)
  run_prefill = lambda: sampler.prefill(
    cfg, params, tokens, positions, jax.random.key(0), num_new=new, **args
  )
  state, prefill_first = timed(run_prefill)
  _, prefill_s = timed(run_prefill)
  run_decode = lambda: sampler.decode(cfg, params, state, jnp.int32(new), **args)
  _, decode_first = timed(run_decode)
  _, decode_s = timed(run_decode)
  print(
    f"{name:16s} batch {batch}: prompt {prompt_len}, prefill {1e3 * prefill_s:7.1f} ms; decode {new - 1} "
    "steps "
    f"{batch * (new - 1) / decode_s:8.1f} tokens/s ({1e3 * decode_s / (new - 1):6.2f} ms/step); "
    f"first calls incl. compile: prefill {prefill_first:.1f} s, decode {decode_first:.1f} s",
    flush=True,
  )


def count_compilations(name, cfg, params):
  before = sampler.prefill._cache_size()
  for length in (3, 7, 12, 20, 33):
    sampler.generate_tokens(cfg, params, [list(range(1, length + 1))], 4, _GREEDY)
  print(
    f"{name:16s} 5 prompts of lengths 3, 7, 12, 20, 33: {sampler.prefill._cache_size() - before} prefill "
    "compilations (buckets 16, 32, 64)"
  )


def main(_):
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
  batches = [int(b) for b in _BATCHES.value]
  for name in _MODELS.value:
    if name == "smollm2-shape":
      cfg = model.ModelConfig(**_SMOLLM2_SHAPE)
      params = model.init_params(cfg, jax.random.key(0))
      for batch in batches:
        measure(name, cfg, params, batch, prompt_len=20, new=128)
      continue
    if name == "smollm2":
      for dtype in ("float32", "bfloat16"):
        cfg, params, _ = pretrained.load("smollm2-135m-instruct", dtype=dtype)
        for batch in batches:
          measure(f"smollm2 {dtype}", cfg, params, batch, prompt_len=20, new=128)
      continue
    cfg = config_lib.model_config(
      config_lib.load_experiment(_EXPERIMENT + (":gpu" if name == "gpu" else "")), 78
    )
    params = model.init_params(cfg, jax.random.key(0))
    for batch in batches:
      measure(name, cfg, params, batch, prompt_len=cfg.max_len // 4, new=cfg.max_len - cfg.max_len // 4)
    count_compilations(name, cfg, params)


if __name__ == "__main__":
  app.run(main)
