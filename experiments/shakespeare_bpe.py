"""Shakespeare with a BPE tokenizer and the original Transformer's choices.

The "seed formulation" of lmjax: sinusoidal positions PE(i,2j)=sin(i/10000^(2j/d)),
ReLU feed-forward max(0, xW1+b1)W2+b2, LayerNorm, biases everywhere, untied output
embedding, token embeddings scaled by sqrt(d_model) as in the paper (without it the amplitude-1
position table swamps them: 2.41 vs 1.92 val loss in the architecture sweep), over a
SentencePiece BPE vocabulary of 2048 trained on the train split.
"""

import os

from lmjax.run import config


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"shakespeare_bpe has no variants (got {variant!r})")
  cfg = config.load_experiment(os.path.join(os.path.dirname(__file__), "shakespeare_char.py"))
  cfg.data.update(tokenizer="bpe", vocab_size=2048)
  cfg.model.update(pos_encoding="sinusoidal", mlp="relu", tie_embeddings=False, scale_embeddings=True)
  cfg.train.sample_prompt = "ROMEO:\n"
  cfg.reference.update(step=0, val_loss=0.0, source="")  # nanoGPT's result is for the char GPT-2
  return cfg
