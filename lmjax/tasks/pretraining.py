"""Pretraining: next-token prediction on a token store (data/prepare.py, data/loader.py)."""

from __future__ import annotations

from lmjax.data import loader, prepare as prepare_lib
from lmjax.run import config as config_lib, rundir
from lmjax.tasks import evaluators
from lmjax.tasks.task import Task


def prepare(cfg, workdir: str) -> Task:
  """Next-token prediction on `cfg.data`'s sources, from a fresh init. The token store is prepared
  on first use; a resumed run's saved tokenizer must be the store's (errors.UserError otherwise)."""
  saved = rundir.load_tokenizer(workdir) if rundir.has_tokenizer(workdir) else None
  weighted = prepare_lib.source_list(cfg.data)
  store = prepare_lib.ensure(cfg.data, tokenizer=saved)
  if saved is not None:
    store.check_tokenizer(saved, f"the run's saved tokenizer ({workdir})")
  tc, weights, tokenizer = cfg.train, [w for _, w in weighted], store.tokenizer
  model_cfg = config_lib.model_config(cfg, tokenizer.vocab_size)
  splits = {name: [store.split(i, name) for i in range(len(weights))] for name in ("train", "validation")}

  def batches(split, seed):
    return loader.StoreBatches(store, weights, split, seed, tc.batch_size, tc.seq_len, cfg.data.packing)

  return Task(
    tokenizer=tokenizer,
    model_cfg=model_cfg,
    train_batch=batches("train", cfg.seed),
    val_batch=batches("validation", cfg.seed + 1),
    train_tokens=sum(s.tokens for s in splits["train"]),
    val_tokens=sum(s.tokens for s in splits["validation"]),
    train_rows=min(s.tokens for s in splits["train"]) - tc.seq_len,
    val_rows=min(s.tokens for s in splits["validation"]) - tc.seq_len,
    evaluators=[
      evaluators.Samples(
        tc.num_samples, tc.sample_prompt, tc.sample_len, cfg.seed, model_cfg, store.tokenizer
      )
    ]
    if tc.num_samples
    else [],
  )
