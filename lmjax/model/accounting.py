"""Size and cost: parameter counts, training FLOPs per token, and MFU against a measured peak.

The peak is measured, not looked up: a large square matmul in the given dtype (accumulating in
fp32), the best of a few runs. On a CPU that is what XLA can actually reach; on an accelerator it
comes close to the datasheet number.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.model.config import ModelConfig
from lmjax.model.transformer import init_params


def param_count(cfg: ModelConfig) -> int:
  """Number of parameters, from shapes only (nothing is allocated)."""
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def non_embedding_param_count(cfg: ModelConfig) -> int:
  """Parameters outside the token, position and output embeddings: the N of scaling laws."""
  embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  if cfg.pos_encoding == "learned":
    embeddings += cfg.max_len * cfg.d_model
  return param_count(cfg) - embeddings


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6N + 12*L*T*(N_heads*H) (Kaplan et al.; PaLM appendix B).

  N counts the parameters used in matmuls: the input embedding table and the
  learned position table are lookups, not matmuls, so they are excluded unless
  the embedding is tied to the output projection (then it is counted once).
  """
  n = param_count(cfg)
  if not cfg.tie_embeddings:
    n -= cfg.vocab_size * cfg.d_model
  if cfg.pos_encoding == "learned":
    n -= cfg.max_len * cfg.d_model
  return 6.0 * n + 12.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.dim_per_head


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
  return 2 * size**3 / best


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float:
  """Model FLOPs utilisation (0-1): tokens/s x training FLOPs per token / peak FLOP/s."""
  return tokens_per_sec * flops_per_token / peak_flops
