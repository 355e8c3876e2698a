"""Host-side input throughput: step-indexed batches per second from the Shakespeare corpus.

The train loop builds one batch per step on the host; this must be far faster
than the train step itself (compare with steps/s from benchmarks/train_throughput.py).

  python benchmarks/input_pipeline.py
"""

import time

import ml_collections
from absl import app, flags

from lmjax.data import corpus as corpus_lib

_SHAPES = flags.DEFINE_list("shapes", ["12x64", "16x256"], "batch x seq_len shapes to measure.")
_SECONDS = flags.DEFINE_float("seconds", 2.0, "Measuring time per shape.")


def main(_):
  start = time.perf_counter()
  corpus = corpus_lib.load_corpus(
    ml_collections.ConfigDict(dict(dataset="shakespeare", val_fraction=0.1, tokenizer="char"))
  )
  print(
    f"corpus: {len(corpus.train_ids):,} train / {len(corpus.val_ids):,} val tokens, "
    f"vocab {corpus.tokenizer.vocab_size}, loaded in {time.perf_counter() - start:.1f} s"
  )
  for shape in _SHAPES.value:
    batch_size, seq_len = map(int, shape.split("x"))
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < _SECONDS.value:
      corpus_lib.batch_at(corpus.train_ids, 0, steps, batch_size, seq_len)
      steps += 1
    rate = steps / (time.perf_counter() - start)
    print(
      f"batch {batch_size:3d} x {seq_len:4d}: {rate:9.0f} batches/s  {rate * batch_size:11.0f} sequences/s"
    )


if __name__ == "__main__":
  app.run(main)
