"""Attention implementations head to head: forward + backward time and agreement with `reference`.

  python benchmarks/attention_speed.py                                   # CPU: xla_cpu vs blockwise
  python benchmarks/attention_speed.py --impls=reference,cudnn,blockwise --lengths=1024,4096,16384 \
      --batch=4 --heads=16 --kv_heads=4                                   # a GPU: cuDNN's flash attention

Causal self-attention of random bf16 inputs [batch, T, heads, head_dim] (GQA with --kv_heads), timed
as jit(value_and_grad) of sum(out * g) for a fixed random g: the work of one training step's
attention. Prints the median of --repeats calls after one compiling call, attention TFLOP/s (the
causal half of 4 * B * N * T^2 * H forward and twice that backward, FlashAttention-2's count), and
the largest difference of output and gradients from `reference` (bf16 operands: ~1e-2 is rounding).
On CPU it runs with glibc's transparent huge pages, as training does (core/hugepages.py): without
them xla_cpu's large score matrices ran 1.8x slower at 8k positions (1894 vs 1043 ms).
"""

import time

from lmjax.core import hugepages

if __name__ == "__main__":  # before JAX is imported, as every lmjax-* command: may re-execute
  hugepages.reexec_with_huge_pages()

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lmjax.ops import attention as attention_lib

_IMPLS = flags.DEFINE_list("impls", ["reference", "xla_cpu", "blockwise"], "Implementations to time.")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096"], "Sequence lengths T.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 6, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 6, "Key/value heads (divides --heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dim.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per configuration.")


def step_fn(impl: str, T: int):
  """jit(value_and_grad) of sum(attention(q, k, v) * g) over q, k, v."""

  def loss(q, k, v, g):
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), q.shape[:2])
    out = attention_lib.attention(q, k, v, pos, pos, causal=True, impl=impl, operand_dtype=jnp.bfloat16)
    return (out.astype(jnp.float32) * g).sum(), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def main(_):
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
  B, N, K, H = _BATCH.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
  for T in map(int, _LENGTHS.value):
    rng = np.random.default_rng(0)
    q, g = (jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.bfloat16) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.bfloat16) for _ in range(2))
    flops = 3 * 4 * B * N * T * T * H / 2  # forward + backward (2x), causal half
    results = {}
    for impl in _IMPLS.value:
      fn = step_fn(impl, T)
      try:
        start = time.perf_counter()
        results[impl] = jax.block_until_ready(fn(q, k, v, g))
        first = time.perf_counter() - start
      except Exception as err:  # noqa: BLE001 (e.g. cudnn without cuDNN): reported, the others go on
        print(f"T={T:6d} {impl:10s} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
        continue
      times = []
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(q, k, v, g))
        times.append(time.perf_counter() - start)
      seconds = float(np.median(times))
      line = (
        f"T={T:6d} {impl:10s} {1e3 * seconds:9.2f} ms fwd+bwd (range {1e3 * min(times):.2f}-"
        f"{1e3 * max(times):.2f}), {flops / seconds / 1e12:7.3f} TFLOP/s, first call {first:.1f} s"
      )
      if "reference" in results and impl != "reference":
        (_, out), grads = results[impl]
        (_, ref_out), ref_grads = results["reference"]
        diff = max(
          float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
          for a, b in zip((out, *grads), (ref_out, *ref_grads))
        )
        line += f", max |difference| from reference {diff:.3g}"
      print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
