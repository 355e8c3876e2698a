"""Fine-tune the Shakespeare character model (experiments/shakespeare_char.py) to translate
English number words into digits ("four hundred six" -> "406"), all weights trained.

Needs the pretrained run first: `make run` (writes runs/shakespeare_char). The table of chrF and
exact match before/after fine-tuning is written to the workdir's task_eval.md.
"""

from lmjax.run import config


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"finetune_shakespeare_translate has no variants (got {variant!r})")
  cfg = config.base_config()
  cfg.seed = 3
  cfg.init.from_checkpoint = "runs/shakespeare_char"
  cfg.finetune.update(task="translate", mode="full", num_train=4000, num_val=128, num_eval=128)
  cfg.model.update(dropout=0.0)
  cfg.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=20, weight_decay=0.0)
  cfg.train.update(
    steps=600,
    batch_size=32,
    seq_len=63,
    log_every=50,
    eval_every=200,
    eval_steps=4,
    ckpt_every=200,
    peak_tflops=0.0,
  )
  return cfg
