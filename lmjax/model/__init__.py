"""Layer `model`: the Transformer: its config, layers, KV cache, LoRA adapters, size and FLOPs.

May import: `lmjax.core`, `lmjax.ops`. Never data, runs, training or anything above.

The names below are the layer's public API (`from lmjax import model; model.Transformer(cfg)`).
"""

from lmjax.model import mup, quantize
from lmjax.model.accounting import (
  datasheet_peak_flops,
  measure_matmul_peak,
  mfu,
  non_embedding_param_count,
  param_count,
  train_flops_per_token,
)
from lmjax.model.config import DTYPES, MLP_KINDS, NORM_KINDS, POS_ENCODINGS, REMAT_POLICIES, ModelConfig
from lmjax.model.layers import ACTIVATION_AXES, MLP, Attention, Block, Norm, apply_rope, sinusoidal_encoding
from lmjax.model.transformer import (
  CACHE_AXES,
  Transformer,
  boxed_param_shapes,
  init_cache,
  init_params,
  map_kv,
)

__all__ = [
  "ACTIVATION_AXES",
  "CACHE_AXES",
  "DTYPES",
  "MLP",
  "MLP_KINDS",
  "NORM_KINDS",
  "POS_ENCODINGS",
  "REMAT_POLICIES",
  "Attention",
  "Block",
  "ModelConfig",
  "Norm",
  "Transformer",
  "apply_rope",
  "boxed_param_shapes",
  "init_cache",
  "map_kv",
  "init_params",
  "datasheet_peak_flops",
  "measure_matmul_peak",
  "mfu",
  "mup",
  "non_embedding_param_count",
  "param_count",
  "quantize",
  "sinusoidal_encoding",
  "train_flops_per_token",
]
