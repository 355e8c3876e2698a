"""Model FLOPs utilisation: achieved model FLOP/s over this machine's measured matmul peak.

The peak is measured, not looked up: a large square matmul in the given dtype
(accumulating in fp32), the best of a few runs. On a CPU that is what XLA can
actually reach; on an accelerator it comes close to the datasheet number.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def measure_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an [size, size] @ [size, size] matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float:
  return tokens_per_sec * flops_per_token / peak_flops
