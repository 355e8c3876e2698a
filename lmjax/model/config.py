"""The architecture of a decoder-only Transformer: one frozen, validated config.

Every field has the default of a small model; `from_dict` builds one from a config block and names
unknown keys. The kernel fields (`attention_impl`, `matmul_impl`) choose implementations that give
the same values and gradients (ops/).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from lmjax.model import mup
from lmjax.ops import accelerator_attention
from lmjax.ops.attention import ATTENTION_DROPOUT_IMPLS, ATTENTION_IMPLS
from lmjax.ops.matmul import MATMUL_IMPLS

POS_ENCODINGS = ("sinusoidal", "learned", "rope", "none")
MLP_KINDS = ("relu", "gelu", "swiglu")
NORM_KINDS = ("layernorm", "rmsnorm")
REMAT_POLICIES = {
  "none": None,  # no rematerialisation: keep every activation
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = ("float32", "bfloat16", "float16")


def _choice(field: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"model.{field}={value!r} is not supported; allowed values: {sorted(allowed, key=str)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only Transformer. Validated on construction."""

  vocab_size: int = 256
  max_len: int = 256  # longest sequence the model is used on (learned PE table size)
  d_model: int = 128  # width of the residual stream
  n_layers: int = 4  # Transformer blocks
  n_heads: int = 4  # query heads
  n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; otherwise GQA
  head_dim: int | None = None  # None: d_model // n_heads
  d_ff: int = 512  # hidden width of the MLP
  pos_encoding: str = "rope"  # sinusoidal, learned, rope or none
  rope_theta: float = 10000.0  # RoPE base (Su et al. 2021)
  mlp: str = "gelu"  # relu, gelu (tanh approximation) or swiglu
  norm: str = "rmsnorm"  # layernorm or rmsnorm, before each sublayer and at the end
  norm_eps: float = 1e-5  # added to the variance
  attn_bias: bool = False  # biases on the q/k/v/o projections
  mlp_bias: bool = False  # biases on the MLP projections
  norm_bias: bool = True  # LayerNorm's additive bias (nanoGPT's bias=False drops it; RMSNorm has none)
  tie_embeddings: bool = True  # the output layer is the token embedding, transposed
  # Token embeddings times sqrt(d_model) on input (Vaswani et al. 2017, section 3.4), so that they
  # are not swamped by sinusoidal positions of amplitude 1.
  scale_embeddings: bool = False
  # Attention to the last `sliding_window` positions only (Mistral): a key at position k is visible
  # to a query at q iff 0 <= q - k < sliding_window. None: full causal attention.
  sliding_window: int | None = None
  dropout: float = 0.0  # on embeddings and on each residual branch
  attn_dropout: float = 0.0  # on attention probabilities
  scan_layers: bool = True  # one lax.scan over the blocks (fast compiles) instead of unrolled
  remat: str = "none"  # activation recomputation: none, full, dots_saveable, ...
  dtype: str = "float32"  # compute dtype of activations and matmuls
  # Kernels by name (ops/attention.py, ops/matmul.py): the same values and gradients, other speeds.
  attention_impl: str = "auto"  # auto, xla_cpu, reference, blockwise, cudnn, splash (README)
  matmul_impl: str = "xla_cpu"  # xla_cpu (layouts tuned for XLA:CPU) or xla (jnp.dot)
  matmul_dtype: str | None = None  # operand dtype of the dense projections (None: dtype), fp32 accumulation
  param_dtype: str = "float32"  # storage dtype of parameters
  init_std: float = 0.02  # normal init of weights; output projections / sqrt(2 n_layers)
  # sp (standard) or mup: μP (Tensor Programs V), so hyperparameters tuned at d_model =
  # mup_base_width transfer to other widths (model/mup.py has the table)
  parametrization: str = "sp"
  mup_base_width: int | None = None  # μP: the d_model the hyperparameters were tuned at (None: d_model)
  mup_base_head_dim: int | None = None  # μP: the base model's head dim (None: this head dim)

  def __post_init__(self):
    _choice("pos_encoding", self.pos_encoding, POS_ENCODINGS)
    _choice("mlp", self.mlp, MLP_KINDS)
    _choice("norm", self.norm, NORM_KINDS)
    _choice("remat", self.remat, REMAT_POLICIES)
    _choice("dtype", self.dtype, DTYPES)
    _choice("matmul_dtype", self.matmul_dtype, DTYPES + (None,))
    _choice("param_dtype", self.param_dtype, DTYPES)
    if self.attention_impl == "xla":  # its name in runs saved before it was called "reference"
      object.__setattr__(self, "attention_impl", "reference")
    _choice("attention_impl", self.attention_impl, ("auto", *ATTENTION_IMPLS))
    _choice("matmul_impl", self.matmul_impl, MATMUL_IMPLS)
    _choice("parametrization", self.parametrization, mup.PARAMETRIZATIONS)
    for field in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_ff"):
      if getattr(self, field) < 1:
        raise ValueError(f"model.{field}={getattr(self, field)} must be a positive integer")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(
        f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model} "
        f"(or set model.head_dim explicitly); allowed n_heads: "
        f"{[n for n in range(1, self.d_model + 1) if self.d_model % n == 0]}"
      )
    if self.n_heads % self.kv_heads:
      raise ValueError(
        f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}; "
        f"allowed n_kv_heads: {[k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]}"
      )
    if self.pos_encoding == "rope" and self.dim_per_head % 2:
      raise ValueError(f"model.pos_encoding='rope' needs an even head_dim, got {self.dim_per_head}")
    if self.pos_encoding == "sinusoidal" and self.d_model % 2:
      raise ValueError(f"model.pos_encoding='sinusoidal' needs an even d_model, got {self.d_model}")
    for field in ("dropout", "attn_dropout"):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise ValueError(f"model.{field}={getattr(self, field)} must be in [0, 1)")
    if self.attn_dropout and self.attention_impl not in ATTENTION_DROPOUT_IMPLS:
      raise ValueError(
        f"model.attention_impl={self.attention_impl!r} has no attention dropout; set model.attn_dropout=0 "
        f"or use one of {list(ATTENTION_DROPOUT_IMPLS)}"
      )
    accelerator_attention.check(self.attention_impl, self.matmul_dtype or self.dtype, self.dim_per_head)
    for field in ("n_kv_heads", "head_dim", "sliding_window", "mup_base_width", "mup_base_head_dim"):
      if getattr(self, field) is not None and getattr(self, field) < 1:
        raise ValueError(
          f"model.{field}={getattr(self, field)} must be a positive integer (or unset: the default)"
        )
    if self.parametrization == "mup" and not self.mup_base_width:
      raise ValueError(
        "model.parametrization='mup' needs model.mup_base_width, the d_model its hyperparameters were "
        "tuned at (without it every width is its own base and μP changes nothing)"
      )
    if self.parametrization == "mup" and self.scale_embeddings:
      raise ValueError(
        "model.scale_embeddings multiplies the input by sqrt(d_model), which grows with width and "
        "breaks μP's width-independent input layer; unset it with model.parametrization='mup'"
      )
    if self.parametrization == "sp" and (self.mup_base_width or self.mup_base_head_dim):
      raise ValueError(
        "model.mup_base_width / mup_base_head_dim are read only with model.parametrization='mup'; set "
        "it, or unset them"
      )
    for field in ("rope_theta", "norm_eps", "init_std"):
      if not getattr(self, field) > 0:
        raise ValueError(f"model.{field}={getattr(self, field)} must be > 0")

  @property
  def kv_heads(self) -> int:
    """Key/value heads K (n_kv_heads, or n_heads when unset)."""
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    """Head dimension H (head_dim, or d_model // n_heads when unset)."""
    return self.head_dim or self.d_model // self.n_heads

  @classmethod
  def from_dict(cls, values: dict) -> "ModelConfig":
    """Builds a config from a plain dict (e.g. an ml_collections `model` block)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
    return cls(**values)
