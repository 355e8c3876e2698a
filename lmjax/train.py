"""Train state, optimizer, jit-compiled train/eval steps and the training loop."""
from __future__ import annotations

import json
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax import data, model

# Parameters that get weight decay: the matrices. Norm scales and biases do not.
_DECAYED = {"embedding", "lm_head", "pos_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay to `min_lr`, after global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=max(total_steps, optim_cfg.warmup_steps + 1), end_value=optim_cfg.min_lr)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key in _DECAYED, params)
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip),
      optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay, mask=decay_mask))


def cross_entropy(logits_BTV, targets_BT) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


def make_train_step(model_cfg: model.ModelConfig, optimizer, seed: int):
  transformer = model.Transformer(model_cfg)

  def train_step(state: TrainState, batch: dict):
    dropout_rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params):
      logits = transformer.apply({"params": params}, batch["inputs"], deterministic=False,
                                 rngs={"dropout": dropout_rng})
      return cross_entropy(logits, batch["targets"])

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return TrainState(state.step + 1, params, opt_state), metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model_cfg: model.ModelConfig):
  transformer = model.Transformer(model_cfg)

  def eval_step(params, batch):
    return cross_entropy(transformer.apply({"params": params}, batch["inputs"]), batch["targets"])

  return jax.jit(eval_step)


def evaluate(eval_step, params, ids, cfg) -> float:
  """Mean loss over `eval_steps` batches drawn from the validation stream with a fixed seed."""
  losses = [eval_step(params, data.batch_at(ids, cfg.seed + 1, i, cfg.train.batch_size, cfg.train.seq_len))
            for i in range(cfg.train.eval_steps)]
  return float(np.mean(jax.device_get(losses)))


def train(cfg, workdir: str) -> dict:
  """Runs the experiment `cfg` (an ml_collections ConfigDict); returns the final metrics."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  corpus = data.load_corpus(cfg.data)
  corpus.tokenizer.save(workdir)
  model_cfg = model.ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": corpus.tokenizer.vocab_size,
                                          "max_len": cfg.train.seq_len})
  optimizer = make_optimizer(cfg.optim, cfg.train.steps)
  params = model.init_params(model_cfg, jax.random.key(cfg.seed))
  state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  train_step, eval_step = make_train_step(model_cfg, optimizer, cfg.seed), make_eval_step(model_cfg)
  print(f"model: {model.param_count(model_cfg):,} parameters; train tokens {len(corpus.train_ids):,}, "
        f"val tokens {len(corpus.val_ids):,}", flush=True)

  start, metrics = time.time(), {}
  for step in range(cfg.train.steps):
    batch = data.batch_at(corpus.train_ids, cfg.seed, step, cfg.train.batch_size, cfg.train.seq_len)
    state, step_metrics = train_step(state, batch)
    last = step + 1 == cfg.train.steps
    if (step + 1) % cfg.train.log_every == 0 or last:
      metrics = {"step": step + 1, **{k: float(v) for k, v in jax.device_get(step_metrics).items()}}
      if (step + 1) % cfg.train.eval_every == 0 or last:
        metrics["val_loss"] = evaluate(eval_step, state.params, corpus.val_ids, cfg)
      print(json.dumps({**metrics, "elapsed_s": round(time.time() - start, 1)}), flush=True)
  return metrics
