"""Train-step temporaries per device against sequence length, per attention implementation (dry run).

  python benchmarks/attention_memory.py                          # GPT-2-small shape, T = 1k/4k/16k
  python benchmarks/attention_memory.py --lengths=1024,4096,16384,32768 --impls=blockwise

The step is compiled for this host's CPU (`train.dry_run`: AOT, no data, no weights) at the
GPT-2-small shape: 12 layers x 768, 12 heads, RoPE, bf16, remat full, batch 1, vocabulary 50257.
XLA's memory analysis gives the temporaries; quadratic attention grows ~16x per 4x length, O(T)
attention ~4x.
"""

import os

from absl import app, flags

from lmjax import train
from lmjax.run import config as config_lib

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "4096", "16384"], "Sequence lengths.")
_IMPLS = flags.DEFINE_list("impls", ["xla_cpu", "blockwise"], "model.attention_impl values.")
_EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "shakespeare_char.py")


def gpt2_small(seq_len: int, impl: str):
  cfg = config_lib.load_experiment(_EXPERIMENT)
  cfg.model.update(
    n_layers=12,
    d_model=768,
    n_heads=12,
    d_ff=3072,
    pos_encoding="rope",
    dtype="bfloat16",
    remat="full",
    dropout=0.0,
    attn_dropout=0.0,
    attention_impl=impl,
  )
  cfg.train.update(batch_size=1, seq_len=seq_len)
  return cfg


def main(argv):
  del argv
  rows = {}
  for impl in _IMPLS.value:
    for length in map(int, _LENGTHS.value):
      report = train.dry_run(gpt2_small(length, impl), vocab_size=50257)
      rows[impl, length] = report["temp_bytes_per_device"] / 2**30
  for impl in _IMPLS.value:
    sizes = [rows[impl, int(t)] for t in _LENGTHS.value]
    growth = ", ".join(f"x{b / a:.2f}" for a, b in zip(sizes, sizes[1:]))
    print(
      f"{impl:10s} "
      + "  ".join(f"T={t}: {s:6.2f} GiB" for t, s in zip(_LENGTHS.value, sizes))
      + f"  ({growth})"
    )


if __name__ == "__main__":
  app.run(main)
