"""Dropout-mask cost: lmjax's unrolled Threefry (ops/dropout.py) against jax.random.bernoulli with the
threefry2x32, rbg and unsafe_rbg key implementations (`jax_default_prng_impl`), on the shape of one
6x384 residual-stream activation [16, 256, 384] and one attention-probability tensor [16, 6, 256, 256].

  python benchmarks/dropout_prng.py [--repeats=30]

Prints the median and best ms per mask (jitted, inputs on device, compile excluded), interleaving the
implementations in each repeat because this machine's speed drifts.
"""

import time

import jax
import numpy as np
from absl import app, flags

from lmjax.ops import dropout

_REPEATS = flags.DEFINE_integer("repeats", 30, "Timed calls per implementation and shape.")
SHAPES = {"residual [16,256,384]": (16, 256, 384), "attention [16,6,256,256]": (16, 6, 256, 256)}


def mask_fns(shape):
  """name -> (jitted fn, key) producing a keep mask of `shape` with p = 0.8."""
  fns = {"lmjax unrolled threefry": (jax.jit(lambda k: dropout.bernoulli(k, 0.8, shape)), jax.random.key(0))}
  for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
    fns[f"jax.random.bernoulli {impl}"] = (
      jax.jit(lambda k: jax.random.bernoulli(k, 0.8, shape)),
      jax.random.key(0, impl=impl),
    )
  return fns


def main(argv):
  del argv
  for label, shape in SHAPES.items():
    fns = mask_fns(shape)
    for fn, key in fns.values():
      fn(key).block_until_ready()  # compile
    times = {name: [] for name in fns}
    for _ in range(_REPEATS.value):
      for name, (fn, key) in fns.items():
        start = time.perf_counter()
        fn(key).block_until_ready()
        times[name].append(1e3 * (time.perf_counter() - start))
    for name, ts in times.items():
      print(f"{label:26s} {name:32s} median {np.median(ts):7.2f} ms  best {min(ts):7.2f} ms", flush=True)


if __name__ == "__main__":
  app.run(main)
