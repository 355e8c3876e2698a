"""A tiny experiment for end-to-end tests: a 2-layer model on a small text file.

Set `--config.data.text_files=PATH` (and a `data.data_dir`) when running it.
"""

from lmjax.run import config


def get_config(variant: str = ""):
  del variant
  cfg = config.base_config()
  cfg.seed = 7
  cfg.data.update(dataset="text_files", tokenizer="char", val_fraction=0.2)
  cfg.model.update(
    d_model=32, n_layers=2, n_heads=2, d_ff=64, pos_encoding="rope", mlp="swiglu", norm="rmsnorm", dropout=0.1
  )
  cfg.optim.update(lr=1e-2, min_lr=1e-3, warmup_steps=5)
  cfg.train.update(
    steps=40,
    batch_size=8,
    seq_len=32,
    log_every=1,
    eval_every=20,
    eval_steps=2,
    ckpt_every=10,
    max_to_keep=10,
    num_samples=1,
    sample_len=16,
    peak_tflops=1.0,
  )
  return cfg
