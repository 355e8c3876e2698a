"""Pretraining: next-token prediction on a text corpus (data/corpus.py: nanoGPT's random windows)."""

from __future__ import annotations

from lmjax.data import corpus
from lmjax.run import config as config_lib, rundir
from lmjax.tasks import evaluators
from lmjax.tasks.task import Task


def prepare(cfg, workdir: str) -> Task:
  """Next-token prediction on `cfg.data`, from a fresh init (the run's saved tokenizer when resuming)."""
  saved = rundir.load_tokenizer(workdir) if rundir.has_tokenizer(workdir) else None
  text = corpus.load_corpus(cfg.data, tokenizer=saved)
  tc = cfg.train
  model_cfg = config_lib.model_config(cfg, text.tokenizer.vocab_size)
  return Task(
    tokenizer=text.tokenizer,
    model_cfg=model_cfg,
    train_batch=lambda step, p, n: corpus.batch_at(
      text.train_ids, cfg.seed, step, tc.batch_size, tc.seq_len, p, n
    ),
    val_batch=lambda i, p, n: corpus.batch_at(text.val_ids, cfg.seed + 1, i, tc.batch_size, tc.seq_len, p, n),
    train_tokens=len(text.train_ids),
    val_tokens=len(text.val_ids),
    train_rows=max(0, len(text.train_ids) - tc.seq_len),
    val_rows=max(0, len(text.val_ids) - tc.seq_len),
    evaluators=[
      evaluators.Samples(tc.num_samples, tc.sample_prompt, tc.sample_len, cfg.seed, model_cfg, text.tokenizer)
    ]
    if tc.num_samples
    else [],
  )
