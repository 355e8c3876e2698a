"""Shakespeare with a Llama-style architecture: RoPE, RMSNorm, SwiGLU, grouped-query attention.

Character level on the same data and budget as shakespeare_char, so the two
architectures compare directly. d_ff is set so that the SwiGLU MLP (three matrices)
has about the parameters of the GELU MLP (two matrices of d_ff=512). `:bpe` uses the
BPE tokenizer of shakespeare_bpe instead.
"""

from lmjax.run import config


def get_config(variant: str = ""):
  cfg = config.base_config()
  cfg.seed = 1337
  cfg.data.update(dataset="shakespeare", tokenizer="char")
  cfg.model.update(
    d_model=128,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    d_ff=344,
    pos_encoding="rope",
    rope_theta=10000.0,
    mlp="swiglu",
    norm="rmsnorm",
    attn_bias=False,
    mlp_bias=False,
    tie_embeddings=True,
    dropout=0.0,
    scan_layers=False,
  )
  cfg.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=100, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)
  cfg.train.update(
    steps=2000, batch_size=12, seq_len=64, log_every=100, eval_every=250, eval_steps=20, ckpt_every=500
  )
  if variant == "bpe":
    cfg.data.update(tokenizer="bpe", vocab_size=2048)
    cfg.train.sample_prompt = "ROMEO:\n"
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of shakespeare_llama; known: '' (char), 'bpe'")
  return cfg
