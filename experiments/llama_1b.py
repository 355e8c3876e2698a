"""A 1.1B-parameter Llama-style model (TinyLlama's shape), for sizing runs on accelerators.

  lmjax-train --config=experiments/llama_1b.py --dry_run --cpu_devices=8
compiles the train step on 8 simulated devices with FSDP and prints per-device memory and FLOPs,
without allocating the model. Train it on a GPU/TPU node with a real corpus
(`--config.data.sources=jsonl:/data/owt/*.jsonl`, prepared once into a token store).
"""

from lmjax.run import config


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"llama_1b has no variants (got {variant!r})")
  cfg = config.base_config()
  cfg.data.update(dataset="shakespeare", tokenizer="bpe", vocab_size=32000)
  cfg.model.update(
    d_model=2048,
    n_layers=22,
    n_heads=32,
    n_kv_heads=4,
    d_ff=5632,
    pos_encoding="rope",
    rope_theta=10000.0,
    mlp="swiglu",
    norm="rmsnorm",
    tie_embeddings=False,
    scan_layers=True,
    remat="full",
    dtype="bfloat16",
    param_dtype="float32",
  )
  cfg.optim.update(lr=3e-4, min_lr=3e-5, warmup_steps=2000, b1=0.9, b2=0.95, weight_decay=0.1)
  cfg.train.update(steps=100000, batch_size=64, seq_len=2048, log_every=10, eval_every=1000, ckpt_every=1000)
  cfg.mesh.shape = (1, -1, 1)  # FSDP over every device
  return cfg
