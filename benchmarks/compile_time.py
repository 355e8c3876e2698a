"""Compile time of the forward+backward pass vs depth, scanned and unrolled.

With `scan_layers=True` the layer stack is one `nn.scan`, so XLA compiles one
block whatever the depth; unrolled, compile time grows with the layer count.

  python benchmarks/compile_time.py --layers=4,24
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from lmjax import model

_LAYERS = flags.DEFINE_list("layers", ["4", "24"], "Depths to compile.")
_SCAN = flags.DEFINE_list("scan", ["true", "false"], "scan_layers settings to try.")


def compile_seconds(cfg: model.ModelConfig, batch: int = 8, seq_len: int = 64) -> float:
  params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

  def loss(p, t):
    return model.Transformer(cfg).apply({"params": p}, t).mean()

  start = time.perf_counter()
  jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return time.perf_counter() - start


def main(_):
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind})")
  for scan in _SCAN.value:
    for n_layers in map(int, _LAYERS.value):
      cfg = model.ModelConfig(
        vocab_size=256,
        max_len=64,
        d_model=128,
        n_layers=n_layers,
        n_heads=4,
        d_ff=512,
        scan_layers=scan == "true",
      )
      print(
        f"scan_layers={scan:5s} n_layers={n_layers:3d}: compile {compile_seconds(cfg):6.2f} s", flush=True
      )


if __name__ == "__main__":
  app.run(main)
