"""Where batch-1 decode time goes on this CPU: memory bandwidth of the ops a decode step runs.

  python benchmarks/decode_bandwidth.py

Prints GB/s of weight bytes read for: a jitted sum (the bandwidth bound); a [1, 576] @ [576, 49152]
matvec (SmolLM2's output head); the same weights as an [8, 576] matmul (batch-8 decode); and 30
[1, 576] @ [576, 1536] matvecs in a fori_loop that slices them out of one stacked array (what a
scan over layers does in a decode step); one layer's matvecs scanned over 30 layers with q/k/v and
gate/up separate and fused. Then decode ms/token of the SmolLM2-135M shape (random
fp32 weights, 32-token prompt, 128 greedy tokens) with its layers scanned and unrolled, and of a
30-layer model of width 64 (the per-token cost that does not depend on the weights).
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
from absl import app

from lmjax import model
from lmjax.inference import sampler

_SMOLLM2 = dict(vocab_size=49152, d_model=576, n_heads=9, n_kv_heads=3, d_ff=1536)
_NARROW = dict(vocab_size=512, d_model=64, n_heads=1, n_kv_heads=1, d_ff=128)


def seconds(fn, *args, repeats=30) -> float:
  fn(*args).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    fn(*args).block_until_ready()
  return (time.perf_counter() - start) / repeats


def bandwidths() -> None:
  head = jnp.ones((576, 49152), jnp.float32)
  layers = jnp.ones((30, 576, 1536), jnp.float32)
  gigabytes = head.size * 4 / 1e9
  print(f"sum of the head's weights      {gigabytes / seconds(jax.jit(jnp.sum), head):6.1f} GB/s")
  matmul = jax.jit(lambda x, w: x @ w)
  print(f"[1, 576] @ head (batch-1 head) {gigabytes / seconds(matmul, jnp.ones((1, 576)), head):6.1f} GB/s")
  print(f"[8, 576] @ head (batch-8 head) {gigabytes / seconds(matmul, jnp.ones((8, 576)), head):6.1f} GB/s")
  chain = jax.jit(lambda x, ws: jax.lax.fori_loop(0, 30, lambda i, h: (h @ ws[i])[:, :576], x))
  sliced = layers.size * 4 / 1e9 / seconds(chain, jnp.ones((1, 576)), layers)
  print(f"30 matvecs sliced from a stack {sliced:6.1f} GB/s")


def fused_layers() -> None:
  """One SmolLM2 layer's matvecs (q, k, v, o, gate, up, down), scanned over 30 stacked layers, with
  q/k/v and gate/up as separate matrices and fused into one each: GB/s of weights read."""
  shapes = {
    "separate": [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)],
    "fused": [(576, 960), (576, 576), (576, 3072), (1536, 576)],
  }

  def separate(h, w):
    mixed = (h @ w[0]) + jnp.pad((h @ w[1]) + (h @ w[2]), ((0, 0), (0, 384)))
    out = mixed @ w[3]
    return ((out @ w[4]) * (out @ w[5])) @ w[6]

  def fused(h, w):
    out = (h @ w[0])[:, :576] @ w[1]
    gate_up = out @ w[2]
    return (gate_up[:, :1536] * gate_up[:, 1536:]) @ w[3]

  for name, layer in (("separate", separate), ("fused", fused)):
    weights = [jnp.ones((30, *shape), jnp.float32) for shape in shapes[name]]
    scan = jax.jit(lambda x, ws, layer=layer: jax.lax.scan(lambda h, lw: (layer(h, lw), None), x, ws)[0])
    rate = sum(w.size for w in weights) * 4 / 1e9 / seconds(scan, jnp.ones((1, 576)), weights)
    print(f"30 layers, q/k/v and gate/up {name:8s} {rate:6.1f} GB/s")


def unrolled(cfg, params):
  """The same model with "blocks" [L, ...] split into "block_i" (Transformer's unscanned names)."""
  layers = {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(cfg.n_layers)}
  rest = {k: v for k, v in params.items() if k != "blocks"}
  return dataclasses.replace(cfg, scan_layers=False), {**rest, **layers}


def decode_ms_per_token(cfg, params, new=128) -> float:
  args = dict(sampling=sampler.SamplingConfig(temperature=0.0), eos_id=-1, pad_id=0)
  tokens, positions = jnp.zeros((1, 32), jnp.int32), jnp.arange(32)[None, :]
  key = jax.random.key(0)
  state = sampler.prefill(cfg, params, tokens, positions, key, num_new=new, cached_new=224, **args)
  run = lambda: sampler.decode(cfg, params, state, jnp.int32(new), **args).tokens_BN
  return 1e3 * seconds(run, repeats=3) / (new - 1)


def main(_):
  bandwidths()
  fused_layers()
  for name, shape in (("SmolLM2-135M shape", _SMOLLM2), ("width 64", _NARROW)):
    common = dict(max_len=2048, n_layers=30, pos_encoding="rope", mlp="swiglu", norm="rmsnorm")
    cfg = model.ModelConfig(tie_embeddings=True, **common, **shape)
    params = jax.device_put(model.init_params(cfg, jax.random.key(0)))
    scanned = decode_ms_per_token(cfg, params)
    flat = decode_ms_per_token(*unrolled(cfg, params))
    print(f"{name}: decode {scanned:.2f} ms/token scanned, {flat:.2f} unrolled")


if __name__ == "__main__":
  app.run(main)
