"""Size and cost: parameter counts, training FLOPs per token, and MFU against a peak.

The peak of an accelerator is its datasheet's dense matmul rate (`PEAK_TFLOPS`), as MFU is defined
(PaLM, appendix B): a fixed denominator, so runs compare. A CPU has no such number; there the peak
is given (train.peak_tflops) or measured on request (`measure_matmul_peak`: a large square matmul,
the best of a few runs, which on a shared 2-core VM moves by 2x between starts).
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


# Dense matmul peaks, TFLOP/s, (bf16, fp32 as XLA runs it: TF32 on NVIDIA, bf16 passes on TPU) by
# a substring of jax's device_kind. NVIDIA A100/H100/H200 datasheets (SXM, without sparsity);
# Cloud TPU system architecture pages (per chip).
PEAK_TFLOPS = {
  "H200": (989.0, 494.5),
  "H100 PCIe": (756.0, 378.0),
  "H100": (989.0, 494.5),
  "A100": (312.0, 156.0),
  "TPU v6 lite": (918.0, 918.0),
  "TPU v5 lite": (197.0, 197.0),
  "TPU v5p": (459.0, 459.0),
  "TPU v5": (459.0, 459.0),
  "TPU v4": (275.0, 275.0),
}


def datasheet_peak_flops(device_kind: str, dtype: str) -> float | None:
  """FLOP/s of `device_kind` (jax.Device.device_kind) for matmuls in `dtype` from PEAK_TFLOPS, or
  None for a device not in it (a CPU, an unlisted accelerator)."""
  for name, (bf16, fp32) in PEAK_TFLOPS.items():  # the longer names come first
    if name in device_kind:
      return 1e12 * (fp32 if dtype == "float32" else bf16)
  return None


def train_flops_per_token(cfg: ModelConfig, seq_len: int, lora_params: int | None = None) -> float:
  """Training FLOPs per token: 6N + 12*L*T*(N_heads*H) (Kaplan et al.; PaLM appendix B).

  N counts the parameters used in matmuls: the input embedding table and the
  learned position table are lookups, not matmuls, so they are excluded unless
  the embedding is tied to the output projection (then it is counted once).
  With `lora_params` (the adapters' parameter count) the N base parameters are frozen: 4 FLOPs per
  token each (forward, input gradient; no weight gradient) and 6 per adapter parameter.
  """
  n = param_count(cfg)
  if not cfg.tie_embeddings:
    n -= cfg.vocab_size * cfg.d_model
  if cfg.pos_encoding == "learned":
    n -= cfg.max_len * cfg.d_model
  weights = 6.0 * n if lora_params is None else 4.0 * n + 6.0 * lora_params
  return weights + 12.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.dim_per_head


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
