"""Character-level Shakespeare: nanoGPT's "baby GPT" benchmark, the default of `make run`.

Default: nanoGPT's CPU configuration (4 layers, 4 heads, d_model 128, context 64, batch 12,
2000 steps, no dropout; nanoGPT reports val loss 1.88 on tiny-shakespeare), with GPT-2 style
biases on the projections and LayerNorms, which every result recorded for it uses (nanoGPT's
train.py sets bias=False: `--config.model.attn_bias=False --config.model.mlp_bias=False
--config.model.norm_bias=False`).
`:gpu` is its GPU configuration exactly (6 layers, 6 heads, d_model 384, context 256, batch 64,
5000 steps, no biases, dropout 0.2 on embeddings, residual branches and attention
probabilities; published val loss 1.47), which needs an accelerator.
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
    d_ff=512,
    pos_encoding="learned",
    mlp="gelu",
    norm="layernorm",
    attn_bias=True,
    mlp_bias=True,
    tie_embeddings=True,
    dropout=0.0,
    # Unrolled: at this depth XLA:CPU runs the step ~30% faster without the scan's
    # per-layer stacking of residuals, and compile time is still ~2 s (BUILD_NOTES).
    scan_layers=False,
  )
  cfg.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=100, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)
  cfg.train.update(
    steps=2000, batch_size=12, seq_len=64, log_every=100, eval_every=250, eval_steps=20, ckpt_every=500
  )
  # nanoGPT's corpus is its tiny-shakespeare (1.1 MB, 65 characters), lmjax's the complete plays
  # (4.8 MB, 78): close, not the same text, so the comparison is indicative, and made only for runs
  # on this corpus and tokenizer (config.reference_applies).
  cfg.reference.update(
    step=2000,
    val_loss=1.886,
    source="nanoGPT on tiny-shakespeare, PyTorch fp32, 2-core CPU",
    dataset="shakespeare",
    tokenizer="char",
  )
  if variant == "gpu":
    # nanoGPT's dropout also drops attention probabilities (dropout_p of its attention call).
    cfg.model.update(
      d_model=384,
      n_layers=6,
      n_heads=6,
      d_ff=1536,
      dropout=0.2,
      attn_dropout=0.2,
      attn_bias=False,
      mlp_bias=False,
      norm_bias=False,
    )
    cfg.train.update(steps=5000, batch_size=64, seq_len=256, eval_every=250, eval_steps=200, ckpt_every=1000)
    cfg.reference.update(step=5000, val_loss=1.47, source="nanoGPT's published GPU result, tiny-shakespeare")
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of shakespeare_char; known: '' (CPU default), 'gpu'")
  return cfg


def get_sweep():
  """Learning-rate sweep of the default config: `lmjax-sweep --config=experiments/shakespeare_char.py`."""
  return {"optim.lr": [3e-4, 6e-4, 1e-3, 2e-3, 4e-3, 8e-3]}
