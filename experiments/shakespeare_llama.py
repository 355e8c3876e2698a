"""Shakespeare with a Llama-style architecture: RoPE, RMSNorm, SwiGLU, grouped-query attention.

Character level on the same data and budget as shakespeare_char, so the two
architectures compare directly. d_ff is set so that the SwiGLU MLP (three matrices)
has about the parameters of the GELU MLP (two matrices of d_ff=512). `:bpe` uses the
BPE tokenizer of shakespeare_bpe instead.
"""

import os

from lmjax.run import config


def get_config(variant: str = ""):
  cfg = config.load_experiment(os.path.join(os.path.dirname(__file__), "shakespeare_char.py"))
  cfg.model.update(
    n_kv_heads=2, d_ff=344, pos_encoding="rope", mlp="swiglu", norm="rmsnorm", attn_bias=False, mlp_bias=False
  )
  cfg.reference.update(step=0, val_loss=0.0, source="")  # nanoGPT's result is for the GPT-2 architecture
  if variant == "bpe":
    cfg.data.update(tokenizer="bpe", vocab_size=2048)
    cfg.train.sample_prompt = "ROMEO:\n"
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of shakespeare_llama; known: '' (char), 'bpe'")
  return cfg
