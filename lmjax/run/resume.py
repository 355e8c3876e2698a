"""What a resumed run may change (`RESUMABLE_FIELDS`) and what a config changes from a run's saved one
(`resume_differences`): preflight.check_resume refuses any other difference.
"""

from __future__ import annotations

import json

from lmjax.run.config import base_config, unset_is_none

# Fields a resumed run may change: how long it trains (a new schedule is announced at start), how
# often it logs, evaluates and saves, what it writes at the end, the mesh it runs on, how a step is
# computed, and where the prepared data is cached. Any other difference from the saved config.json
# is another experiment.
RESUMABLE_FIELDS = frozenset(
  {
    "train.steps",
    "optim.decay_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_steps",
    "train.ckpt_every",
    "train.max_to_keep",
    "train.num_samples",
    "train.sample_len",
    "train.sample_prompt",
    "train.peak_tflops",
    "train.measure_peak",
    "mesh.shape",
    "mesh.rules",
    "reference.step",
    "reference.val_loss",
    "reference.source",
    "reference.dataset",
    "reference.tokenizer",
    "data.data_dir",
    "logging.wandb",
    "logging.wandb_project",
    "logging.wandb_entity",
    "logging.wandb_name",
    "data.store_dir",
    # how the same step is computed: micro-batches (accumulation is exact), rematerialisation, kernels
    "train.grad_accum",
    "model.remat",
    "model.attention_impl",
    "model.matmul_impl",
  }
)


def resume_differences(saved, cfg) -> list:
  """(field, saved value, new value) for each field outside RESUMABLE_FIELDS that `cfg` changes
  from the run's `saved` config (fields the saved config predates count at their defaults)."""

  def flat(c):
    values = {}

    def walk(node, prefix):
      for key, value in node.items():
        if isinstance(value, dict):
          walk(value, f"{prefix}{key}.")
        else:
          values[prefix + key] = unset_is_none(prefix + key, value)

    walk(json.loads(c.to_json_best_effort()), "")
    return values

  old, new = flat(base_config()), flat(cfg)
  old.update(flat(saved))
  return [
    (k, old.get(k), new.get(k))
    for k in sorted(set(old) | set(new))
    if k not in RESUMABLE_FIELDS and not k.startswith("evals.") and old.get(k) != new.get(k)
  ]
