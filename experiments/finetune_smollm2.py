"""LoRA fine-tuning of SmolLM2-135M-Instruct on a generated task, on CPU in minutes.

Variants pick the task: `:qa` (questions about facts stated in a context; exact match, token F1),
`:summarize` (extract the sentence marked as most important; ROUGE-L), `:translate` (number words to
digits; chrF), `:search` (retrieve the passage a query paraphrases by embedding similarity, trained
with an in-batch contrastive loss; recall@k, MRR). Adapters of rank 8 on q, k, v, o; the base model
stays frozen. task_eval.md in the workdir holds the before/after table.
"""

from lmjax.run import config


def get_config(variant: str = "qa"):
  if variant not in ("qa", "summarize", "translate", "search"):
    raise ValueError(
      f"unknown variant {variant!r} of finetune_smollm2; known: 'qa', 'summarize', 'translate', 'search'"
    )
  cfg = config.base_config()
  cfg.seed = 5
  cfg.init.pretrained = "smollm2-135m-instruct"
  cfg.finetune.update(
    task=variant,
    mode="lora",
    lora_rank=8,
    lora_alpha=16.0,
    lora_targets="q,k,v,o",
    num_train=1000,
    num_val=64,
    num_eval=64,
  )
  cfg.model.update(dropout=0.0)
  cfg.optim.update(lr=2e-3, min_lr=2e-4, warmup_steps=5, weight_decay=0.0)
  cfg.train.update(
    steps=40, batch_size=8, seq_len=64, log_every=5, eval_every=40, eval_steps=2, ckpt_every=20
  )
  if variant == "search":  # pairs of short texts; more pairs per batch give more in-batch negatives
    cfg.finetune.update(num_train=256, num_val=64, num_eval=32)
    cfg.train.update(batch_size=16, seq_len=24, steps=30, eval_every=30, ckpt_every=30)
  return cfg
