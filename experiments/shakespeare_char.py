"""Character-level Shakespeare, nanoGPT's "baby GPT" benchmark.

Default: nanoGPT's CPU configuration (4 layers, d=128, context 64, batch 12,
2000 steps, no dropout). `:gpu` is its GPU configuration (6 layers, d=384,
context 256, batch 64, 5000 steps, dropout 0.2).
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.seed = 1337
  cfg.data = dict(dataset="shakespeare", text_files="", val_file="", val_fraction=0.1, text_key="text",
                  data_dir="", tokenizer="char", vocab_size=0)
  cfg.model = dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, pos_encoding="learned", mlp="gelu",
                   norm="layernorm", attn_bias=True, mlp_bias=True, tie_embeddings=True, dropout=0.0,
                   scan_layers=True, remat="none", dtype="float32")
  cfg.optim = dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
                   grad_clip=1.0)
  cfg.train = dict(steps=2000, batch_size=12, seq_len=64, log_every=100, eval_every=250, eval_steps=20)
  if variant == "gpu":
    cfg.model.update(d_model=384, n_layers=6, n_heads=6, d_ff=1536, dropout=0.2)
    cfg.train.update(steps=5000, batch_size=64, seq_len=256, eval_every=250, eval_steps=200)
    cfg.optim.update(warmup_steps=100)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of shakespeare_char; known: '' (CPU default), 'gpu'")
  return cfg
