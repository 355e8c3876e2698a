"""LoRA adapters (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), applied
functionally: the trainable tree holds A [.., in, r] and B [.., r, out] for each targeted weight,
and `merge(base, lora, scale)` returns W + scale * A @ B for the forward pass, so the model code is
unchanged and merging for export is the same function. B starts at zero, so at initialisation the
model is exactly the base model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# LoRA target names -> lmjax weight names. wo takes (heads, head_dim) as its input dims.
LORA_TARGETS = {"q": ("wq",), "k": ("wk",), "v": ("wv",), "o": ("wo",), "mlp": ("w1", "w2", "w3")}
_INPUT_DIMS = {"wo": 2}


def _targets(names) -> set:
  wanted = set()
  for name in names:
    if name not in LORA_TARGETS:
      raise ValueError(
        f"finetune.lora_targets: {name!r} is not a LoRA target; allowed: {sorted(LORA_TARGETS)}"
      )
    wanted.update(LORA_TARGETS[name])
  return wanted


def lora_init(params, targets, rank: int, rng) -> dict:
  """Adapters for every targeted weight W [(layers,) in..., out...]: A [(layers,) in, rank] ~ N(0, 1/in)
  and B [(layers,) rank, out] = 0, fp32 (so the model starts unchanged). `targets` are names of
  LORA_TARGETS. Raises ValueError for an unknown target or when nothing matches."""
  wanted, flat, lora = _targets(targets), traverse_util.flatten_dict(params), {}
  for path, w in flat.items():
    if path[-1] not in wanted:
      continue
    layered = path[0] == "blocks"  # scanned params carry a leading layer axis
    lead = w.shape[:1] if layered else ()
    k = _INPUT_DIMS.get(path[-1], 1)
    fan_in = int(np.prod(w.shape[len(lead) : len(lead) + k]))
    fan_out = int(np.prod(w.shape[len(lead) + k :]))
    rng, sub = jax.random.split(rng)
    lora[path + ("a",)] = jax.random.normal(sub, (*lead, fan_in, rank), jnp.float32) / np.sqrt(fan_in)
    lora[path + ("b",)] = jnp.zeros((*lead, rank, fan_out), jnp.float32)
  if not lora:
    raise ValueError(f"no weights matched LoRA targets {list(targets)}")
  return traverse_util.unflatten_dict(lora)


def merge(params, lora, scale: float):
  """`params` with W + scale * A @ B (reshaped to W's shape, cast to W's dtype) for each adapted weight;
  the others untouched. Used in the forward pass of LoRA training and to load or export a LoRA run."""
  flat, adapters = traverse_util.flatten_dict(params), traverse_util.flatten_dict(lora)
  for path, a in adapters.items():
    if path[-1] == "a":
      w = flat[path[:-1]]
      delta = scale * jnp.matmul(a, adapters[path[:-1] + ("b",)])
      flat[path[:-1]] = w + delta.reshape(w.shape).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)
