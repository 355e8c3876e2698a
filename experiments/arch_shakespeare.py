"""The seed's architectural choices compared on character-level Shakespeare, one table.

Positions (sinusoidal / learned / RoPE, with a GELU MLP) and feed-forward (ReLU / GELU / SwiGLU,
with learned positions), at the default config's budget. SwiGLU's d_ff is 344 instead of 512 so
that its three matrices hold as many parameters as the two of ReLU/GELU (equal parameter count).
Sinusoidal positions are run twice: as is, and with token embeddings scaled by sqrt(d_model) as in
the original Transformer (the table has amplitude 1, the embeddings start at std 0.02).

  lmjax-sweep --config=experiments/arch_shakespeare.py --workdir=runs/arch
"""

from lmjax.run import config


def get_config(variant: str = ""):
  cfg = config.load_experiment(__file__.replace("arch_shakespeare.py", "shakespeare_char.py"))
  if variant:
    raise ValueError(f"arch_shakespeare has no variants (got {variant!r})")
  cfg.train.update(num_samples=0)
  return cfg


def get_sweep():
  return [
    {"model.pos_encoding": "sinusoidal"},
    {"model.pos_encoding": "sinusoidal", "model.scale_embeddings": True},
    {"model.pos_encoding": "learned"},
    {"model.pos_encoding": "rope"},
    {"model.mlp": "relu"},
    {"model.mlp": "swiglu", "model.d_ff": 344},
  ]
