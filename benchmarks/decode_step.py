"""The server's decode step for SmolLM2-135M: ms per step at 1, 8 and 16 cache rows, and the compile time
of each size, for weights in the decoding layout LanguageModel holds (model.quantize.for_decoding) or
as loaded (`--layout=declared`: scanned layers, matrices as the layers declare them).

A 16-row step makes 16 tokens; what it costs against a 1-row step bounds continuous batching's gain
over serving requests one at a time (benchmarks/serve_throughput.py measures the whole server).

  python benchmarks/decode_step.py --dtype=float32
  python benchmarks/decode_step.py --dtype=int8 --rows=1,16
"""

from lmjax.core import hugepages

if __name__ == "__main__":  # huge pages as lmjax's commands have them; before JAX is imported
  hugepages.reexec_with_huge_pages()

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from lmjax import model, pretrained
from lmjax.inference import engine_steps
from lmjax.model import quantize

_DTYPE = flags.DEFINE_string("dtype", "float32", "Weights: float32, bfloat16, int8 or int4.")
_ROWS = flags.DEFINE_list("rows", ["1", "8", "16"], "Cache rows (requests decoded together).")
_COLUMNS = flags.DEFINE_integer("columns", 256, "Cache columns per row (the server's max_context).")
_LAYOUT = flags.DEFINE_enum("layout", "decoding", ["decoding", "declared"], "Weight layout.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per size (the best is printed).")


def step_ms(cfg, params, rows: int) -> tuple:
  """(best ms of one decode step over `rows` rows at length 40, seconds of the first call)."""
  cache = {**model.init_cache(cfg, rows, _COLUMNS.value), "end": jnp.full((rows,), 40, jnp.int32)}
  zeros, ones = jnp.zeros((rows,), jnp.int32), jnp.ones((rows,), jnp.float32)
  args = (
    zeros,
    zeros.astype(jnp.uint32),
    zeros,
    jnp.zeros((rows,), jnp.float32),
    zeros,
    ones,
    jnp.asarray(False),
  )
  times = []
  for _ in range(_REPEATS.value + 1):
    start = time.perf_counter()
    cache, tokens, _ = engine_steps.decode_step(cfg, params, cache, *args)  # greedy, no logprobs
    tokens.block_until_ready()
    times.append(time.perf_counter() - start)
  return 1e3 * min(times[1:]), times[0]


def main(_):
  cfg, params, _ = pretrained.load(
    "smollm2-135m-instruct", dtype=None if _DTYPE.value == "float32" else _DTYPE.value
  )
  if _LAYOUT.value == "decoding":
    cfg, params = quantize.for_decoding(cfg, params)
  params = jax.device_put(params)
  print(f"SmolLM2 {_DTYPE.value}, {_LAYOUT.value} layout, {_COLUMNS.value} cache columns")
  for rows in map(int, _ROWS.value):
    ms, first_s = step_ms(cfg, params, rows)
    print(
      f"  {rows:3d} rows: {ms:6.1f} ms a step ({rows / ms * 1e3:6.1f} tokens/s); first call {first_s:.1f} s"
    )


if __name__ == "__main__":
  app.run(main)
